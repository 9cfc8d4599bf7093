"""The source side: migration thread (precopy passes, stop-and-copy or the switch
to postcopy) and return-path thread.

Precopy: the first pass sends every page; each later pass sends the pages the
guest dirtied meanwhile (dirty bitmap synced from the guest's dirty log). The
migration thread estimates bandwidth every 100 ms; once the bytes still to
send fit the downtime limit at that bandwidth, it stops the guest, sends the
rest (stop-and-copy), the guest's non-RAM state and EOF.

Postcopy (capability postcopy-ram): on migrate-start-postcopy, or after
``postcopy-after-passes`` passes, or once ``postcopy-after-percent`` of the
pages went out, the guest stops here, every page dirtied or not yet sent is
discarded on the destination, and a PACKAGED blob (LISTEN, guest state,
PING, RUN) starts the guest there. The remaining pages then go out in the
background while pages the destination requests over the return path go
first (see engine/scheduler.py).

Either way the source reports ``completed`` only after the destination
confirmed (SHUT 0) and its per-block digests matched ours; until then the
guest's memory is kept as it is.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Callable

import numpy as np

from channels import codec
from channels import constants as C
from channels.channel import PostcopyChannel, PrecopyChannel
from channels.errors import ChannelError, ProtocolError
from channels.qemufile import QEMUFileReader, QEMUFileWriter
from channels.transport import connect, parse_uri

from . import stats as S
from .bitmap import PageBitmap
from .params import MigrationConfig
from .ram import GuestRAM
from .scheduler import PRECOPY, PageScheduler, SchedBlock, SendOrder
from .workload import Workload

GUEST_DEVICE = "ferry-guest"  # Ferry's own device section: the workload's state
GUEST_DEVICE_VERSION = 1
BANDWIDTH_WINDOW = 0.1  # s, QEMU's BUFFER_DELAY
ITERATION_BUDGET = 0.05  # s of sending per PART section, QEMU's MAX_WAIT
CONFIRM_TIMEOUT = 120.0  # s to wait for the destination's confirmation
PING_RUN = 1  # value of the PING inside the postcopy package
HOLD_STEP_PAGES = 16  # small-page runs are cut this fine when background sends may be held
PREEMPT_FLUSH_BYTES = 64 << 10  # PRECOPY channel flush size once in postcopy with preemption
HOLD_MAX = 0.2  # s, longest hold of background pages behind requested ones
PACE_SHARE = 0.9  # automatic pacing: this share of the bandwidth measured in precopy
HOLD_POLL = 0.0001  # s between looks at the POSTCOPY sockets while holding


class MigrationCancelled(Exception):
    pass


def vm_description(ram: GuestRAM) -> dict:
    """The JSON description sent after EOF (what analyze-migration.py reads)."""
    return {
        "page_size": C.TARGET_PAGE_SIZE,
        "devices": [
            {"name": GUEST_DEVICE, "instance_id": 0, "vmsd_name": GUEST_DEVICE,
             "version": GUEST_DEVICE_VERSION,
             "fields": [{"name": "state", "type": "buffer", "size": -1}]},
        ],
        "ram": [{"name": b.idstr, "size": b.length, "page-size": b.page_size} for b in ram.blocks],
    }


def dirty_ranges(bits: np.ndarray) -> list[tuple[int, int]]:
    """(first page, page count) of each run of set bits, in bulk."""
    padded = np.concatenate(([False], bits, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[0::2], edges[1::2]
    return list(zip(starts.tolist(), (ends - starts).tolist()))


class MigrationSource:
    """Migrates a GuestRAM (and its workload) to a destination URI."""

    def __init__(self, ram: GuestRAM, workload: Workload | None = None,
                 config: MigrationConfig | None = None,
                 on_event: Callable[[str, dict], None] | None = None):
        self.ram = ram
        self.workload = workload
        self.config = config or MigrationConfig()
        self.on_event = on_event or (lambda name, data: None)
        self.stats = S.MigrationStats()
        self.stats.total = ram.total
        self.bitmaps = {b.idstr: PageBitmap(b.npages) for b in ram.blocks}
        self.block_infos = {b.idstr: b.info for b in ram.blocks}
        self.sched: PageScheduler | None = None
        self._lock = threading.Lock()  # scheduler and bitmaps: migration vs return-path thread
        self._thread: threading.Thread | None = None
        self._rp_thread: threading.Thread | None = None
        self._cancel = False
        self._done = threading.Event()
        self._postcopy_requested = threading.Event()
        self.channel: PrecopyChannel | None = None
        self.channels: list = []  # index = scheduler channel number
        self.uri = None
        self.in_postcopy = False
        # Return-path results
        self._rp_shut: int | None = None
        self._rp_digests: dict | None = None
        self._rp_error: BaseException | None = None
        self._rp_event = threading.Condition()
        self._pongs: list[int] = []
        self._urgent_busy = 0  # requested pages being sent by the return-path thread
        self._rp_sends = False  # urgent-pages-from = return-path
        self._hold_background = False  # preempt-hold-background, once in postcopy
        self.passes = []  # per-pass figures (MIGRATION_PASS)

    # --- public API ---
    @property
    def status(self) -> str:
        return self.stats.status

    def start(self, uri: str) -> None:
        """Begin migrating to ``uri`` in a background thread."""
        if self.stats.status not in (S.NONE, S.FAILED, S.CANCELLED):
            raise RuntimeError(f"migration already {self.stats.status}")
        u = parse_uri(uri)
        if self.config.cap("postcopy-ram"):
            if u.scheme == "file":
                raise ValueError("postcopy-ram needs a live destination: not possible with a file: uri")
            if not self.config.cap("return-path"):
                raise ValueError("postcopy-ram needs the return-path capability")
        if self.config.cap("postcopy-preempt") and not self.config.cap("postcopy-ram"):
            raise ValueError("postcopy-preempt needs the postcopy-ram capability")
        self.uri = u
        self._thread = threading.Thread(target=self._run, name="migration", daemon=True)
        self._thread.start()

    def start_postcopy(self) -> None:
        """migrate-start-postcopy: switch at the end of the current iteration."""
        if not self.config.cap("postcopy-ram"):
            raise RuntimeError("postcopy not enabled: set the postcopy-ram capability before migrate")
        if self.stats.status not in (S.SETUP, S.ACTIVE):
            raise RuntimeError(f"postcopy can only start during an active migration, not {self.stats.status}")
        self._postcopy_requested.set()

    def wait(self, timeout: float | None = None) -> str:
        self._done.wait(timeout)
        return self.stats.status

    def parameters_changed(self) -> None:
        """migrate-set-parameters during the migration: apply the live ones now.

        downtime-limit is read at every iteration; the bandwidth limits go to
        the PRECOPY channel's rate limiter.
        """
        ch = self.channel
        if ch is not None:
            name = "max-postcopy-bandwidth" if self.in_postcopy else "max-bandwidth"
            ch.writer.rate_limit = self.config.param(name)

    def cancel(self) -> None:
        """migrate-cancel: stop sending, resume the guest here.

        Refused once postcopy started: the guest runs on the destination and
        needs the pages only this side has.
        """
        if self.stats.status in S.FINAL_STATES or self.stats.status == S.NONE:
            return
        if self.in_postcopy:
            raise RuntimeError("migrate-cancel refused in postcopy: the guest already runs on the destination "
                               "and still needs pages from this side")
        self._cancel = True
        self._set_state(S.CANCELLING)
        for ch in self.channels:
            ch.shutdown()

    def query(self) -> dict:
        st = self.stats
        if st.status not in S.FINAL_STATES:
            st.remaining = sum(bm.count() for bm in self.bitmaps.values()) * C.TARGET_PAGE_SIZE
        if self.channels:
            st.transferred = sum(ch.transferred for ch in self.channels)
            st.channels = {ch.name: {"bytes": ch.transferred, "normal": ch.normal_pages,
                                     "duplicate": ch.zero_pages} for ch in self.channels}
        if self.sched is not None and self.in_postcopy:
            st.extra.update(self.sched.counters())
        self._count_pages()
        return st.to_dict()

    # --- internals ---
    def _set_state(self, new: str) -> None:
        old = self.stats.status
        if old == new:
            return
        self.stats.status = new
        self.on_event("MIGRATION", {"status": new})

    def _check_cancel(self) -> None:
        if self._cancel:
            raise MigrationCancelled()
        if self._rp_error is not None:
            raise self._rp_error

    def _sync(self, guest_running: bool = True) -> int:
        """Move the guest's dirty log into the migration bitmaps. Returns dirty pages."""
        now = time.monotonic()
        with self.ram.dirty_lock:
            newly = 0
            for b in self.ram.blocks:
                log = self.ram.dirty_log[b.idstr].bits
                bm = self.bitmaps[b.idstr].bits
                newly += int(np.count_nonzero(log))
                bm |= log
                log[:] = False
        r = self.stats.ram
        dt = now - self._last_sync
        if guest_running and dt > 0:
            r.dirty_pages_rate = int(newly / dt)
        self._last_sync = now
        r.dirty_sync_count += 1
        remaining = sum(bm.count() for bm in self.bitmaps.values())
        self.stats.remaining = remaining * C.TARGET_PAGE_SIZE
        self.passes.append({"pass": r.dirty_sync_count, "dirty-pages": remaining,
                            "dirty-pages-rate": r.dirty_pages_rate,
                            "transferred": self.channel.transferred if self.channel else 0,
                            "time": round(now - self.stats.start_time, 4)})
        self.on_event("MIGRATION_PASS", {"pass": r.dirty_sync_count})
        return remaining

    def _execute(self, order: SendOrder) -> None:
        """Send an order's dirty target pages; stop early if a request preempts it."""
        blk = self.ram.blocks[order.block]
        bm = self.bitmaps[blk.idstr]
        ch = self.channels[order.channel]
        sched = self.sched
        if order.switched:
            ch.reset_last_block()
        interruptible = sched.interruptible(order)
        hold = self._hold_background and order.channel == PRECOPY
        # Where a request may make us stop early: between target pages of an
        # interruptible huge page, anywhere in a run of small pages.
        can_leave = interruptible or blk.tp_per_hp == 1
        if interruptible:
            step = 1  # stop at the next target-page boundary
        elif hold:
            step = min(order.end - order.start, HOLD_STEP_PAGES)
        else:
            step = order.end - order.start
        # The destination assembles host pages in order once in postcopy; before,
        # data pages first and zero pages after is cheaper to decode.
        order_matters = sched.postcopy and blk.tp_per_hp > 1
        p = order.start
        while p < order.end:
            if interruptible and sched.queue:
                with self._lock:
                    sched.preempted(order, p)
                break
            if hold and self._urgent_in_flight() and not self._hold(can_leave):
                if interruptible:
                    with self._lock:
                        sched.preempted(order, p)
                break  # small pages: the rest stays dirty and goes out later
            with self._lock:
                q = bm.next_set(p, order.end)
                if q >= order.end:
                    break
                e = bm.next_clear(q, min(order.end, q + step))
                bm.bits[q:e] = False
            ch.send_range(blk, q, e, ordered=order_matters)
            p = e
        if order.requested:
            ch.flush()  # the destination's guest is waiting for it

    def _urgent_in_flight(self) -> bool:
        """Requested pages are still on their way: being queued, or in a POSTCOPY socket."""
        return self._urgent_busy > 0 or any(pc.writer.transport.outq() > 0 for pc in self.channels[1:])

    def _hold(self, can_leave: bool) -> bool:
        """Hold background pages while requested pages travel, so they get the whole link.

        Returns False when a new request came in and the caller may stop to
        serve it. Never longer than HOLD_MAX: a stalled POSTCOPY channel must
        not stop the background.
        """
        deadline = time.monotonic() + HOLD_MAX
        while self._urgent_in_flight() and not self._cancel:
            if can_leave and self.sched.queue:
                return False
            if time.monotonic() > deadline:
                break
            time.sleep(HOLD_POLL)
        return True

    def _send_for(self, budget: float | None, stop: Callable[[], bool] | None = None) -> bool:
        """Send orders until the budget is spent or ``stop()``. True when nothing is left to send."""
        deadline = None if budget is None else time.monotonic() + budget
        while True:
            with self._lock:
                order = self.sched.next()
            if order is None:
                return True
            self._execute(order)
            if self._cancel or self._rp_error is not None:
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if stop is not None and stop():
                return False

    def _update_bandwidth(self, force: bool = False) -> None:
        now = time.monotonic()
        dt = now - self._bw_t
        if dt < BANDWIDTH_WINDOW and not force:
            return
        total = self.channel.transferred
        sent = total - self._bw_bytes
        pages = self._pages_sent() - self._bw_pages
        if dt > 0 and sent > 0:
            window = sent / dt
            self.stats.ram.mbps = window * 8 / 1e6
            self.stats.ram.pages_per_second = pages / dt
            # For the stop decision, never more than the average so far: early
            # windows can be far faster than the destination's sustained pace
            # (socket buffers absorbing, fresh memory not yet slowing it), and
            # the stop-and-copy runs at the sustained pace.
            since = now - (self.stats.setup_done or self.stats.start_time)
            self._bandwidth = min(window, total / since) if since > 0 else window
        self._bw_t, self._bw_bytes = now, total
        self._bw_pages = self._pages_sent()

    def _pages_sent(self) -> int:
        """Target pages sent so far, on all channels (each channel counts its own)."""
        return sum(c.normal_pages + c.zero_pages for c in self.channels)

    def _count_pages(self) -> None:
        r = self.stats.ram
        r.normal = sum(c.normal_pages for c in self.channels)
        r.duplicate = sum(c.zero_pages for c in self.channels)

    def _should_switch(self) -> bool:
        if not self.config.cap("postcopy-ram"):
            return False
        if self._postcopy_requested.is_set():
            return True
        after = self.config.param("postcopy-after-passes")
        if after and self.stats.ram.dirty_sync_count > after:
            return True
        pct = self.config.param("postcopy-after-percent")
        if pct:
            return self._pages_sent() * 100 >= pct * self.ram.npages
        return False

    def _run(self) -> None:
        st = self.stats
        st.start_time = time.monotonic()
        self._last_sync = st.start_time
        self._bandwidth = 0.0
        self._bw_t, self._bw_bytes, self._bw_pages = st.start_time, 0, 0
        self._set_state(S.SETUP)
        transport = None
        paused_here = False
        cfg = self.config
        postcopy = cfg.cap("postcopy-ram")
        preempt = cfg.cap("postcopy-preempt")
        nchannels = cfg.param("postcopy-channels") if preempt else 0
        self._rp_sends = preempt and cfg.param("urgent-pages-from") == "return-path"
        self._hold_background = False  # set at the switch, if asked for
        self.sched = PageScheduler([SchedBlock(b.npages, b.tp_per_hp, self.bitmaps[b.idstr]) for b in self.ram.blocks],
                                   preempt=preempt, break_huge=cfg.param("preempt-break-huge"),
                                   postcopy_channels=max(1, nchannels))
        try:
            transport = connect(self.uri)
            if hasattr(transport, "tune"):
                transport.tune(sndbuf=cfg.param("precopy-sndbuf"))
            use_rp = cfg.cap("return-path") and self.uri.scheme != "file"
            writer = QEMUFileWriter(transport, rate_limit=cfg.param("max-bandwidth"), name="precopy")
            # page-checksums: the channels send check values before the pages they
            # cover, from a staging copy while the guest runs (channels/channel.py).
            checks = {"page_checks": cfg.cap("page-checksums"),
                      "guest_running": (lambda: self.workload.running) if self.workload is not None else None}
            ch = self.channel = PrecopyChannel(writer, **checks)
            self.channels = [ch]
            ch.send_header()
            if use_rp:
                ch.send_raw(codec.encode_open_return_path())
            if postcopy:
                summary = 0
                for b in self.ram.blocks:
                    summary |= b.page_size
                ch.send_raw(codec.encode_postcopy_advise(summary, C.TARGET_PAGE_SIZE))
            if use_rp:
                self._start_return_path(transport)
            ch.flush()
            # POSTCOPY channels: further connections to the same address, opened
            # at setup as QEMU 7.2 does; the destination tells them by order.
            for i in range(nchannels):
                try:
                    t = connect(self.uri)
                except ConnectionError as e:
                    raise ConnectionError(f"POSTCOPY channel {i + 1} of {nchannels}: {e} (is postcopy-preempt "
                                          "with the same postcopy-channels enabled on the destination?)") from e
                name = "postcopy" if nchannels == 1 else f"postcopy{i + 1}"
                self.channels.append(PostcopyChannel(QEMUFileWriter(t, name=name), name, **checks))
            self._ram_section = ch.new_section_id()
            ch.ram_start(self._ram_section, self.ram.blocks, postcopy=postcopy)
            # First pass: every page. Writes before now are covered by it.
            with self.ram.dirty_lock:
                for b in self.ram.blocks:
                    self.bitmaps[b.idstr].set_all()
                    self.ram.dirty_log[b.idstr].clear_all()
            st.ram.dirty_sync_count = 1
            self.passes.append({"pass": 1, "dirty-pages": self.ram.npages, "dirty-pages-rate": 0,
                                "transferred": 0, "time": 0.0})
            self.on_event("MIGRATION_PASS", {"pass": 1})
            ch.flush()
            st.setup_done = time.monotonic()
            self._set_state(S.ACTIVE)
            switch = False
            while True:
                self._check_cancel()
                downtime_limit = cfg.param("downtime-limit") / 1000.0  # may change mid-migration
                if self._should_switch():
                    switch = True
                    break
                ch.section_part(self._ram_section)
                # The switch may come due mid-iteration (postcopy-after-percent).
                self._send_for(ITERATION_BUDGET, self._should_switch if postcopy else None)
                ch.send_eos()
                ch.section_footer(self._ram_section)
                ch.flush()
                self._update_bandwidth()
                remaining = sum(bm.count() for bm in self.bitmaps.values()) * C.TARGET_PAGE_SIZE
                threshold = self._bandwidth * downtime_limit
                st.remaining = remaining
                if self._bandwidth > 0:
                    st.expected_downtime_ms = int(remaining / self._bandwidth * 1000)
                if remaining <= threshold:
                    remaining = self._sync() * C.TARGET_PAGE_SIZE
                    if remaining <= threshold and not self._should_switch():
                        break
            st.ram.precopy_bytes = ch.transferred
            self._check_cancel()
            st.downtime_start = time.monotonic()
            if self.workload is not None:
                self.workload.pause()
                paused_here = True
            if switch:
                self._postcopy(ch)
                paused_here = False  # the guest runs on the destination from RUN on
            else:
                self._stop_and_copy(ch, use_rp)
            if use_rp:
                self._await_confirmation()
            else:
                st.downtime_end = time.monotonic()
            st.end_time = time.monotonic()
            # Start to the destination's confirmation, and the digest check after it.
            st.extra["transfer-time"] = st._ms(st.start_time, self._confirmed_at or st.downtime_end)
            st.extra["verify-time"] = st._ms(self._confirmed_at or st.downtime_end, st.end_time)
            self._update_bandwidth(force=True)
            st.transferred = sum(c.transferred for c in self.channels)
            if self.workload is not None:
                self.workload.stop()  # the guest now runs on the destination
            self._set_state(S.COMPLETED)
        except MigrationCancelled:
            self._fail(None, paused_here)
        except Exception as e:  # noqa: BLE001 - a worker must report, never die silently
            self._fail(e, paused_here)
        finally:
            for c in self.channels:
                c.writer.transport.shutdown()
            if self._rp_thread is not None:
                self._rp_thread.join(5)
            if transport is not None:
                transport.close()
            self._done.set()

    _confirmed_at: float | None = None

    def _stop_and_copy(self, ch: PrecopyChannel, use_rp: bool) -> None:
        st = self.stats
        self._set_state(S.DEVICE)
        self._sync(guest_running=False)
        ch.section_part(self._ram_section, end=True)
        self._send_for(None)
        ch.send_eos()
        ch.section_footer(self._ram_section)
        state = dict(self.workload.state()) if self.workload is not None else {}
        if not use_rp:
            # No return path to confirm on: the stream itself carries the digests.
            state["digests"] = {n: d.hex() for n, d in self.ram.digests().items()}
            st.digests = state["digests"]
        ch.device_full(ch.new_section_id(), GUEST_DEVICE, GUEST_DEVICE_VERSION, json.dumps(state).encode())
        # POSTCOPY channels opened at setup but never used still end with EOS.
        self._end_postcopy_channels()
        ch.send_eof(vm_description(self.ram))
        ch.flush()
        st.ram.downtime_bytes = ch.transferred - st.ram.precopy_bytes
        st.remaining = 0

    def _postcopy(self, ch: PrecopyChannel) -> None:
        """The switch (discard, package with LISTEN/state/PING/RUN), then background + requests."""
        st = self.stats
        self.in_postcopy = True
        self._set_state(S.POSTCOPY_ACTIVE)
        self._sync(guest_running=False)
        # A host page is the unit from now on: one dirty target page makes it all dirty.
        for b in self.ram.blocks:
            if b.tp_per_hp > 1:
                bits = self.bitmaps[b.idstr].bits.reshape(-1, b.tp_per_hp)
                bits[bits.any(axis=1)] = True
        for b in self.ram.blocks:
            ranges = [(p << C.TARGET_PAGE_BITS, n << C.TARGET_PAGE_BITS)
                      for p, n in dirty_ranges(self.bitmaps[b.idstr].bits)]
            for cmd in codec.encode_postcopy_discard(b.idstr, ranges):
                ch.send_raw(cmd)
        state = dict(self.workload.state()) if self.workload is not None else {}
        blob = (codec.encode_postcopy_listen()
                + codec.encode_device_full(ch.new_section_id(), GUEST_DEVICE, GUEST_DEVICE_VERSION,
                                           json.dumps(state).encode())
                + codec.encode_ping(PING_RUN) + codec.encode_postcopy_run())
        ch.send_raw(codec.encode_packaged(blob))
        ch.flush()
        self.sched.postcopy = True
        self._hold_background = self.sched.preempt and self.config.param("preempt-hold-background")
        ch.writer.rate_limit = self.config.param("max-postcopy-bandwidth")
        if self.sched.preempt:
            # Come back from blocking sends often enough to serve requests.
            ch.writer.auto_flush = PREEMPT_FLUSH_BYTES
            pacing = self._pacing_rate()
            st.extra["precopy-pacing-rate"] = pacing
            if hasattr(ch.writer.transport, "tune"):
                ch.writer.transport.tune(notsent_lowat=self.config.param("precopy-notsent-lowat"),
                                         pacing_rate=pacing)
        st.downtime_end = time.monotonic()  # the destination runs the guest from RUN on
        st.ram.downtime_bytes = ch.transferred - st.ram.precopy_bytes
        # Background pages and requested pages until every page went out.
        while True:
            self._check_cancel()
            ch.section_part(self._ram_section)
            done = self._send_for(ITERATION_BUDGET)
            ch.send_eos()
            ch.section_footer(self._ram_section)
            ch.flush()
            self._update_bandwidth()
            if done:
                break
        self._end_postcopy_channels()
        ch.section_part(self._ram_section, end=True)
        ch.send_eos()
        ch.section_footer(self._ram_section)
        ch.send_eof(None)  # no VM description in postcopy, as QEMU
        ch.flush()
        st.remaining = 0
        st.extra["postcopy-bytes"] = ch.transferred - st.ram.precopy_bytes - st.ram.downtime_bytes

    def _pacing_rate(self) -> int:
        """Pacing of background pages once in postcopy with preemption (0 = none).

        A little under what the path sustained in precopy: background pages
        then do not build a queue at the bottleneck (a rate-limited link, or
        the destination itself) that requested pages would wait behind.
        """
        cfg = self.config
        rate = cfg.param("precopy-pacing-rate")
        if rate or not cfg.param("preempt-pace-background"):
            return rate
        base = cfg.param("max-postcopy-bandwidth")
        if not base:
            # What the peer acknowledged, not what left our buffers: bytes still
            # in the socket or a link queue say nothing about the path's pace.
            ch = self.channel
            elapsed = time.monotonic() - (self.stats.setup_done or self.stats.start_time)
            delivered = ch.transferred - ch.writer.transport.outq()
            base = delivered / elapsed if elapsed > 0 else 0
        return int(base * PACE_SHARE)

    def _end_postcopy_channels(self) -> None:
        """EOS on every POSTCOPY channel, after any page already claimed for it."""
        with self._lock:
            # A return-path send that claimed a page holds its channel's lock
            # already (taken under this lock), so EOS cannot overtake it.
            for pc in self.channels[1:]:
                with pc.lock:
                    pc.send_eos()
                    pc.flush()

    def _fail(self, err, paused_here: bool) -> None:
        st = self.stats
        st.end_time = time.monotonic()
        if (isinstance(err, ChannelError) and not isinstance(err, ProtocolError)
                and self._rp_thread is not None and self._rp_error is None):
            # The stream broke; the return path may be reading why (the
            # destination's message is the more useful error).
            self._rp_thread.join(1.0)
        if self._rp_error is not None and (err is None or isinstance(err, ChannelError)):
            err = self._rp_error  # the return path said why the stream broke
        if paused_here and self.workload is not None:
            self.workload.resume()  # the guest goes on running here, memory untouched
        if self.channels:
            st.transferred = sum(c.transferred for c in self.channels)
        if self._cancel and (err is None or isinstance(err, ChannelError)):
            self._set_state(S.CANCELLED)
            return
        st.error = str(err) if err is not None else "migration failed"
        self._set_state(S.FAILED)

    # --- return path ---
    def _start_return_path(self, transport) -> None:
        reader = QEMUFileReader(transport, bufsize=64 << 10, name="return-path")
        self._rp_thread = threading.Thread(target=self._rp_loop, args=(reader,), name="return-path",
                                           daemon=True)
        self._rp_thread.start()

    def _rp_loop(self, reader: QEMUFileReader) -> None:
        dec = codec.ReturnPathDecoder()
        try:
            while True:
                msg, n = dec.next_event(reader.view())
                if msg is codec.NEED_DATA:
                    if not reader.fill(n):
                        if reader.available():
                            raise ProtocolError(f"return path: truncated message, {reader.available()} bytes")
                        if self._rp_shut is None:
                            raise ChannelError("return path closed by the destination before it confirmed")
                        return
                    continue
                reader.consume(n)
                self._handle_rp(msg)
        except (ChannelError, ProtocolError, OSError) as e:
            if self._cancel or self.stats.status in S.FINAL_STATES:
                return
            if isinstance(e, ChannelError) and not isinstance(e, ProtocolError) and self._rp_shut is not None:
                return
            with self._rp_event:
                self._rp_error = e if isinstance(e, (ChannelError, ProtocolError)) else ChannelError(str(e))
                self._rp_event.notify_all()
            for ch in self.channels:
                ch.shutdown()

    def _handle_rp(self, msg: codec.RpMessage) -> None:
        t = msg.type
        if t == C.MIG_RP_MSG_SHUT:
            with self._rp_event:
                self._rp_shut = msg.value
                if msg.value != 0:
                    self._rp_error = ChannelError(f"destination reported failure (SHUT {msg.value}); "
                                                  "query the destination for its error")
                self._rp_event.notify_all()
        elif t == C.MIG_RP_MSG_PONG:
            self._pongs.append(msg.value)
        elif t == C.MIG_RP_MSG_FERRY_DIGESTS:
            with self._rp_event:
                self._rp_digests = msg.digests
                self._rp_event.notify_all()
        elif t in (C.MIG_RP_MSG_REQ_PAGES, C.MIG_RP_MSG_REQ_PAGES_ID):
            if not self.in_postcopy:
                raise ProtocolError(f"return path {msg.name}: page request while not in postcopy "
                                    f"(block {msg.block!r}, start 0x{msg.start:x})")
            if self._rp_shut is not None or self.stats.status in S.FINAL_STATES:
                raise ProtocolError(f"return path {msg.name}: page request after completion "
                                    f"(block {msg.block!r}, start 0x{msg.start:x})")
            blk = codec.validate_page_request(self.block_infos, msg)
            if self._rp_sends:
                self._send_urgent(blk.index, msg.start >> C.TARGET_PAGE_BITS)
            else:
                with self._lock:
                    self.sched.request(blk.index, msg.start >> C.TARGET_PAGE_BITS)
        else:
            raise ProtocolError(f"return path {msg.name}: not expected by the source")

    def _send_urgent(self, block: int, host_page: int) -> None:
        """urgent-pages-from=return-path: send a requested page from this thread, now."""
        with self._lock:
            order = self.sched.claim(block, host_page)
            if order is None:
                return
            pc = self.channels[order.channel]
            pc.lock.acquire()  # taken before releasing the scheduler: EOS waits for us
            self._urgent_busy += 1
        try:
            pc.send_range(self.ram.blocks[block], order.start, order.end)
            pc.flush()
        finally:
            pc.lock.release()
            with self._lock:
                self._urgent_busy -= 1

    def _await_confirmation(self) -> None:
        """Wait for SHUT(0) and the destination's digests; compare with ours."""
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        with self._rp_event:
            while self._rp_shut is None and self._rp_error is None:
                left = deadline - time.monotonic()
                if left <= 0 or self._cancel:
                    break
                self._rp_event.wait(min(left, 0.5))
        self._confirmed_at = time.monotonic()
        if not self.in_postcopy:
            self.stats.downtime_end = self._confirmed_at  # the destination may run the guest now
        self._check_cancel()
        if self._rp_shut is None:
            raise ChannelError("destination did not confirm the load in time")
        ours = self.ram.digests()
        with self._rp_event:
            while self._rp_digests is None and self._rp_error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChannelError("destination did not send its digests in time")
                self._rp_event.wait(min(left, 0.5))
        self._check_cancel()
        theirs = self._rp_digests
        self.stats.digests = {n: d.hex() for n, d in ours.items()}
        bad = [n for n in ours if theirs.get(n) != ours[n]]
        extra = [n for n in theirs if n not in ours]
        if bad or extra:
            raise ChannelError(f"digest mismatch after load: blocks {bad + extra} differ between source "
                               "and destination")
