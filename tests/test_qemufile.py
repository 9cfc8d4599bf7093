"""QEMUFile writer and reader (channels/qemufile.py) over real socketpairs.

Covers big-endian put/get round trips, page data queued by reference (what
is in the buffer at flush time is what goes out), bytes-transferred
accounting, the sticky error, shutdown() unblocking a thread stuck in recv or
in send, and the rate limit (including 0 = unlimited).
"""
from __future__ import annotations

import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry_migrate.channels import qemufile
from ferry_migrate.channels.errors import ChannelError, ProtocolError
from ferry_migrate.channels.qemufile import QEMUFileReader, QEMUFileWriter

from .conftest import wait_blocked_in_io, wait_until
from ferry_migrate.channels.transport import SocketTransport


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    ta, tb = SocketTransport(a, "a"), SocketTransport(b, "b")
    yield ta, tb
    a.close()
    b.close()


def _reader_thread(reader, n, out):
    try:
        out.append(reader.get_bytes(n))
    except BaseException as e:  # noqa: BLE001 - handed to the test
        out.append(e)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([8, 16, 32, 64]), st.integers(0, 2**64 - 1)), max_size=50))
def test_put_get_round_trip(values):
    a, b = socket.socketpair()
    try:
        w = QEMUFileWriter(SocketTransport(a))
        r = QEMUFileReader(SocketTransport(b), bufsize=16)  # tiny buffer: refills and compaction
        vals = [(bits, v & ((1 << bits) - 1)) for bits, v in values]
        for bits, v in vals:
            {8: w.put_byte, 16: w.put_be16, 32: w.put_be32, 64: w.put_be64}[bits](v)
        w.put_bytes(b"tail")
        w.flush()
        for bits, v in vals:
            got = {8: r.get_byte, 16: r.get_be16, 32: r.get_be32, 64: r.get_be64}[bits]()
            assert got == v
        assert r.get_bytes(4) == b"tail"
        size = sum(bits // 8 for bits, _ in vals) + 4
        assert w.transferred == size
        assert r.transferred == size
    finally:
        a.close()
        b.close()


def test_big_endian_on_the_wire(pair):
    ta, tb = pair
    w = QEMUFileWriter(ta)
    w.put_be16(0x0102)
    w.put_be32(0x03040506)
    w.put_be64(0x0708090A0B0C0D0E)
    w.put_byte(0x1FF)  # only the low byte
    w.flush()
    assert tb.sock.recv(100) == bytes(range(1, 15)) + b"\xff"


def test_put_ref_is_by_reference(pair):
    """put_ref queues the buffer itself: a change before flush is what arrives."""
    ta, tb = pair
    w = QEMUFileWriter(ta)
    page = bytearray(b"A" * 4096)
    w.put_byte(1)
    w.put_ref(memoryview(page))
    w.put_byte(2)
    page[:] = b"B" * 4096  # after queueing, before flush
    assert w.pending() == 4098
    assert w.transferred == 0  # nothing went out yet
    w.flush()
    r = QEMUFileReader(tb)
    assert r.get_byte() == 1
    assert r.get_bytes(4096) == b"B" * 4096
    assert r.get_byte() == 2
    assert w.transferred == 4098 and w.pending() == 0


def test_put_iov_and_auto_flush(pair):
    ta, tb = pair
    w = QEMUFileWriter(ta)
    page = bytes(range(256)) * 16
    views = [memoryview(page)] * 8
    w.put_iov(views, 8 * 4096)
    assert w.pending() == 8 * 4096 and w.transferred == 0
    received = []
    r = QEMUFileReader(tb)
    t = threading.Thread(target=_reader_thread, args=(r, 8 * 4096 + qemufile.AUTO_FLUSH_BYTES, received))
    t.start()
    # Past AUTO_FLUSH_BYTES queued, put_ref flushes by itself.
    big = bytearray(qemufile.AUTO_FLUSH_BYTES)
    w.put_ref(memoryview(big))
    assert w.pending() == 0
    assert w.transferred == 8 * 4096 + len(big)
    t.join(10)
    assert received[0] == page * 8 + bytes(len(big))


def test_large_get_grows_the_reader_buffer(pair):
    ta, tb = pair
    w = QEMUFileWriter(ta)
    blob = bytes(range(251)) * 400  # 100 KB > the reader's 4 KiB buffer
    r = QEMUFileReader(tb, bufsize=4096)
    got = []
    t = threading.Thread(target=_reader_thread, args=(r, 1 + len(blob), got))
    t.start()
    w.put_bytes(b"x")
    w.put_ref(blob)
    w.flush()
    t.join(10)
    assert got[0] == b"x" + blob
    assert r.transferred == 1 + len(blob)


def test_reader_truncated_stream_names_the_field(pair):
    ta, tb = pair
    ta.sock.sendall(b"\x00\x01\x02")
    ta.shutdown_write()
    r = QEMUFileReader(tb)
    with pytest.raises(ProtocolError) as ei:
        r.get_be64("RAM record header")
    assert "RAM record header needs 8 bytes, 3 left" in str(ei.value)
    assert r.eof


def test_reader_clean_eof(pair):
    ta, tb = pair
    ta.sock.sendall(b"ab")
    ta.shutdown_write()
    r = QEMUFileReader(tb)
    assert r.fill(2)
    assert r.get_bytes(2) == b"ab"
    assert r.fill(1) is False


def test_sticky_write_error(pair):
    """After a failed write every later call raises the same error."""
    ta, tb = pair
    tb.sock.close()
    w = QEMUFileWriter(ta, name="precopy")
    w.put_bytes(b"x" * 1000)
    with pytest.raises(ChannelError) as first:
        w.flush()
    msg = str(first.value)
    assert msg.startswith("precopy: write failed")
    cause = w.error
    assert isinstance(cause, ChannelError)
    calls = [lambda: w.put_byte(1), lambda: w.put_be16(1), lambda: w.put_be32(1), lambda: w.put_be64(1),
             lambda: w.put_bytes(b"a"), lambda: w.put_ref(b"abc"), lambda: w.put_iov([b"a"], 1), w.flush]
    for call in calls:
        with pytest.raises(ChannelError) as later:
            call()
        assert str(later.value) == msg
        assert later.value.__cause__ is cause
    # A later error does not replace the first.
    w.set_error(ChannelError("something else"))
    assert w.error is cause


def test_sticky_read_error(pair):
    ta, tb = pair
    r = QEMUFileReader(tb, name="rp")
    r.set_error(ChannelError("boom"))
    for call in (r.get_byte, r.get_be16, r.get_be32, r.get_be64, lambda: r.get_bytes(3), r.fill):
        with pytest.raises(ChannelError, match="^rp: boom$"):
            call()


def test_shutdown_unblocks_reader_stuck_in_recv(pair):
    ta, tb = pair
    r = QEMUFileReader(tb)
    result = []

    def run():
        try:
            result.append(r.fill(8))
        except BaseException as e:  # noqa: BLE001
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_blocked_in_io(t)  # in recv, not just started
    assert t.is_alive() and not result, "the reader should be blocked in recv"
    r.shutdown()
    t.join(5)
    assert not t.is_alive(), "shutdown() did not unblock recv"
    # Not a clean end of stream: the reader reports why it stopped.
    assert isinstance(result[0], ChannelError) and "shut down" in str(result[0])
    with pytest.raises(ChannelError, match="shut down"):
        r.get_byte()


def test_shutdown_unblocks_writer_stuck_in_send(pair):
    ta, tb = pair
    ta.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    w = QEMUFileWriter(ta)
    result = []
    big = bytes(8 << 20)  # far more than the socket buffers hold; nobody reads

    def run():
        try:
            w.put_ref(big)
            w.flush()
            result.append("sent")
        except BaseException as e:  # noqa: BLE001
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_blocked_in_io(t)  # in send with full socket buffers
    assert t.is_alive() and not result, "the writer should be blocked in send"
    w.shutdown()
    t.join(5)
    assert not t.is_alive(), "shutdown() did not unblock send"
    assert isinstance(result[0], ChannelError)
    with pytest.raises(ChannelError, match="shut down|write failed"):
        w.put_byte(0)


def _timed_send(ta, tb, rate: int, nbytes: int, chunk: int = 64 << 10) -> float:
    t0 = time.monotonic()  # the limiter's budget starts when the writer is made
    w = QEMUFileWriter(ta, rate_limit=rate)
    got = []
    r = QEMUFileReader(tb)
    t = threading.Thread(target=_reader_thread, args=(r, nbytes, got))
    t.start()
    data = bytes(chunk)
    for _ in range(nbytes // chunk):
        w.put_ref(data)
        w.flush()
    elapsed = time.monotonic() - t0
    t.join(10)
    assert len(got[0]) == nbytes
    assert w.transferred == nbytes
    return elapsed


def test_rate_limit_2mib_per_second(pair):
    """1 MiB at 2 MiB/s takes about 0.5 s: never less (a burst of 10 ms is allowed), and
    the upper bound is only a generous net (a loaded machine is slower, not faster)."""
    ta, tb = pair
    elapsed = _timed_send(ta, tb, 2 << 20, 1 << 20)
    assert 0.5 - 0.01 <= elapsed <= 10 * 0.5, elapsed


def test_rate_limit_zero_is_unlimited(pair):
    """Limit 0: every write goes through the limiter, and it never holds one back."""
    ta, tb = pair
    w = QEMUFileWriter(ta, rate_limit=0)
    assert w.limiter.consume(1 << 30) == 0.0  # never sleeps
    held = []
    consume = w.limiter.consume
    w.limiter.consume = lambda n: held.append((n, consume(n))) or held[-1][1]
    got = []
    t = threading.Thread(target=_reader_thread, args=(QEMUFileReader(tb), 4 << 20, got))
    t.start()
    for _ in range(64):
        w.put_ref(bytes(64 << 10))
        w.flush()
    t.join(60)
    assert len(got[0]) == 4 << 20
    assert sum(n for n, _ in held) == 4 << 20  # all 4 MiB were accounted ...
    assert all(s == 0.0 for _, s in held)  # ... and none waited


def test_rate_limit_can_change_and_shutdown_interrupts(pair):
    ta, tb = pair
    w = QEMUFileWriter(ta, rate_limit=1 << 20)
    assert w.rate_limit == 1 << 20
    w.rate_limit = 0
    assert w.limiter.consume(1 << 30) == 0.0
    # A sender sleeping for its budget wakes on shutdown.
    w.rate_limit = 1024  # 1 KiB/s: 64 KiB would sleep ~64 s
    done = []
    reader = threading.Thread(target=lambda: tb.sock.recv(1 << 20), daemon=True)
    reader.start()

    def run():
        try:
            w.put_ref(bytes(64 << 10))
            w.flush()
        except ChannelError as e:
            done.append(e)
        done.append("returned")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    # Sleeping for its budget: the limiter's next allowed time is about a minute ahead.
    wait_until(lambda: w.limiter._allowed_at - time.monotonic() > 30, what="the sender to wait for its budget")
    assert t.is_alive() and not done
    w.shutdown()
    t.join(5)
    assert not t.is_alive() and "returned" in done
