"""Errors raised by channels: I/O failures and protocol violations."""


class ChannelError(Exception):
    """An I/O failure on a channel (connection lost, shut down, write error)."""


class ProtocolError(ChannelError):
    """The peer sent something the stream format does not allow.

    The message names the field and the value that were wrong.
    """


class PageIntegrityError(ProtocolError):
    """A target page's bytes, block or offset do not match its check value.

    Raised on the destination before the page is placed. ``channel``,
    ``block`` (idstr), ``offset`` (bytes into the block), ``expected`` (the
    check value the stream carried) and ``actual`` (the one computed from
    what arrived) name the page.
    """

    def __init__(self, channel: str, block: str, offset: int, expected: int, actual: int, pages: int = 1):
        self.channel, self.block, self.offset = channel, block, offset
        self.expected, self.actual, self.pages = expected, actual, pages
        more = f" ({pages} pages of the run damaged)" if pages > 1 else ""
        super().__init__(f"page integrity: channel {channel}, block {block!r}, offset 0x{offset:x}: check value "
                         f"0x{actual:016x}, the stream says 0x{expected:016x}{more}; page not placed")


class UnverifiedStreamError(ProtocolError):
    """The stream lacks what verifies it (page check values, the guest section's digests)
    although the receiver requires them (capability page-checksums)."""
