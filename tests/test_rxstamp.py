"""Kernel receive times of an urgent socket (engine/rxstamp.py): SO_TIMESTAMPNS read through
recvmsg on real sockets, in the trace's clock; left alone where there are none."""
import socket
import time

from ferry_migrate.channels.transport import SocketTransport
from ferry_migrate.engine.rxstamp import stamp_receives


def _pair(family=socket.AF_INET):
    if family == socket.AF_UNIX:
        a, b = socket.socketpair()
        return a, b
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    c = socket.create_connection(lsock.getsockname())
    s, _ = lsock.accept()
    lsock.close()
    return c, s


def test_tcp_read_gets_the_kernels_receive_time_in_monotonic_seconds():
    c, s = _pair()
    try:
        t = SocketTransport(s, name="postcopy-1")
        rx = stamp_receives(t)
        assert rx is not None and rx.last is None
        buf = bytearray(4096)
        # The kernel turns receive timestamps on for the whole host after the first socket
        # asks, from a work queue: bytes that arrive before then carry none (rx.last stays
        # None). Probe until a stamp comes, as the first requests of a migration would.
        deadline = time.monotonic() + 10
        while rx.last is None:
            assert time.monotonic() < deadline, "no receive timestamp within 10 s of SO_TIMESTAMPNS"
            c.sendall(b"p")
            assert t.recv_into(memoryview(buf)) == 1
            if rx.last is None:
                time.sleep(0.01)
        rx.last = None
        t0 = time.monotonic()
        c.sendall(b"x" * 100)
        time.sleep(0.05)  # the reader wakes late: the stamp still says when the bytes came
        n = t.recv_into(memoryview(buf))
        t1 = time.monotonic()
        assert n == 100 and bytes(buf[:n]) == b"x" * 100
        assert t0 - 0.002 <= rx.last <= t0 + 0.02, (t0, rx.last)
        assert t1 - rx.last >= 0.04
        # Writes on the same transport are untouched; reads go on at EOF as before.
        t.sock.sendall(b"y")
        assert c.recv(1) == b"y"
        c.close()
        assert t.recv_into(memoryview(buf)) == 0
    finally:
        c.close()
        s.close()


def test_unix_socket_is_left_alone():
    a, b = _pair(socket.AF_UNIX)
    try:
        t = SocketTransport(b)
        assert stamp_receives(t) is None
        assert "recv_into" not in vars(t)
    finally:
        a.close()
        b.close()
