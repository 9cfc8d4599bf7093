"""Errors raised by channels: I/O failures and protocol violations."""


class ChannelError(Exception):
    """An I/O failure on a channel (connection lost, shut down, write error)."""


class ProtocolError(ChannelError):
    """The peer sent something the stream format does not allow.

    The message names the field and the value that were wrong.
    """
