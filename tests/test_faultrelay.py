"""The fault-injection relay and process helpers of tests/faultrelay.py, on real sockets and processes."""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from .faultrelay import TO_DST, TO_SRC, FaultRelay, RelayError, sigcont, sigkill, stop_for, stopped

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB with a recognisable pattern


class Sink:
    """A TCP server standing for the destination: accepts in order, keeps what each connection sent.

    ``outcome[i]`` is "eof" or "reset" once connection i ended.
    """

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.data: list[bytearray] = []
        self.outcome: dict[int, str] = {}
        self.cond = threading.Condition()
        self._threads = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.cond:
                i = len(self.conns)
                self.conns.append(c)
                self.data.append(bytearray())
                self.cond.notify_all()
            t = threading.Thread(target=self._read, args=(i, c), daemon=True)
            t.start()
            self._threads.append(t)

    def _read(self, i, c):
        while True:
            try:
                b = c.recv(1 << 16)
            except ConnectionResetError:
                self._end(i, "reset")
                return
            except OSError:
                self._end(i, "closed")
                return
            if not b:
                self._end(i, "eof")
                return
            with self.cond:
                self.data[i] += b
                self.cond.notify_all()

    def _end(self, i, how):
        with self.cond:
            self.outcome[i] = how
            self.cond.notify_all()

    def wait(self, pred, timeout=30):
        with self.cond:
            assert self.cond.wait_for(pred, timeout), "sink condition not met"

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


def connect(uri):
    host, port = uri[4:].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def test_forwards_both_ways_and_keeps_connection_order(sink):
    with FaultRelay(sink.uri) as relay:
        clients = []
        for i in range(4):
            c = connect(relay.uri)
            c.sendall(bytes([i]) * (i + 1))
            clients.append(c)
            relay.wait_connections(i + 1)
        sink.wait(lambda: len(sink.data) == 4 and all(len(d) == i + 1 for i, d in enumerate(sink.data)))
        # The destination saw the connections in the order the source opened them.
        assert [bytes(d) for d in sink.data] == [bytes([i]) * (i + 1) for i in range(4)]
        clients[0].sendall(PAYLOAD)
        sink.conns[0].sendall(b"return path")
        got = b""
        while len(got) < 11:
            got += clients[0].recv(64)
        assert got == b"return path"
        sink.wait(lambda: len(sink.data[0]) == 1 + len(PAYLOAD))
        assert bytes(sink.data[0][1:]) == PAYLOAD
        c = relay.counters()
        assert c[0][TO_DST] == {"received": 1 + len(PAYLOAD), "forwarded": 1 + len(PAYLOAD), "dropped": 0}
        assert c[0][TO_SRC]["forwarded"] == 11 and c[3][TO_DST]["received"] == 4
        # The end of a stream passes through as an end of stream.
        clients[2].shutdown(socket.SHUT_WR)
        sink.wait(lambda: sink.outcome.get(2) == "eof")
        for c in clients:
            c.close()
    relay_threads = [t for t in threading.enumerate() if t.name.startswith("relay")]
    assert not relay_threads


def test_flip_changes_exactly_one_byte(sink):
    with FaultRelay(sink.uri) as relay:
        relay.flip(0, TO_DST, 100_000, mask=0x01)
        relay.flip(0, TO_DST, 0)  # the very first byte
        c = connect(relay.uri)
        c.sendall(PAYLOAD)
        sink.wait(lambda: len(sink.data) == 1 and len(sink.data[0]) == len(PAYLOAD))
        got = sink.data[0]
        diff = [i for i in range(len(PAYLOAD)) if got[i] != PAYLOAD[i]]
        assert diff == [0, 100_000]
        assert got[0] == PAYLOAD[0] ^ 0xFF and got[100_000] == PAYLOAD[100_000] ^ 0x01
        assert sorted(f.offset for f in relay.fired if f.kind == "flip") == [0, 100_000]
        c.close()


@pytest.mark.parametrize("rst", [False, True])
def test_truncate_forwards_n_bytes_then_closes(sink, rst):
    with FaultRelay(sink.uri) as relay:
        relay.truncate(0, TO_DST, 123_457, rst=rst)
        c = connect(relay.uri)
        with pytest.raises(OSError):
            for _ in range(64):  # until the cut shows on the source's side
                c.sendall(PAYLOAD)
        sink.wait(lambda: 0 in sink.outcome)
        assert bytes(sink.data[0]) == (PAYLOAD * 2)[:123_457]
        assert sink.outcome[0] == ("reset" if rst else "eof")
        assert relay.wait_fired("cut").offset == 123_457
        c.close()


