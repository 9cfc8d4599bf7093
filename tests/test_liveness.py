"""Liveness at the transport: keepalive/TCP_USER_TIMEOUT, send and recv bounds, PeerTimeout.

Peers are real child processes stopped with SIGSTOP, and real connections
black-holed or stalled by tests/faultrelay.py. Timeouts are the behaviour under
test here, so they are short, and every bound on how soon one fires is several
times the timeout.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from ferry_migrate.channels.errors import ChannelError, PeerTimeout
from ferry_migrate.channels.qemufile import QEMUFileReader, QEMUFileWriter
from ferry_migrate.channels.transport import TCP_USER_TIMEOUT, Listener, SocketTransport, connect, keepalive_settings
from ferry_migrate.engine.params import PARAMETERS

from .faultrelay import TO_DST, FaultRelay, sigcont, sigstop

CHUNK = 1 << 20
BOUND = 60.0  # s: generous upper bound for a timeout of a few seconds to fire under load

# A peer in a child process. "read": read to EOF, print the byte count and a
# checksum. "write N": send 1 MiB, wait for one byte from the parent, send
# N-1 more MiB, close.
PEER = r"""
import socket, sys, zlib
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port))
if mode == "read":
    n, crc = 0, 0
    while True:
        b = s.recv(1 << 16)
        if not b:
            break
        n += len(b)
        crc = zlib.crc32(b, crc)
    print(n, crc, flush=True)
else:
    chunk = bytes(range(256)) * 4096
    s.sendall(chunk)
    s.recv(1)
    for _ in range(int(sys.argv[4]) - 1):
        s.sendall(chunk)
    s.close()
