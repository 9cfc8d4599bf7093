"""Errors raised by channels: I/O failures and protocol violations."""


class ChannelError(Exception):
    """An I/O failure on a channel (connection lost, shut down, write error)."""


class ProtocolError(ChannelError):
    """The peer sent something the stream format does not allow.

    The message names the field and the value that were wrong.
    """


class DeviceStateError(ProtocolError):
    """Device state that cannot be delimited by the framing QEMU gives (vmdesc, PACKAGED)."""


class LayoutError(ProtocolError):
    """The source's RAM layout (MEM_SIZE) is outside what this destination accepts."""


class PeerTimeout(ChannelError):
    """A blocking send or recv on a channel made no progress for the liveness timeout.

    ``channel`` is the channel's name (``precopy``, ``return-path``,
    ``postcopy1``...), ``direction`` is ``"send"`` (the peer accepted no byte)
    or ``"recv"`` (the peer sent no byte), ``seconds`` the bound that expired
    (the ``liveness-timeout`` parameter). ``detail`` says which check fired
    when it was the kernel's (TCP_USER_TIMEOUT or keepalive) rather than the
    socket timeout.
    """

    def __init__(self, channel: str, direction: str, seconds: float, detail: str = ""):
        self.channel = channel
        self.direction = direction
        self.seconds = seconds
        self.detail = detail
        if detail:
            what = f"{detail} after {seconds:g} s" if seconds else detail
        elif direction == "recv":
            what = f"received no byte from the peer for {seconds:g} s"
        else:
            what = f"the peer accepted no byte for {seconds:g} s"
        bound = " (liveness-timeout)" if seconds else " (the kernel's own retransmission limit)"
        super().__init__(f"channel {channel}: {direction} timed out: {what}{bound}")

    def again(self) -> "PeerTimeout":
        """A new exception with the same fields (a sticky error raised once more)."""
        return PeerTimeout(self.channel, self.direction, self.seconds, self.detail)


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


class DestinationNeverRan(ChannelError):
    """The destination says, on a recovery connection, that it failed before POSTCOPY_RUN.

    Its guest never ran, so the source's copy is the only one: a source in
    ``postcopy-recover`` fails the migration and runs its guest again (event
    ``never-ran`` of engine/states.py). ``detail`` is the destination's error.
    """
