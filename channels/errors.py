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
