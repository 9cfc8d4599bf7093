"""When the kernel received the bytes a thread reads: SO_TIMESTAMPNS on an urgent socket.

The request trace (engine/reqtrace.py) marks when a thread *decoded* a
request or a page. Between the bytes arriving in the socket and that mark
lies the reading thread's wake-up (the scheduler, then the GIL). With
SO_TIMESTAMPNS every read also says when the kernel received the last
segment it returned (TCP: tcp_recv_timestamp), so the trace can split the
link from the wake-up: stages ``request-arrived`` (source, return path) and
``arrived`` (destination, POSTCOPY channel).

Only plain TCP sockets are stamped: a TLS transport reads through its own
layer, a Unix socket carries no timestamps; there nothing changes.
"""
from __future__ import annotations

import socket
import struct
import time

from ferry_migrate.channels.transport import SocketTransport

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # asm-generic/socket.h; SCM_TIMESTAMPNS is the same
_ANC = socket.CMSG_SPACE(16)  # struct timespec
_TS = struct.Struct("qq")
_OFFSET_AGE = 1.0  # s between re-reads of the realtime - monotonic offset


class RxStamp:
    """The kernel receive time of the last read on one transport, in ``time.monotonic()`` seconds.

    ``last`` is None until a read returned a timestamp. Made by :func:`stamp_receives`.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.last: float | None = None
        self._offset = 0.0
        self._offset_at = -_OFFSET_AGE

    def recv_into(self, buf) -> int:
        n, anc, _flags, _addr = self.sock.recvmsg_into([buf], _ANC)
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TS.size:
                sec, nsec = _TS.unpack_from(data)
                now = time.monotonic()
                if now - self._offset_at >= _OFFSET_AGE:
                    # The timestamp is CLOCK_REALTIME; the trace's clock is CLOCK_MONOTONIC.
                    self._offset, self._offset_at = time.time() - time.monotonic(), now
                self.last = sec + nsec * 1e-9 - self._offset
        return n


def stamp_receives(transport) -> RxStamp | None:
    """Read ``transport`` through recvmsg with SO_TIMESTAMPNS from now on; None where not possible.

    Only the reading side changes (its ``recv_into``); writes on the same
    transport are untouched. Never raises: a socket that refuses the option
    is read as before.
    """
    sock = getattr(transport, "sock", None)
    if (sock is None or type(transport).recv_into is not SocketTransport.recv_into
            or sock.family not in (socket.AF_INET, socket.AF_INET6)):
        return None
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        return None
    stamp = RxStamp(sock)
    transport.recv_into = stamp.recv_into  # this instance only
    return stamp
