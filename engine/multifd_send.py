"""Source side of multifd: N sender threads, each owning one multifd channel.

The migration thread hands out runs of dirty target pages (``send_range``,
the same call a RAM channel takes, so engine/send_loop.py sends to either);
each run goes whole to the channel with the least queued, so a host page is
never split between channels. A sender thread cuts its runs into packets of
at most FERRY_MULTIFD_PACKET_PAGES, finds the zero pages and computes the
check values in bulk (numpy), and sends header and data pages with one
``sendmsg`` of iovecs per flush: page data are never copied in Python, and
socket calls and numpy passes release the GIL, so N threads send in
parallel. While the guest runs and page-checksums is on, a chunk is first
copied into the thread's staging ring (as channels/channel.py does): check
values and bytes sent then come from one copy.

``sync()`` ends a pass: every channel sends a SYNC packet after the pages it
was given, and the caller writes RAM_SAVE_FLAG_MULTIFD_FLUSH on the main
stream (:func:`write_flush`). ``finish()`` sends FIN on every channel, waits
for the threads and closes the connections (QEMU: multifd_send_sync_main,
multifd_send_shutdown in migration/multifd.c). Packet format:
channels/multifd_codec.py.
"""
from __future__ import annotations

import collections
import itertools
import threading
from typing import Callable

import numpy as np

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels import multifd_codec as M
from ferry_migrate.channels.channel import StagingRing
from ferry_migrate.channels.errors import ChannelError
from ferry_migrate.channels.iovec import page_iovec
from ferry_migrate.channels.pagecheck import nonzero_from_fingerprints, page_fingerprints, place_values
from ferry_migrate.channels.qemufile import QEMUFileWriter

from .channel_auth import open_channel

PAGE = C.TARGET_PAGE_SIZE
PACKET = C.FERRY_MULTIFD_PACKET_PAGES
# Target pages queued per channel (4 MiB: two packets) before the migration thread
# waits. Queued pages are not in the dirty bitmap any more but not sent yet: the
# stop decision counts them as remaining (queued_pages), and a deep queue would
# make a pass look finished long before its pages left.
QUEUE_PAGES = 2 * PACKET
STAGE_PAGES = 4 * PACKET  # staging ring of a sender thread (8 MiB)
ROLE_MULTIFD = C.FERRY_HELLO_ROLE_MULTIFD
_SYNC, _FIN = "sync", "fin"


def nonzero_pages(words: np.ndarray) -> np.ndarray:
    """Which of (n, 512) page words are not all zero -> (n,) bool.

    A page whose first word is not zero is not a zero page: only the others
    are scanned whole, so a data page costs one cache line here, not 4 KiB
    (QEMU's buffer_is_zero also stops at the first non-zero bytes).
    """
    nonzero = words[:, 0] != 0
    maybe = np.flatnonzero(~nonzero)
    if len(maybe):
        nonzero[maybe] = words[maybe].any(axis=1)
    return nonzero


def multifd_channel_name(index: int) -> str:
    """Name of multifd channel ``index`` (1-based): ``multifd-1`` ... ``multifd-N``."""
    return f"multifd-{index}"


class MultifdSendChannel:
    """One multifd channel of the source: its writer, its queue of runs, its thread's counters."""

    def __init__(self, index: int, writer: QEMUFileWriter):
        self.index = index
        self.name = multifd_channel_name(index)
        self.writer = writer
        self.queue: collections.deque = collections.deque()
        self.queued_pages = 0
        self.packets = 0  # the last packet number sent
        self.pass_ = 1
        self.normal_pages = 0
        self.zero_pages = 0
        self.thread: threading.Thread | None = None
        self._stage = StagingRing(writer, STAGE_PAGES)

    @property
    def transferred(self) -> int:
        return self.writer.transferred


