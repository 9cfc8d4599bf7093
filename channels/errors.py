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