"""


def spawn_peer(listener: Listener, *args) -> subprocess.Popen:
    u = listener.uri
    return subprocess.Popen([sys.executable, "-c", PEER, u.host, str(u.port), *args],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)


@pytest.fixture
def peers():
    started = []
    yield started
    for p in started:
        sigcont(p.pid)
        if p.poll() is None:
            p.kill()
        p.wait(10)
        if p.stdout:
            p.stdout.close()


def timeo(sock: socket.socket, opt: int) -> float:
    sec, usec = struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, opt, 16))
    return sec + usec / 1e6


# --- settings ---------------------------------------------------------------------------

def test_parameter_default_and_range():
    spec = PARAMETERS["liveness-timeout"]
    assert spec.default == 30 and spec.lo == 0 and spec.unit == "seconds" and spec.implemented


@pytest.mark.parametrize("seconds", [0.5, 1, 2, 3, 7, 10, 30, 59.5, 600, 86400])
def test_keepalive_settings_add_up_to_the_timeout(seconds):
    idle, intvl, cnt = keepalive_settings(seconds)
    assert idle >= 1 and intvl >= 1 and 1 <= cnt <= 127
    total = idle + intvl * cnt
    # A dead peer is given up on around the timeout (whole seconds, at least 1 probe).
    assert total >= min(seconds, idle + intvl)
    assert total <= max(seconds, 2) + intvl
    with pytest.raises(ValueError, match="liveness timeout"):
        keepalive_settings(0)


def test_tcp_options_and_socket_timeouts_are_set():
    lst = Listener("tcp:127.0.0.1:0", liveness=6)
    try:
        src = connect(lst.uri, liveness=6)
        dst = lst.accept(10)
        for t in (src, dst):
            s = t.sock
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 2
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 1
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
            assert s.getsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT) == 6000
        w, r = QEMUFileWriter(src, name="precopy"), QEMUFileReader(dst, name="precopy")
        assert w.timeout == 6 and r.idle_timeout == 6
        assert timeo(src.sock, socket.SO_SNDTIMEO) == 6 and timeo(dst.sock, socket.SO_RCVTIMEO) == 6
        rp = QEMUFileReader(src, name="return-path")
        rp.idle_timeout = None  # opted out: waits without bound; the send bound is untouched
        assert timeo(src.sock, socket.SO_RCVTIMEO) == 0 and timeo(src.sock, socket.SO_SNDTIMEO) == 6
        rp.idle_timeout = 0.25
        assert timeo(src.sock, socket.SO_RCVTIMEO) == pytest.approx(0.25, abs=0.01)  # in jiffies
        # Liveness off: no keepalive, no bounds.
        off = connect(lst.uri, liveness=0)
        lst.accept(10).close()
        assert off.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert QEMUFileWriter(off).timeout is None and timeo(off.sock, socket.SO_SNDTIMEO) == 0
        for t in (src, dst, off):
            t.close()
    finally:
        lst.close()


# --- a stopped peer -----------------------------------------------------------------------

def _write_until(w: QEMUFileWriter, total: int, stop_after: int = -1, on_stop=None) -> None:
    buf = bytes(range(256)) * (CHUNK // 256)
    for i in range(total // CHUNK):
        if i == stop_after and on_stop is not None:
            on_stop()
        w.put_ref(buf)
        w.flush()


def test_writer_survives_a_peer_stopped_for_less_than_the_timeout(peers):
    lst = Listener("tcp:127.0.0.1:0", liveness=8)
    p = spawn_peer(lst, "read")
    peers.append(p)
    t = lst.accept(30)
    lst.close()
    w = QEMUFileWriter(t, name="precopy")
    stopper = []

    def stop():
        sigstop(p.pid)
        th = threading.Timer(1.0, sigcont, args=(p.pid,))
        th.start()
        stopper.append(th)

    # 96 MiB: far more than the socket buffers hold, so the writer waits out the stop.
    _write_until(w, 96 * CHUNK, stop_after=4, on_stop=stop)
    t.shutdown_write()
    out = p.stdout.readline().split()
    stopper[0].join()
    assert int(out[0]) == 96 * CHUNK
    t.close()


def test_writer_to_a_peer_stopped_longer_gets_peer_timeout(peers):
    lst = Listener("tcp:127.0.0.1:0", liveness=2)
    p = spawn_peer(lst, "read")
    peers.append(p)
    t = lst.accept(30)
    lst.close()
    w = QEMUFileWriter(t, name="precopy")
    t0 = []
    with pytest.raises(PeerTimeout) as ei:
        _write_until(w, 1 << 40, stop_after=4, on_stop=lambda: (sigstop(p.pid), t0.append(time.monotonic())))
    waited = time.monotonic() - t0[0]
    e = ei.value
    assert e.channel == "precopy" and e.direction == "send" and e.seconds == 2
    assert "precopy" in str(e) and "send" in str(e) and "2 s" in str(e)
    assert waited < BOUND
    # Sticky: the next call fails the same way, without waiting.
    with pytest.raises(PeerTimeout):
        w.put_bytes(b"x")
    t.close()


@pytest.mark.parametrize("stop_seconds,liveness", [(1.0, 8), (None, 2)])
def test_reader_from_a_stopped_peer(peers, stop_seconds, liveness):
    lst = Listener("tcp:127.0.0.1:0", liveness=liveness)
    p = spawn_peer(lst, "write", "16")
    peers.append(p)
    t = lst.accept(30)
    lst.close()
    r = QEMUFileReader(t, name="precopy")
    assert r.fill(CHUNK)
    r.consume(CHUNK)
    sigstop(p.pid)
    t.sock.sendall(b"g")  # the peer sends the rest once it runs again
    if stop_seconds is not None:
        threading.Timer(stop_seconds, sigcont, args=(p.pid,)).start()
        got = CHUNK
        while r.fill(1):
            got += r.available()
            r.consume(r.available())
        assert got == 16 * CHUNK
    else:
        t0 = time.monotonic()
        with pytest.raises(PeerTimeout) as ei:
            r.fill(1)
        assert time.monotonic() - t0 < BOUND
        assert (ei.value.channel, ei.value.direction, ei.value.seconds) == ("precopy", "recv", 2)
    t.close()


# --- other transports, idle channels --------------------------------------------------

def test_unix_socket_reader_times_out_unless_it_opted_out():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ta, tb = SocketTransport(a, "unix:pair", liveness=0.5), SocketTransport(b, "unix:pair", liveness=0.5)
    try:
        r = QEMUFileReader(tb, name="postcopy")
        with pytest.raises(PeerTimeout) as ei:
            r.fill(1)
        assert ei.value.direction == "recv" and ei.value.channel == "postcopy"
        # An idle channel opts out: it waits past the timeout for its peer.
        r2 = QEMUFileReader(ta, name="postcopy1")
        r2.idle_timeout = None
        threading.Timer(1.5, lambda: b.sendall(b"late")).start()
        assert r2.fill(4) and bytes(r2.view()) == b"late"
    finally:
        ta.close()
        tb.close()


def test_shutdown_still_wins_over_a_bounded_wait():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    tb = SocketTransport(b, "unix:pair", liveness=30)
    r = QEMUFileReader(tb, name="precopy")
    threading.Timer(0.2, r.shutdown).start()
    with pytest.raises(ChannelError) as ei:
        r.fill(1)
    assert not isinstance(ei.value, PeerTimeout) and "shut down" in str(ei.value)
    a.close()
    tb.close()


# --- through the relay ------------------------------------------------------------------

def test_black_holed_connection_gives_the_receiver_peer_timeout():
    lst = Listener("tcp:127.0.0.1:0", liveness=2)
    with FaultRelay(str(lst.uri)) as relay:
        relay.blackhole(0, TO_DST, at=3 * CHUNK + 5)
        src = connect(relay.uri, liveness=2)
        dst = lst.accept(30)
        w, r = QEMUFileWriter(src, name="precopy"), QEMUFileReader(dst, name="precopy")
        # The sender is never held back: the relay swallows what it sends.
        _write_until(w, 8 * CHUNK)
        t0 = time.monotonic()
        got = 0
        with pytest.raises(PeerTimeout) as ei:
            while True:
                r.fill(1)
                got += r.available()
                r.consume(r.available())
        assert time.monotonic() - t0 < BOUND
        assert got == 3 * CHUNK + 5 and ei.value.direction == "recv"
        src.close()
        dst.close()
    lst.close()


def test_stalled_connection_gives_the_sender_peer_timeout():
    lst = Listener("tcp:127.0.0.1:0", liveness=2)
    with FaultRelay(str(lst.uri)) as relay:
        relay.stall(0, TO_DST, 600, at=CHUNK)  # the relay stops reading: buffers fill
        src = connect(relay.uri, liveness=2)
        dst = lst.accept(30)
        w = QEMUFileWriter(src, name="postcopy1")
        with pytest.raises(PeerTimeout) as ei:
            _write_until(w, 1 << 40)
        assert (ei.value.channel, ei.value.direction) == ("postcopy1", "send")
        src.close()
        dst.close()
    lst.close()


def test_reader_sharing_a_reset_connection_never_sees_a_clean_end():
    # The kernel reports a reset (or TCP_USER_TIMEOUT) to one call; the other
    # direction's reader then reads EOF. It must still fail, not end cleanly.
    for _ in range(5):
        lst = Listener("tcp:127.0.0.1:0", liveness=30)
        src = connect(lst.uri, liveness=30)
        peer = lst.accept(10)
        lst.close()
        w, r = QEMUFileWriter(src, name="precopy"), QEMUFileReader(src, name="return-path")
        result = []

        def read():
            try:
                result.append(r.fill(1))
            except ChannelError as e:
                result.append(e)

        th = threading.Thread(target=read)
        th.start()
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # reset
        with pytest.raises(ChannelError):
            _write_until(w, 1 << 40)
        th.join(10)
        assert isinstance(result[0], ChannelError) and not isinstance(result[0], PeerTimeout), result
        assert "shut down" not in str(result[0])
        src.close()


# --- a dead link, in network namespaces ----------------------------------------------------

def _in_netns(ns: str, fn):
    """Run ``fn`` in a thread that joined network namespace ``ns`` (its sockets stay there)."""
    from ferry_migrate.engine.testbed import enter_netns

    out = {}

    def run():
        try:
            enter_netns(ns)
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    if "error" in out:
        raise out["error"]
    return out["value"]


def _expect_timeout(fn, box: list) -> threading.Thread:
    def run():
        t0 = time.monotonic()
        try:
            fn()
            box.append(("no error", 0.0))
        except BaseException as e:  # noqa: BLE001 - checked by the test
            box.append((e, time.monotonic() - t0))

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def test_pulled_cable_fails_busy_and_idle_channels():
    """The destination's link goes down: packets vanish, no FIN, no reset, sockets open.

    The source's sender fails (its send bound or TCP_USER_TIMEOUT), the destination's
    receiver fails (its recv bound), and an idle reader without a recv bound (like the
    source's return path) fails too: its keepalive probes go unanswered.
    """
    from ferry_migrate.engine.testbed import Testbed, TestbedUnavailable

    tb = Testbed()
    try:
        tb.setup()
    except TestbedUnavailable as e:
        pytest.skip(str(e))
    T = 3
    socks = []
    try:
        lst = _in_netns(tb.ns["b"], lambda: Listener(f"tcp:{tb.address('b')}:0", liveness=T))
        socks.append(lst)
        src = _in_netns(tb.ns["a"], lambda: connect(lst.uri, liveness=T))
        dst = lst.accept(10)
        idle_src = _in_netns(tb.ns["a"], lambda: connect(lst.uri, liveness=T))
        idle_dst = lst.accept(10)
        socks += [src, dst, idle_src, idle_dst]
        w, r = QEMUFileWriter(src, name="precopy"), QEMUFileReader(dst, name="precopy")
        rp = QEMUFileReader(idle_src, name="return-path")
        rp.idle_timeout = None
        w.put_bytes(b"x" * 1000)
        w.flush()
        assert r.fill(1000)
        r.consume(1000)

        tb.exec("b", "ip", "link", "set", tb.link("a", "b").ifname, "down")
        got_r, got_rp = [], []
        threads = [_expect_timeout(lambda: r.fill(1), got_r), _expect_timeout(lambda: rp.fill(1), got_rp)]
        t0 = time.monotonic()
        with pytest.raises(PeerTimeout) as ei:
            _write_until(w, 1 << 40)
        assert time.monotonic() - t0 < BOUND and ei.value.direction == "send"
        for th in threads:
            th.join(BOUND)
        (er, dr), (erp, drp) = got_r[0], got_rp[0]
        assert isinstance(er, PeerTimeout) and er.direction == "recv" and dr < BOUND, got_r
        assert isinstance(erp, PeerTimeout) and "kernel gave up" in str(erp) and drp < BOUND, got_rp
        assert erp.channel == "return-path"
    finally:
        for s in socks:
            s.close()
        tb.teardown()
