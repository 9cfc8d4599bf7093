"""Write breaks (engine/send_loop.py, QEMUFileWriter.flush_pieces): with postcopy-preempt a
huge page goes out on the PRECOPY channel in large records, each written in pieces, and a
request that comes in while a record is half written is served on its POSTCOPY channel at
once; the record then resumes at the byte where it stopped. Real sockets, a real
scheduler and send loop, the destination's decoder and page checks on the bytes."""
import socket
import threading
import time
from typing import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry_migrate.channels import codec
from ferry_migrate.channels.channel import RamSendChannel
from ferry_migrate.channels.codec import StreamDecoder
from ferry_migrate.channels.errors import ChannelError
from ferry_migrate.channels.pagecheck import verify_run
from ferry_migrate.channels.qemufile import QEMUFileWriter
from ferry_migrate.channels.transport import SocketTransport
from ferry_migrate.engine.bitmap import PageBitmap
from ferry_migrate.engine.ram import GuestRAM
from ferry_migrate.engine.scheduler import PageScheduler, SchedBlock
from ferry_migrate.engine.send_loop import BREAK_STEP_PAGES, WRITE_RUN_PAGES, SendLoop

TPH = 512  # target pages per 2 MiB host page
RAM = GuestRAM.create(8 << 20, 2 << 20)
RAM.fill("pattern")  # data pages only: one record per slice of a huge page
WAIT = float(__import__("os").environ.get("WB_WAIT", "60"))  # s, generous: the machine is shared


def _recv_all(sock) -> bytes:
    out = bytearray()
    while chunk := sock.recv(1 << 20):
        out += chunk
    return bytes(out)


# --- the writer ---

@settings(max_examples=80, deadline=None)
@given(parts=st.lists(st.tuples(st.sampled_from(["small", "ref", "iovec"]), st.integers(1, 20000)),
                      min_size=1, max_size=8),
       piece=st.integers(1, 70000))
def test_flush_pieces_puts_the_bytes_flush_puts(parts, piece):
    rng = np.random.default_rng(len(parts) * 7919 + piece)
    bufs = [rng.integers(0, 256, n, dtype=np.uint8) for _, n in parts]
    a, b = socket.socketpair()
    w = QEMUFileWriter(SocketTransport(a), name="precopy")
    w.auto_flush = 1 << 30  # nothing flushes before flush_pieces
    calls = []
    try:
        for (kind, _), buf in zip(parts, bufs):
            if kind == "small":
                w.put_bytes(buf.tobytes())
            elif kind == "ref":
                w.put_ref(memoryview(buf))
            else:
                w.put_iovec(codec_iovec(buf), len(buf), keep=buf, flush=False)
        total = w.pending()
        got = bytearray()
        b.setblocking(False)

        def between():
            calls.append(w.transferred)
            try:
                while chunk := b.recv(1 << 20):
                    got.extend(chunk)
            except BlockingIOError:
                pass

        w.flush_pieces(piece, between)
        a.shutdown(socket.SHUT_WR)
        b.setblocking(True)
        got += _recv_all(b)
    finally:
        a.close()
        b.close()
    assert bytes(got) == b"".join(x.tobytes() for x in bufs)
    assert w.transferred == total
    # One write per piece, the callback between two of them, after exactly `piece` bytes each.
    assert calls == list(range(piece, total, piece))


def codec_iovec(buf):
    from ferry_migrate.channels.iovec import IOVEC
    iov = np.empty(2, IOVEC)
    half = len(buf) // 2
    iov["base"] = [buf.ctypes.data, buf.ctypes.data + half]
    iov["len"] = [half, len(buf) - half]
    return iov[iov["len"] > 0]


def test_flush_pieces_failing_between_leaves_a_sticky_error():
    a, b = socket.socketpair()
    w = QEMUFileWriter(SocketTransport(a), name="precopy")
    try:
        w.put_bytes(b"x" * 1000)

        def between():
            raise RuntimeError("stop")

        with pytest.raises(RuntimeError, match="stop"):
            w.flush_pieces(100, between)
        with pytest.raises(ChannelError, match="mid-record"):
            w.put_bytes(b"y")  # the stream is cut inside a record: nothing more goes on it
        with pytest.raises(ValueError, match="piece of 0 bytes"):
            w.flush_pieces(0, lambda: None)
    finally:
        a.close()
        b.close()


