"""How background writes break for requests (preempt-write-breaks, engine/send_loop.py):
socket-driven writes (QEMUFileWriter.flush_drain: non-blocking sendmsg, poll on the socket
and an eventfd), and the step / floor / idle / socket modes end to end. Real sockets, the
destination's decoder on the bytes; the guarantees of tests/test_write_breaks.py hold in
every mode: a host page never spans two channels, a request for the page being written
finishes on PRECOPY, requested pages are served mid-record."""
import os
import socket
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry_migrate.channels import codec
from ferry_migrate.channels.errors import ChannelError
from ferry_migrate.channels.iovec import iovec_of
from ferry_migrate.channels.qemufile import QEMUFileWriter
from ferry_migrate.channels.transport import SocketTransport
from ferry_migrate.engine.local import GuestConfig, run_local_migration
from ferry_migrate.engine.params import MigrationConfig
from ferry_migrate.engine.send_loop import BREAK_MODES, WRITE_RUN_PAGES
from ferry_migrate.engine.workload import WorkloadConfig

from .test_preempt import PREEMPT, SLOW, check, huge_guest
from .test_write_breaks import TPH, WAIT, Harness, _recv_all, decode


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


# --- the writer ---

@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.tuples(st.sampled_from(["small", "ref", "iovec"]), st.integers(1, 300000)),
                      min_size=1, max_size=6),
       every=st.integers(1, 5))
def test_flush_drain_puts_the_bytes_flush_puts(parts, every):
    rng = np.random.default_rng(sum(n for _, n in parts) + every)
    bufs = [rng.integers(0, 256, n, dtype=np.uint8) for _, n in parts]
    a, b = socket.socketpair()
    w = QEMUFileWriter(SocketTransport(a), name="precopy")
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)  # after the transport sized it: many partial writes
    w.auto_flush = 1 << 30
    fd = _eventfd()
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(_recv_all(b)), daemon=True)
    looks = [0]
    calls = []

    def pending():
        looks[0] += 1
        return looks[0] % every == 0

    try:
        for (kind, _), buf in zip(parts, bufs):
            if kind == "small":
                w.put_bytes(buf.tobytes())
            elif kind == "ref":
                w.put_ref(memoryview(buf))
            else:
                w.put_iovec(iovec_of(buf), len(buf), keep=buf, flush=False)
        reader.start()
        assert w.can_drain()
        w.flush_drain(fd, pending, lambda: calls.append(w.transferred))
        a.shutdown(socket.SHUT_WR)
        reader.join(WAIT)
    finally:
        os.close(fd)
        a.close()
        b.close()
    want = b"".join(x.tobytes() for x in bufs)
    assert bytes(got) == want and w.transferred == len(want)
    assert calls == sorted(calls) and all(c < len(want) for c in calls)  # between writes, never after the last


def test_flush_drain_is_woken_by_the_eventfd_while_the_socket_is_full():
    a, b = socket.socketpair()
    w = QEMUFileWriter(SocketTransport(a), name="precopy")
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)  # after the transport sized it
    w.auto_flush = 1 << 30
    data = np.arange(4 << 20, dtype=np.uint8)
    w.put_iovec(iovec_of(data), len(data), keep=data, flush=False)
    fd = _eventfd()
    flag = threading.Event()
    served = []

    def between():
        served.append(w.transferred)
        flag.clear()

    def poke():
        time.sleep(0.2)  # the writer is in poll(): nobody reads, the socket is full
        flag.set()
        os.eventfd_write(fd, 1)

    got = bytearray()

    def reader():
        deadline = time.monotonic() + WAIT
        while not served and time.monotonic() < deadline:
            time.sleep(0.01)
        got.extend(_recv_all(b))

    threads = [threading.Thread(target=f, daemon=True) for f in (poke, reader)]
    try:
        for t in threads:
            t.start()
        w.flush_drain(fd, flag.is_set, between)
        a.shutdown(socket.SHUT_WR)
        for t in threads:
            t.join(WAIT)
    finally:
        os.close(fd)
        a.close()
        b.close()
    # Served while the record was half written and the socket full, not when it drained.
    assert len(served) == 1 and 0 < served[0] < len(data)
    assert bytes(got) == data.tobytes()