class MultifdSender:
    """Hands page runs to N multifd channels and runs their sender threads.

    ``writers``: one QEMUFileWriter per channel, index order; ``page_checks``:
    send check values (capability page-checksums); ``guest_running()``: true
    while the guest may write what is being sent; ``on_fault(err)``: called
    once from the thread that failed (the source stops every channel).
    Thread-safe: ``send_range``, ``sync`` and ``finish`` are called by the
    migration thread; ``shutdown`` from any thread.
    """

    kind = "multifd"
    name = "multifd"

    def __init__(self, writers: list[QEMUFileWriter], page_checks: bool = False,
                 guest_running: Callable[[], bool] | None = None,
                 on_fault: Callable[[BaseException], None] | None = None):
        self.channels = [MultifdSendChannel(i + 1, w) for i, w in enumerate(writers)]
        self.page_checks = page_checks
        self.guest_running = guest_running or (lambda: False)
        self.on_fault = on_fault or (lambda e: None)
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.stopped = False
        self.finished = False
        n = len(writers)
        for ch in self.channels:
            ch.writer.put_bytes(M.encode_init(ch.index, n))
            ch.writer.flush()
            ch.thread = threading.Thread(target=self._run, args=(ch,), name=ch.name, daemon=True)
            ch.thread.start()

    # --- what the send loop sees (the interface of a RAM channel) ---
    @property
    def transferred(self) -> int:
        return sum(ch.transferred for ch in self.channels)

    @property
    def normal_pages(self) -> int:
        return sum(ch.normal_pages for ch in self.channels)

    @property
    def zero_pages(self) -> int:
        return sum(ch.zero_pages for ch in self.channels)

    @property
    def queued_pages(self) -> int:
        """Target pages handed out and not yet sent: still to send, as far as the stop decision goes."""
        return sum(ch.queued_pages for ch in self.channels)

    def reset_last_block(self) -> None:
        """Packets name their block each time: nothing to forget."""

    def flush(self) -> None:
        """Runs go out as the sender threads take them; nothing is held here."""

    def send_range(self, block, p0: int, p1: int, ordered: bool = True) -> None:
        """Queue target pages [p0, p1) of ``block`` on the channel with the least queued.

        Waits while every channel has QUEUE_PAGES queued. Raises the first
        sender thread's error, or ChannelError once stopped.
        """
        k = p1 - p0
        with self.cond:
            while True:
                self._check()
                ch = min(self.channels, key=lambda c: c.queued_pages)
                if ch.queued_pages < QUEUE_PAGES:
                    break
                self.cond.wait(0.1)
            ch.queue.append((block, p0, p1))
            ch.queued_pages += k
            self.cond.notify_all()

    def set_rate_limit(self, rate: int) -> None:
        """max-bandwidth (bytes/s, 0 = unlimited) for all channels together: rate / N each."""
        for ch in self.channels:
            ch.writer.rate_limit = rate // len(self.channels)

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` s until every queued page was sent (the pass's end is near)."""
        with self.cond:
            self.cond.wait_for(lambda: self.error is not None or self.stopped or not self.queued_pages, timeout)

    def sync(self) -> None:
        """End the current pass: each channel sends a SYNC packet after every page it was given."""
        with self.cond:
            self._check()
            for ch in self.channels:
                ch.queue.append(_SYNC)
            self.cond.notify_all()

    def finish(self, timeout: float | None = None) -> None:
        """FIN on every channel, wait until every thread sent it, close the connections.

        Raises the first sender thread's error (or ChannelError on a timeout).
        """
        with self.cond:
            self._check()
            for ch in self.channels:
                ch.queue.append(_FIN)
            self.cond.notify_all()
        for ch in self.channels:
            ch.thread.join(timeout)
            if ch.thread.is_alive():
                self.shutdown()
                raise ChannelError(f"multifd channel {ch.name}: FIN not sent in {timeout} s")
        with self.cond:
            self._check()
            self.finished = True
        self.close()

    def shutdown(self) -> None:
        """Stop every channel now (a fault, a cancel): blocked sends return with an error."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        for ch in self.channels:
            ch.writer.shutdown()

    def close(self) -> None:
        for ch in self.channels:
            try:
                ch.writer.transport.close()
            except OSError:
                pass

    def join(self, timeout: float = 5.0) -> None:
        for ch in self.channels:
            if ch.thread is not None:
                ch.thread.join(timeout)

    def stats(self) -> dict:
        """Per-channel figures, by channel name (query-migrate ``channels``)."""
        return {ch.name: {"bytes": ch.transferred, "normal": ch.normal_pages, "duplicate": ch.zero_pages,
                          "packets": ch.packets} for ch in self.channels}

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        if self.stopped:
            raise ChannelError("multifd channels stopped")

    # --- sender threads ---
    def _take(self, ch: MultifdSendChannel):
        with self.cond:
            while not ch.queue:
                if self.stopped:
                    return None
                if ch.writer.pending():
                    break  # idle: send what is buffered first
                self.cond.wait(0.1)
            else:
                return ch.queue[0]
        ch.writer.flush()
        return self._take(ch)

    def _done(self, ch: MultifdSendChannel, item, count: int = 1) -> None:
        """``count`` queue entries were sent (``item`` a SYNC or FIN, or ``count`` runs of that many pages)."""
        with self.cond:
            for _ in range(count):
                ch.queue.popleft()
            if isinstance(item, tuple):
                ch.queued_pages -= item[2] - item[1]
            elif isinstance(item, int):
                ch.queued_pages -= item
            self.cond.notify_all()

    def _more(self, ch: MultifdSendChannel, block, have: int) -> list:
        """Runs of ``block`` queued after the first one, as many as fit one packet with its ``have`` pages.

        The send loop hands out runs of at most scheduler.RUN_PAGES (1 MiB); a
        packet takes FERRY_MULTIFD_PACKET_PAGES (2 MiB): half the packets, half
        the per-packet work on both sides.
        """
        out = []
        with self.cond:
            for nxt in itertools.islice(ch.queue, 1, None):
                if not isinstance(nxt, tuple) or nxt[0] is not block or have + nxt[2] - nxt[1] > PACKET:
                    break
                out.append(nxt)
                have += nxt[2] - nxt[1]
        return out

    def _run(self, ch: MultifdSendChannel) -> None:
        try:
            while True:
                item = self._take(ch)
                if item is None:
                    return
                if item is _SYNC or item is _FIN:
                    flag = C.FERRY_MULTIFD_FLAG_SYNC if item is _SYNC else C.FERRY_MULTIFD_FLAG_FIN
                    ch.packets += 1
                    ch.writer.put_bytes(M.encode_packet_head(flag, "", np.empty(0, np.int64), 0, ch.packets,
                                                             ch.pass_))
                    ch.writer.flush()  # the destination's main loader waits for it
                    self._done(ch, item)
                    if item is _FIN:
                        return
                    ch.pass_ += 1
                    continue
                block, p0, p1 = item
                if p1 - p0 < PACKET:
                    runs = [item] + self._more(ch, block, p1 - p0)
                    self._packet(ch, block, [(r[1], r[2]) for r in runs])
                    self._done(ch, sum(r[2] - r[1] for r in runs), len(runs))
                    continue
                for c0 in range(p0, p1, PACKET):
                    self._packet(ch, block, [(c0, min(p1, c0 + PACKET))])
                self._done(ch, item)
        except BaseException as e:  # noqa: BLE001 - reported to the migration thread, never lost
            with self.cond:
                first = self.error is None and not self.stopped
                if self.error is None:
                    self.error = e if isinstance(e, ChannelError) else ChannelError(
                        f"multifd channel {ch.name}: {type(e).__name__}: {e}")
                self.cond.notify_all()
            if first:
                self.on_fault(self.error)

    def _packet(self, ch: MultifdSendChannel, block, ranges: list) -> None:
        """One packet of the target pages of ``block`` in ``ranges`` ([(c0, c1), ...], at most PACKET
        pages in all): zero pages found, check values, data by reference (an iovec entry per run)."""
        w = ch.writer
        staged = self.page_checks and self.guest_running()
        datas, zeros, fpss, iovs, keeps = [], [], [], [], []
        nd = 0
        for c0, c1 in ranges:
            if staged:
                words, base, keep = ch._stage.take(block, c0, c1)
            else:
                words = block.words[c0:c1]
                base, keep = block.address + c0 * PAGE, block
            if self.page_checks:
                fps = page_fingerprints(words)
                nonzero = nonzero_from_fingerprints(words, fps)
            else:
                nonzero = nonzero_pages(words)
            data = np.flatnonzero(nonzero)
            zero = np.flatnonzero(~nonzero)
            if self.page_checks:
                fpss.append(np.concatenate((fps[data], fps[zero])))
            if len(data):
                iovs.append(page_iovec(base, data, PAGE))
                keeps.append(keep)
                nd += len(data)
            datas.append(data + c0)
            zeros.append(zero + c0)
        if len(ranges) == 1:
            pages = np.concatenate((datas[0], zeros[0]))
            fps = fpss[0] if fpss else None
        else:
            pages = np.concatenate(datas + zeros)
            # fpss holds each range's data then zero values: put every range's data values first
            fps = None
            if fpss:
                nds = [len(d) for d in datas]
                fps = np.concatenate([f[:k] for f, k in zip(fpss, nds)] + [f[k:] for f, k in zip(fpss, nds)])
        checks = None if fps is None else fps ^ place_values(block.idstr, pages)
        ch.packets += 1
        w.put_bytes(M.encode_packet_head(0, block.idstr, pages, nd, ch.packets, ch.pass_, checks))
        if nd:
            iov = iovs[0] if len(iovs) == 1 else np.concatenate(iovs)
            w.put_iovec(iov, nd * PAGE, keep=keeps[0] if len(keeps) == 1 else keeps)
        ch.normal_pages += nd
        ch.zero_pages += len(pages) - nd


def open_multifd(uri, cfg, n: int, page_checks: bool, guest_running, on_fault) -> MultifdSender:
    """Connect ``n`` multifd channels to ``uri`` (TLS and hello as role multifd, index 1..n) and start
    their sender threads. Each writer gets max-bandwidth / n as its rate limit. Raises what
    engine/channel_auth.open_channel raises; connections already made are closed then."""
    writers = []
    try:
        for i in range(n):
            try:
                t = open_channel(uri, cfg, ROLE_MULTIFD, i + 1)
            except ConnectionError as e:
                raise ConnectionError(f"multifd channel {i + 1} of {n}: {e} (is multifd with the same "
                                      "multifd-channels enabled on the destination?)") from e
            if hasattr(t, "tune"):
                t.tune(sndbuf=cfg.param("precopy-sndbuf"))
            writers.append(QEMUFileWriter(t, name=multifd_channel_name(i + 1)))
    except BaseException:
        for w in writers:
            w.transport.close()
        raise
    sender = MultifdSender(writers, page_checks, guest_running, on_fault)
    sender.set_rate_limit(cfg.param("max-bandwidth"))
    return sender


def write_flush(ch, section_id: int, end: bool = False) -> None:
    """RAM_SAVE_FLAG_MULTIFD_FLUSH on the main channel ``ch`` (a PrecopyChannel).

    ``end`` False: in a RAM section part of its own (PART, FLUSH, EOS,
    footer), wherever the caller is between sections; True: inside the
    section the caller has open. Flushes the main channel.
    """
    if end:
        ch.send_raw(codec.encode_multifd_flush())
    else:
        ch.section_part(section_id)
        ch.send_raw(codec.encode_multifd_flush())
        ch.send_eos()
        ch.section_footer(section_id)
    # Sent now: the destination's receivers wait for it before they read pages of the next pass.
    ch.flush()