# --- the send loop ---

class Harness:
    """A send loop on a PRECOPY and a POSTCOPY socket pair, the guest stopped (postcopy)."""

    def __init__(self, checks: bool, precopy_sndbuf: int = 32 << 10):
        self.blk = RAM.blocks[0]
        self.pa, self.pb = socket.socketpair()
        self.qa, self.qb = socket.socketpair()
        self.pre = RamSendChannel(QEMUFileWriter(SocketTransport(self.pa), name="precopy"), "precopy",
                                  page_checks=checks)
        self.post = RamSendChannel(QEMUFileWriter(SocketTransport(self.qa), name="postcopy-1"), "postcopy-1",
                                   page_checks=checks)
        # After the transport, which sizes a unix socket's buffer itself: the PRECOPY
        # socket holds much less than one record, so the sender cannot run ahead of
        # the reader by a record.
        self.pa.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, precopy_sndbuf)
        self.limit = 4096 + 4 * precopy_sndbuf + 2 * BREAK_STEP_PAGES * codec.PAGE_RECORD
        self.bm = PageBitmap(self.blk.npages, fill=True)
        self.lock = threading.Lock()
        self.sched = PageScheduler([SchedBlock(self.blk.npages, TPH, self.bm)], preempt=True)
        self.sched.postcopy = True
        self.loop = SendLoop(RAM, {self.blk.idstr: self.bm}, self.sched, self.lock, lambda: False)
        self.loop.channels = [self.pre, self.post]
        self.precopy = bytearray()
        self.postcopy = bytearray()

    def read_precopy_requesting(self, host_page: int, served: Callable[[], bool]) -> int:
        """The destination's PRECOPY side: read the first bytes, request ``host_page``, then
        read only as much as lets the piece being written complete (never the first
        record's end, about 1 MiB) until ``served()``; then the rest. A sender that waited
        for the record's end before serving the request would never serve it (the wait
        then ends after WAIT). Returns the bytes read when ``served()`` became true.
        """
        self.precopy += self.pb.recv(4096)
        with self.lock:
            self.sched.request(0, host_page)
        deadline = time.monotonic() + WAIT
        while not served() and time.monotonic() < deadline:
            if len(self.precopy) < self.limit:
                self.pb.settimeout(0.01)
                try:
                    self.precopy += self.pb.recv(min(4096, self.limit - len(self.precopy)))
                except TimeoutError:
                    pass
            else:
                time.sleep(0.001)
        self.pb.settimeout(None)
        seen = len(self.precopy)
        self.precopy += _recv_all(self.pb)
        return seen

    def send_all(self):
        self.loop.send_for(None)
        for ch in (self.pre, self.post):
            ch.send_eos()
            ch.flush()
        self.pa.shutdown(socket.SHUT_WR)
        self.qa.shutdown(socket.SHUT_WR)

    def run_readers(self, readers, checks: bool) -> tuple[list, list, list]:
        """Start ``readers`` (functions) in threads, send everything, join them; decode both
        streams -> (PRECOPY pages, PRECOPY record ends, POSTCOPY pages)."""
        threads = [threading.Thread(target=f, daemon=True) for f in readers]
        for t in threads:
            t.start()
        self.send_all()
        for t in threads:
            t.join(WAIT)
        pre_pages, pre_ends = decode(bytes(self.precopy), checks, "precopy")
        post_pages, _ = decode(bytes(self.postcopy), checks, "postcopy-1")
        return pre_pages, pre_ends, post_pages

    def close(self):
        for s in (self.pa, self.pb, self.qa, self.qb):
            s.close()


def decode(data: bytes, checks: bool, mode: str) -> tuple[list, list]:
    """Pages of a channel's bytes in order, each run checked; and the byte offset where each run ends."""
    blk = RAM.blocks[0]
    dec = StreamDecoder([blk.info], mode="pages", channel_name=mode)
    pos, seen, ends, mv = 0, [], [], memoryview(data)
    while True:
        ev, n = dec.next_event(mv[pos:])
        assert ev is not codec.NEED_DATA
        pos += n
        if isinstance(ev, codec.RamEOS):
            return seen, ends
        if isinstance(ev, codec.RamRun):
            verify_run(ev, mode, required=checks)
            assert ev.data is not None and (ev.data == blk.pages[ev.pages]).all()
            seen += ev.pages.tolist()
            ends.append((len(seen), pos))