def test_cut_on_demand_with_rst_resets_both_sides(sink):
    with FaultRelay(sink.uri) as relay:
        c = connect(relay.uri)
        c.sendall(b"x" * 1000)
        sink.wait(lambda: sink.data and len(sink.data[0]) == 1000)
        relay.cut(0, rst=True)
        sink.wait(lambda: 0 in sink.outcome)
        assert sink.outcome[0] == "reset"
        with pytest.raises(ConnectionResetError):
            c.recv(10)
        assert relay.fired[-1].kind == "cut"
        c.close()


def test_stall_holds_bytes_at_the_offset_then_resumes(sink):
    with FaultRelay(sink.uri) as relay:
        relay.stall(0, TO_DST, 600, at=300_000)  # long: ended by resume() below
        c = connect(relay.uri)
        sender = threading.Thread(target=lambda: c.sendall(PAYLOAD * 4), daemon=True)
        sender.start()
        relay.wait_fired("stall")
        time.sleep(0.3)
        # Nothing beyond the offset reached the destination, sockets are open.
        assert len(sink.data[0]) == 300_000 and 0 not in sink.outcome
        assert relay.counters()[0][TO_DST]["forwarded"] == 300_000
        relay.resume(0, TO_DST)
        sink.wait(lambda: len(sink.data[0]) == 4 * len(PAYLOAD))
        assert bytes(sink.data[0]) == PAYLOAD * 4
        sender.join(10)
        c.close()


def test_stall_for_seconds_ends_by_itself(sink):
    with FaultRelay(sink.uri) as relay:
        c = connect(relay.uri)
        c.sendall(b"a")
        sink.wait(lambda: sink.data and len(sink.data[0]) == 1)
        relay.stall(0, TO_DST, 0.5)
        c.sendall(b"b" * 10)
        sink.wait(lambda: len(sink.data[0]) == 11)
        c.close()


def test_blackhole_swallows_silently_and_keeps_sockets_open(sink):
    with FaultRelay(sink.uri) as relay:
        relay.blackhole(0, TO_DST, at=4096)
        c = connect(relay.uri)
        c.sendall(PAYLOAD * 8)  # never held back: the relay reads and drops
        relay.wait_bytes(0, TO_DST, 8 * len(PAYLOAD))
        cnt = relay.counters()[0][TO_DST]
        assert cnt["forwarded"] == 4096 and cnt["dropped"] == 8 * len(PAYLOAD) - 4096
        sink.wait(lambda: len(sink.data[0]) == 4096)
        # No end of stream, no reset: the destination just hears nothing more.
        r, _, _ = select.select([sink.conns[0]], [], [], 0.3)
        assert not r and 0 not in sink.outcome
        # The other direction still works.
        sink.conns[0].sendall(b"pong")
        assert c.recv(4) == b"pong"
        c.close()


def test_faults_armed_for_later_connections_and_bad_requests(sink):
    with FaultRelay(sink.uri) as relay:
        relay.truncate(2, TO_SRC, 3)  # the third connection's return bytes
        with pytest.raises(RelayError, match="direction"):
            relay.stall(0, "sideways", 1)
        with pytest.raises(RelayError, match="mask"):
            relay.flip(0, TO_DST, 1, mask=0)
        with pytest.raises(RelayError, match="has not arrived"):
            relay.conn(0)
        cs = []
        for i in range(3):
            cs.append(connect(relay.uri))
            relay.wait_connections(i + 1)
        sink.wait(lambda: len(sink.conns) == 3)
        sink.conns[2].sendall(b"abcdef")
        got = b""
        while True:
            b = cs[2].recv(10)
            if not b:
                break
            got += b
        assert got == b"abc"
        cs[0].sendall(b"still fine")
        sink.wait(lambda: bytes(sink.data[0]) == b"still fine")
        for c in cs:
            c.close()
    with pytest.raises(RelayError, match="expected tcp"):
        FaultRelay("unix:/tmp/x")


# --- process faults -----------------------------------------------------------------

def _child():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)


def test_stop_cont_and_kill_a_process():
    p = _child()
    try:
        proc = psutil.Process(p.pid)
        with stopped(p.pid):
            deadline = time.monotonic() + 10
            while proc.status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
                time.sleep(0.01)
            assert proc.status() == psutil.STATUS_STOPPED
        deadline = time.monotonic() + 10
        while proc.status() == psutil.STATUS_STOPPED and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.status() != psutil.STATUS_STOPPED
        t = stop_for(p.pid, 0.2, background=True)
        t.join(10)
        assert not t.is_alive()
        sigkill(p)
        assert p.returncode == -signal.SIGKILL
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
        sigcont(p.pid)  # a gone process is ignored
