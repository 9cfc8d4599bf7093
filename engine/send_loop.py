"""The source's send loop: turn scheduler orders into page records on the channels.

The scheduler (engine/scheduler.py) decides what goes next and on which
channel; this module sends it: the dirty target pages of an order, stopping
early when a page request preempts an interruptible huge page, holding
background pages while requested pages travel (postcopy-preempt), and the
bandwidth estimate the stop decision uses (QEMU's migration_update_counters).
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from typing import Callable

from ferry_migrate.channels import codec
from ferry_migrate.channels.prepared import PreparedRange

from .callbacks import weak_callback
from .scheduler import PRECOPY, PREEMPT_RUN_PAGES, RUN_PAGES, PageScheduler, SendOrder

BANDWIDTH_WINDOW = 0.1  # s, QEMU's BUFFER_DELAY
HOLD_STEP_PAGES = 16  # small-page runs are cut this fine when background sends may be held
# An interruptible huge page goes out in chunks, the request queue looked at
# between chunks, each chunk one bulk run instead of one target page per call.
# A chunk is what the PRECOPY channel moves in BREAK_WAIT at its measured
# bandwidth, so a request waits behind about that much background on any link,
# and never less than BREAK_STEP_PAGES (64 KiB, as a small-page run with
# preemption: scheduler.PREEMPT_RUN_PAGES) nor more than BREAK_MAX_PAGES.
BREAK_WAIT = 0.00025  # s
BREAK_STEP_PAGES = 16
BREAK_MAX_PAGES = 256  # 1 MiB
# Write breaks: an interruptible huge page goes out in records of WRITE_RUN_PAGES
# (the destination's cost per record is fixed: small records cost it about twice
# the CPU per byte), each written in pieces of one break step, the request
# queue looked at between the pieces: a request is served on its own POSTCOPY
# channel at once, the PRECOPY channel's record finishes after it.
WRITE_RUN_PAGES = 512  # 2 MiB: a 2 MiB host page in one record, placed whole
PREPARE_PAGES = 8192  # 32 MiB: most target pages of a chunked huge page prepared at once
HOLD_MAX = 0.2  # s, longest hold of background pages behind requested ones
# How background writes break for requests (preempt-write-breaks, engine/params.py):
#   step    pieces of one break step (above); small-page runs of PREEMPT_RUN_PAGES
#   floor   the same, never below BREAK_FLOOR_PAGES (pieces and small-page runs)
#   idle    whole records and RUN_PAGES runs unless a request came in the last IDLE_WINDOW
#   socket  non-blocking writes as far as the socket takes them, a poll() on the socket
#           and an eventfd the request side signals (QEMUFileWriter.flush_drain)
BREAK_MODES = ("step", "floor", "idle", "socket")
BREAK_FLOOR_PAGES = 64  # 256 KiB
IDLE_WINDOW = 0.05  # s
HOLD_POLL = 0.0001  # s between looks at the POSTCOPY sockets while holding


class SendLoop:
    """Sends the orders of one migration's scheduler.

    ``ram``: GuestRAM; ``bitmaps``: idstr -> PageBitmap of pages still to send;
    ``lock``: guards the scheduler and the bitmaps against the return-path
    thread; ``channels``: index = scheduler channel number (0 = PRECOPY);
    ``stopping()``: true when the migration must stop sending (cancel, fault).
    """

    def __init__(self, ram, bitmaps: dict, sched: PageScheduler, lock: threading.Lock,
                 stopping: Callable[[], bool]):
        self.ram = ram
        self.bitmaps = bitmaps
        self.sched = sched
        self.lock = lock
        self.stopping = weak_callback(stopping)  # the owner's bound method: no cycle
        self.channels: list = []
        # Capability multifd: until it finished, pages for the PRECOPY channel go to
        # the multifd channels instead (engine/multifd_send.py, same send_range).
        self.multifd = None
        self.hold_background = False  # preempt-hold-background, once in postcopy
        self.urgent_busy = 0  # requested pages being sent by the return-path thread
        self.trace = None  # engine/reqtrace.RequestTrace of requested pages, if any
        self.held = 0.0  # s background pages were held behind requested ones (preempt-hold-background)
        self.holds = 0
        # Records of WRITE_RUN_PAGES written in interruptible pieces (see WRITE_RUN_PAGES);
        # False: records of one break step, the queue looked at between records.
        self.write_breaks = True
        self.served_mid_record = 0  # requests served while a PRECOPY record was half written
        self.breaks = "step"  # one of BREAK_MODES (preempt-write-breaks)
        self.last_request = float("-inf")  # monotonic s of the last wake()
        self._poke = False  # wake() since the last look between writes
        self._wake_fd: int | None = None  # eventfd for flush_drain's poll, made on first use
        # the last few: (block, host page, record bytes written before it, record bytes)
        self.mid_record_log: deque[tuple[int, int, int, int]] = deque(maxlen=64)
        # Bandwidth estimate (bytes/s) of the PRECOPY channel.
        self.bandwidth = 0.0
        self.mbps = 0.0
        self.pages_per_second = 0.0
        self._bw_t = time.monotonic()
        self._bw_bytes = 0
        self._bw_pages = 0

    # --- orders ---
    def execute(self, order: SendOrder) -> None:
        """Send an order's dirty target pages; stop early if a request preempts it."""
        blk = self.ram.blocks[order.block]
        bm = self.bitmaps[blk.idstr]
        ch = self.channels[order.channel]
        if order.channel == PRECOPY and self.multifd is not None and not self.multifd.finished:
            ch = self.multifd
        sched = self.sched
        if order.switched:
            ch.reset_last_block()
        interruptible = sched.interruptible(order)
        hold = self.hold_background and order.channel == PRECOPY
        # Where a request may make us stop early: between target pages of an
        # interruptible huge page, anywhere in a run of small pages.
        can_leave = interruptible or blk.tp_per_hp == 1
        mode = self.breaks if sched.preempt and sched.postcopy else "step"
        if interruptible or (hold and blk.tp_per_hp > 1):
            step = self.break_step()  # stop at the next chunk's target-page boundary
        elif hold and mode != "socket":
            step = min(order.end - order.start, HOLD_STEP_PAGES if mode == "step" else self.small_run())
        else:
            step = order.end - order.start
        # The destination assembles host pages in order once in postcopy; before,
        # data pages first and zero pages after is cheaper to decode.
        order_matters = sched.postcopy and blk.tp_per_hp > 1
        trace = self.trace if order.requested else None
        if trace is not None:
            trace.mark(order.block, order.start, "send-start")
        # A huge page sent in chunks is prepared once, in bulk, and sent in slices
        # (channels/prepared.py): per-chunk preparation cost several times the
        # bytes' own CPU. Only with the guest stopped (postcopy): the bytes must
        # not change between preparation and send.
        prep = None
        chunked = step < order.end - order.start and blk.tp_per_hp > 1 and not ch.guest_running()
        pieces = chunked and self.write_breaks and hasattr(ch, "writer")
        if pieces:
            if mode == "floor":
                step = max(step, BREAK_FLOOR_PAGES)
            elif mode == "idle" and not self.recent_request():
                step = WRITE_RUN_PAGES  # one piece: the record in one write
            piece = step * codec.PAGE_RECORD  # bytes a request may wait behind, as one chunk before
            step = max(step, WRITE_RUN_PAGES)
        drain = (mode == "socket" and order.channel == PRECOPY and not order.requested and hasattr(ch, "writer")
                 and ch.writer.can_drain() and (pieces or (blk.tp_per_hp == 1 and not ch.guest_running())))
        p = order.start
        while p < order.end:
            if interruptible and sched.queue:
                with self.lock:
                    sched.preempted(order, p)
                break
            if hold and not order.wanted and self.urgent_in_flight() and not self._hold(can_leave, order):
                if interruptible:
                    with self.lock:
                        sched.preempted(order, p)
                break  # small pages: the rest stays dirty and goes out later
            with self.lock:
                q = bm.next_set(p, order.end)
                if q >= order.end:
                    break
                if not chunked:
                    e = bm.next_clear(q, min(order.end, q + step))
                    bm.bits[q:e] = False
            if chunked:
                if prep is None or q >= prep.p1:
                    # Prepared PREPARE_PAGES at a time: a 1 GiB page is not read whole
                    # before its first chunk leaves, and its arrays stay small.
                    prep = PreparedRange(ch, blk, q, min(order.end, q + PREPARE_PAGES))
                with self.lock:
                    e = bm.next_clear(q, min(prep.p1, q + step))
                    bm.bits[q:e] = False
                if pieces:
                    w = ch.writer
                    w.flush()  # whatever came before: the pieces below are this record's
                    prep.send(q, e, flush=False)
                    base, size = w.transferred, w.pending()
                    between = lambda: self._between_pieces(order, hold, base, size)  # noqa: E731
                    if drain:
                        w.flush_drain(self.wake_fd(), self._pending(hold), between)
                    else:
                        w.flush_pieces(piece, between)
                else:
                    prep.send(q, e)
            elif drain:
                self._drain_run(ch, blk, q, e, order, hold, order_matters)
            else:
                ch.send_range(blk, q, e, ordered=order_matters)
            p = e
        if order.requested:
            ch.flush()  # the destination's guest is waiting for it
            if trace is not None:
                trace.mark(order.block, order.start, "flushed")

    def _drain_run(self, ch, blk, q: int, e: int, order: SendOrder, hold: bool, ordered: bool) -> None:
        """A small-page run on the PRECOPY channel, queued whole and written as the socket
        takes it (preempt-write-breaks=socket): requests are served between the writes."""
        w = ch.writer
        w.flush()  # whatever came before: the writes below are this run's
        saved, w.auto_flush = w.auto_flush, 1 << 62  # queued whole, never flushed by the queueing
        try:
            ch.send_range(blk, q, e, ordered=ordered)
        finally:
            w.auto_flush = saved
        base, size = w.transferred, w.pending()
        w.flush_drain(self.wake_fd(), self._pending(hold), lambda: self._between_pieces(order, hold, base, size))

    # --- requests coming in while background pages are written ---
    def wake(self) -> None:
        """A request came in (queued, or claimed by the return-path thread): look between writes.

        Called from the return-path thread; interrupts flush_drain's poll().
        """
        self.last_request = time.monotonic()
        self._poke = True
        fd = self._wake_fd
        if fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass  # the counter is full: it is readable anyway

    def wake_fd(self) -> int:
        """The eventfd :meth:`wake` signals (non-blocking; closed with this loop)."""
        if self._wake_fd is None:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            weakref.finalize(self, os.close, fd)
            self._wake_fd = fd
        return self._wake_fd

    def recent_request(self) -> bool:
        """A request came in the last IDLE_WINDOW seconds."""
        return time.monotonic() - self.last_request < IDLE_WINDOW

    def small_run(self) -> int:
        """Target pages of a small-page background order with preemption, by break mode."""
        mode = self.breaks
        if mode == "step":
            return PREEMPT_RUN_PAGES
        if mode == "floor":
            return BREAK_FLOOR_PAGES
        if mode == "idle":
            return PREEMPT_RUN_PAGES if self.recent_request() else RUN_PAGES
        return RUN_PAGES

    def _pending(self, hold: bool) -> Callable[[], bool]:
        """flush_drain's test before each write: a request queued, a wake() not looked at, or
        (holding) a requested page being sent."""
        sched = self.sched
        if hold:
            return lambda: bool(sched.queue) or self._poke or self.urgent_busy > 0
        return lambda: bool(sched.queue) or self._poke

    def _between_pieces(self, order: SendOrder, hold: bool, base: int, size: int) -> None:
        """Between two writes of one PRECOPY record: serve queued requests on their
        POSTCOPY channels, and hold background pages behind requested ones.

        ``base``: the PRECOPY writer's byte count when the record began; ``size``:
        the record's bytes (for ``mid_record_log``). A request for the host page
        being written is dropped: it finishes here (``order.wanted``), as the
        scheduler drops one for an interrupted page.
        """
        sched = self.sched
        self._poke = False
        while True:
            while sched.queue:
                with self.lock:
                    # The page on this channel counts as interrupted while the request is
                    # looked up: a host page never spans two channels.
                    saved, wanted = sched.interrupted, sched.interrupted_wanted
                    sched.interrupted, sched.interrupted_wanted = (order.block, order.start), False
                    try:
                        req = sched._pop_request()
                    finally:
                        if sched.interrupted_wanted:
                            order.wanted = True
                        sched.interrupted, sched.interrupted_wanted = saved, wanted
                    if req is None:
                        break
                    if req.channel != sched.last_channel:
                        req.switched = True
                        sched.last_channel = req.channel
                self.served_mid_record += 1
                self.mid_record_log.append((req.block, req.start, self.channels[PRECOPY].transferred - base, size))
                self.execute(req)  # on a POSTCOPY channel: requested orders are never interruptible
                if self.stopping():
                    return
            if not (hold and not order.wanted and self.urgent_in_flight()):
                return
            if self._hold(True, order):
                return
            # a new request came in while holding: serve it, then hold again

    def break_step(self) -> int:
        """Target pages per chunk of a huge page that a request may interrupt (see BREAK_WAIT)."""
        return max(BREAK_STEP_PAGES, min(BREAK_MAX_PAGES, int(self.bandwidth * BREAK_WAIT) >> 12))

    def send_for(self, budget: float | None, stop: Callable[[], bool] | None = None) -> bool:
        """Send orders until ``budget`` seconds are spent or ``stop()``.

        Returns True when nothing is left to send.
        """
        deadline = None if budget is None else time.monotonic() + budget
        sched = self.sched
        while True:
            with self.lock:
                if sched.preempt and sched.postcopy:
                    sched.preempt_run = self.small_run()
                order = sched.next()
            if order is None:
                return True
            self.execute(order)
            if self.stopping():
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if stop is not None and stop():
                return False

    # --- holding background pages behind requested ones ---
    def urgent_in_flight(self) -> bool:
        """Requested pages are still on their way: being queued, or in a POSTCOPY socket."""
        return self.urgent_busy > 0 or any(pc.writer.transport.outq() > 0 for pc in self.channels[1:])

    def _hold(self, can_leave: bool, order: SendOrder) -> bool:
        """Hold background pages while requested pages travel, so they get the whole link.

        Returns False when a new request came in and the caller may stop to
        serve it. Never longer than HOLD_MAX: a stalled POSTCOPY channel must
        not stop the background; not at all once the guest waits for the page
        of ``order`` itself (a request for it was dropped: ``order.wanted``).
        """
        t0 = time.monotonic()
        deadline = t0 + HOLD_MAX
        try:
            while self.urgent_in_flight() and not self.stopping() and not order.wanted:
                if can_leave and self.sched.queue:
                    return False
                if time.monotonic() > deadline:
                    break
                time.sleep(HOLD_POLL)
            return True
        finally:
            self.held += time.monotonic() - t0
            self.holds += 1

    def counters(self) -> dict:
        """Ferry's figures of the background send: time background pages were held (ms) and how often."""
        return {"background-held-ms": int(self.held * 1000), "background-holds": self.holds,
                "requests-served-mid-record": self.served_mid_record}

    # --- figures ---
    def pages_sent(self) -> int:
        """Target pages sent so far, on all channels (each channel counts its own)."""
        mf = self.multifd
        return (sum(c.normal_pages + c.zero_pages for c in self.channels)
                + (mf.normal_pages + mf.zero_pages if mf is not None else 0))

    def reset_bandwidth(self, now: float) -> None:
        self.bandwidth = 0.0
        self._bw_t, self._bw_bytes, self._bw_pages = now, 0, 0

    def update_bandwidth(self, since: float, force: bool = False) -> None:
        """Every BANDWIDTH_WINDOW: the PRECOPY channel's rate (bytes/s) for the stop decision.

        ``since``: when sending began (monotonic s). The estimate is never above
        the average since then: early windows can be far faster than the
        destination's sustained pace (socket buffers absorbing, fresh memory
        not yet slowing it), and the stop-and-copy runs at the sustained pace.
        """
        now = time.monotonic()
        dt = now - self._bw_t
        if dt < BANDWIDTH_WINDOW and not force:
            return
        total = self.channels[0].transferred + (self.multifd.transferred if self.multifd is not None else 0)
        sent = total - self._bw_bytes
        pages = self.pages_sent() - self._bw_pages
        if dt > 0 and sent > 0:
            window = sent / dt
            self.mbps = window * 8 / 1e6
            self.pages_per_second = pages / dt
            elapsed = now - since
            self.bandwidth = min(window, total / elapsed) if elapsed > 0 else window
        self._bw_t, self._bw_bytes = now, total
        self._bw_pages = self.pages_sent()