@pytest.mark.parametrize("checks", [True, False], ids=["page-checksums", "no-checks"])
def test_request_served_while_a_record_is_half_written(checks):
    h = Harness(checks)
    requested = 2 * TPH  # host page 2, while host page 0 is being written
    page_done = threading.Event()
    seen_precopy = []

    def precopy_reader():
        seen_precopy.append(h.read_precopy_requesting(requested, page_done.is_set))

    def postcopy_reader():
        dec = StreamDecoder([h.blk.info], mode="pages", channel_name="postcopy-1")
        pos, pages = 0, 0
        while chunk := h.qb.recv(1 << 20):
            h.postcopy += chunk
            while True:
                ev, n = dec.next_event(memoryview(bytes(h.postcopy[pos:])))
                if ev is codec.NEED_DATA:
                    break
                pos += n
                if isinstance(ev, codec.RamRun):
                    pages += len(ev.pages)
                    del ev  # a view of the bytes above
                    if pages == TPH:
                        page_done.set()

    try:
        pre_pages, pre_ends, post_pages = h.run_readers((precopy_reader, postcopy_reader), checks)
        assert page_done.is_set()
    finally:
        h.close()
    # The requested page on its POSTCOPY channel, whole; every other page once, in order, on PRECOPY.
    assert post_pages == list(range(requested, requested + TPH))
    assert pre_pages == [p for p in range(h.blk.npages) if not requested <= p < requested + TPH]
    # It was served inside the first record of host page 0, not after it ...
    assert h.loop.served_mid_record == 1
    blk_i, hp, written, size = h.loop.mid_record_log[0]
    assert (blk_i, hp) == (0, requested)
    assert 0 < written < size and size >= WRITE_RUN_PAGES * codec.PAGE_RECORD
    # ... as the destination saw it: the page complete before the record's last byte came in.
    first_record_end = next(pos for n, pos in pre_ends if n >= WRITE_RUN_PAGES)
    assert seen_precopy[0] < first_record_end
    # Records stayed large: host page 0 and 1 in records of WRITE_RUN_PAGES, none cut short.
    sizes = np.diff([0] + [n for n, _ in pre_ends])
    assert sizes.sum() == len(pre_pages) and sizes.max() >= WRITE_RUN_PAGES // 2
    assert h.sched.preemptions == 0 and h.sched.counters()["restores"] == 0


def test_request_for_the_page_being_written_is_dropped_and_it_finishes_here():
    h = Harness(True)

    def precopy_reader():
        # host page 0: the one on the PRECOPY channel
        h.read_precopy_requesting(0, lambda: h.sched.dropped_in_flight > 0)

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
    assert h.sched.preemptions == 0  # dropped while the record was half written, not at its end
    assert post_pages == []  # a host page never spans two channels
    assert pre_pages == list(range(h.blk.npages))


def test_write_breaks_off_sends_break_step_records():
    h = Harness(True, precopy_sndbuf=8 << 20)
    h.loop.write_breaks = False
    t = threading.Thread(target=lambda: h.precopy.extend(_recv_all(h.pb)), daemon=True)
    try:
        t.start()
        h.send_all()
        t.join(WAIT)
        pre_pages, pre_ends = decode(bytes(h.precopy), True, "precopy")
    finally:
        h.close()
    assert pre_pages == list(range(h.blk.npages))
    sizes = np.diff([0] + [n for n, _ in pre_ends])
    assert sizes.max() <= BREAK_STEP_PAGES  # the chunks of before: one record per break step


# --- end to end ---

@pytest.mark.parametrize("checks", [True, False], ids=["page-checksums", "no-checks"])
def test_migration_with_write_breaks_keeps_the_guest(checks):
    from ferry_migrate.engine.local import run_local_migration

    from .test_preempt import PREEMPT, SLOW, check, huge_guest
    src, dst = run_local_migration("tcp:127.0.0.1:0", huge_guest(), caps={**PREEMPT, "page-checksums": checks},
                                   params=SLOW, timeout=120)
    check(src, dst)  # completed, digests equal
    assert src["requests-served-mid-record"] + src["preemptions"] >= 1
    assert src["restores"] == src["preemptions"]
    assert dst["channels"]["postcopy-1"]["host-pages-placed"] >= 1