def test_flush_drain_times_out_when_nothing_is_read():
    a, b = socket.socketpair()
    w = QEMUFileWriter(SocketTransport(a), name="precopy")
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)  # after the transport sized it
    w.timeout = 0.3
    data = np.zeros(1 << 20, dtype=np.uint8)
    w.put_iovec(iovec_of(data), len(data), keep=data, flush=False)
    fd = _eventfd()
    try:
        with pytest.raises(ChannelError):
            w.flush_drain(fd, lambda: False, lambda: None)
        with pytest.raises(ChannelError):
            w.put_bytes(b"x")  # sticky
    finally:
        os.close(fd)
        a.close()
        b.close()


# --- the send loop, socket-driven ---

def test_socket_mode_serves_a_request_while_a_record_is_half_written():
    h = Harness(True)
    h.loop.breaks = "socket"
    requested = 2 * TPH  # host page 2, while host page 0 is being written
    page_done = threading.Event()
    seen = []

    def precopy_reader():
        h.loop.wake()  # as the return-path thread does after queueing (the queue itself is looked at too)
        seen.append(h.read_precopy_requesting(requested, page_done.is_set))

    def postcopy_reader():
        h.postcopy.extend(h.qb.recv(1 << 20))
        while len(h.postcopy) < TPH * codec.PAGE_RECORD:
            h.postcopy.extend(h.qb.recv(1 << 20))
        page_done.set()
        h.postcopy.extend(_recv_all(h.qb))

    try:
        pre_pages, pre_ends, post_pages = h.run_readers((precopy_reader, postcopy_reader), True)
        assert page_done.is_set()
    finally:
        h.close()
    assert post_pages == list(range(requested, requested + TPH))
    assert pre_pages == [p for p in range(h.blk.npages) if not requested <= p < requested + TPH]
    assert h.loop.served_mid_record == 1  # served inside host page 0's record, not after it
    _, hp, written, size = h.loop.mid_record_log[0]
    assert hp == requested and 0 < written < size and size >= WRITE_RUN_PAGES * codec.PAGE_RECORD
    first_record_end = next(pos for n, pos in pre_ends if n >= WRITE_RUN_PAGES)
    assert seen[0] < first_record_end
    assert h.sched.preemptions == 0


def test_socket_mode_drops_a_request_for_the_page_being_written():
    h = Harness(True)
    h.loop.breaks = "socket"

    def precopy_reader():
        h.precopy.extend(h.pb.recv(4096))
        with h.lock:
            h.sched.request(0, 0)  # host page 0: the one on the PRECOPY channel
        h.loop.wake()
        h.precopy.extend(_recv_all(h.pb))

    t = threading.Thread(target=precopy_reader, daemon=True)
    try:
        t.start()
        h.send_all()
        t.join(WAIT)
        h.postcopy += _recv_all(h.qb)
        pre_pages, _ = decode(bytes(h.precopy), True, "precopy")
        post_pages, _ = decode(bytes(h.postcopy), True, "postcopy-1")
    finally:
        h.close()
    assert h.sched.dropped_in_flight == 1 and h.loop.served_mid_record == 0
    assert post_pages == []  # a host page never spans two channels
    assert pre_pages == list(range(h.blk.npages))


# --- end to end, every mode ---

def test_the_parameter_names_the_modes():
    cfg = MigrationConfig()
    assert cfg.param("preempt-write-breaks") == "step"
    for mode in BREAK_MODES:
        cfg.set_parameters({"preempt-write-breaks": mode})
    with pytest.raises(Exception, match="preempt-write-breaks"):
        cfg.set_parameters({"preempt-write-breaks": "sometimes"})


@pytest.mark.parametrize("mode", BREAK_MODES)
def test_migration_in_each_break_mode_keeps_the_guest(mode):
    src, dst = run_local_migration("tcp:127.0.0.1:0", huge_guest(), caps=PREEMPT,
                                   params={**SLOW, "preempt-write-breaks": mode}, timeout=120)
    check(src, dst)
    assert src["postcopy-requests"] >= 1
    assert src["restores"] == src["preemptions"]


@pytest.mark.parametrize("urgent", ["migration-thread", "return-path"])
def test_small_pages_socket_mode_keeps_the_guest(urgent):
    g = GuestConfig(size=64 << 20, fill="pattern", workload=WorkloadConfig(dirty_rate=16 << 20),
                    dest_workload=WorkloadConfig(threads=2, pattern="random", dirty_rate=4 << 20, batch=1))
    src, dst = run_local_migration("tcp:127.0.0.1:0", g, caps=PREEMPT,
                                   params={**SLOW, "preempt-write-breaks": "socket", "urgent-pages-from": urgent},
                                   timeout=120)
    check(src, dst)
    assert src["postcopy-requests"] >= 1
