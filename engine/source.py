"""The source side of a migration: the migration thread and its life cycle.

Precopy: the first pass sends every page; each later pass sends the pages the
guest dirtied meanwhile (dirty bitmap synced from the guest's dirty log). The
bandwidth is estimated every 100 ms (engine/send_loop.py); once the bytes
still to send fit the downtime limit, the guest stops and the rest goes out
(stop-and-copy, engine/switchover.py).

Postcopy (capability postcopy-ram): on migrate-start-postcopy, or after
``postcopy-after-passes`` passes, or once ``postcopy-after-percent`` of the
pages went out, the guest stops here and the package with RUN starts it on
the destination. The remaining pages then go out in the background while
pages the destination requests over the return path (engine/return_path.py)
go first (engine/scheduler.py).

States and what they allow come from engine/states.py. The source resumes
its own guest only on entering a state where the table says it may run;
after the switch there is none: a fault pauses the migration
(``postcopy-paused``) and :meth:`MigrationSource.resume` continues it over a
new connection (engine/recovery.py).

The source reports ``completed`` only after the destination confirmed
(SHUT 0) and its per-block digests matched ours; it then tells the
destination its verdict, and only then may the guest run there.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Callable

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels.channel import PrecopyChannel
from ferry_migrate.channels.devices import GuestDevices
from ferry_migrate.channels.errors import ChannelError, DestinationNeverRan, ProtocolError
from ferry_migrate.channels.qemufile import QEMUFileWriter
from ferry_migrate.channels.transport import parse_uri

from . import states as ST
from . import stats as S
from . import switchover as SW
from .bitmap import PageBitmap
from . import multifd_send as MF
from .downtime import stop_estimate
from .callbacks import weak_callback
from .channel_auth import ROLE_MAIN, check_plaintext, open_channel
from .params import MigrationConfig
from .peer import COMPLETION_SHUT, effective_capability, peer_features
from .peer_stream import (DIALECT_AT_SETUP, carried_precopy_end, carries_devices, configuration_record,
                          open_postcopy_channels, ram_section_id)
from .ram import GuestRAM
from .phasesplit import PhaseStamps
from .reqtrace import RequestTrace
from .return_path import SourceReturnPath
from .scheduler import PageScheduler, SchedBlock
from .send_loop import SendLoop
from .urgent import UrgentThreads
from .workload import Workload

# Re-exported names other modules import from here.
GUEST_DEVICE = SW.GUEST_DEVICE
GUEST_DEVICE_VERSION = SW.GUEST_DEVICE_VERSION
vm_description = SW.vm_description
dirty_ranges = SW.dirty_ranges

ITERATION_BUDGET = 0.05  # s of sending per PART section, QEMU's MAX_WAIT
CONFIRM_TIMEOUT = 120.0  # s to wait for the destination's confirmation
PREEMPT_FLUSH_BYTES = 64 << 10  # PRECOPY channel flush size once in postcopy with preemption
PACE_SHARE = 0.9  # automatic pacing: this share of the bandwidth measured in precopy
# Automatic pacing trusts a rate measured over at least this much sending; a
# switch earlier than that (the first pass barely begun: setup, first touches
# of the destination's memory) measures the rate in postcopy's first
# PACE_PROBE_SECONDS instead, unpaced, and paces from then on. The probe takes
# its best PACE_PROBE_WINDOW: on a shared host one slow stretch must not cap
# the whole postcopy phase.
PACE_MIN_SECONDS = 0.5
PACE_MIN_BYTES = 64 << 20
PACE_PROBE_SECONDS = 1.0
PACE_PROBE_WINDOW = 0.2


def _to_loopback(transport) -> bool:
    """The transport is a TCP connection to an address of the loopback interface."""
    sock = getattr(transport, "sock", None)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        return ipaddress.ip_address(sock.getpeername()[0]).is_loopback
    except (OSError, ValueError):
        return False


class MigrationCancelled(Exception):
    pass


class Paused(Exception):
    """The migration entered postcopy-paused; the migration thread waits for a recovery."""


class MigrationSource:
    """Migrates a GuestRAM (and its workload) to a destination URI.

    ``on_event(name, data)`` receives MIGRATION and MIGRATION_PASS events.
    Thread-safe public methods: start, start_postcopy, cancel, pause, resume,
    parameters_changed, query, wait.
    """

    def __init__(self, ram: GuestRAM, workload: Workload | None = None,
                 config: MigrationConfig | None = None,
                 on_event: Callable[[str, dict], None] | None = None,
                 devices: GuestDevices | None = None):
        # ``devices``: device state carried from a QEMU stream, sent verbatim.
        self.devices = devices
        self.ram = ram
        self.workload = workload
        self.config = config or MigrationConfig()
        self.on_event = on_event or (lambda name, data: None)
        self.stats = S.MigrationStats()
        self.stats.total = ram.total
        self.sm = ST.MigrationStateMachine(self._state_changed)
        self.bitmaps = {b.idstr: PageBitmap(b.npages) for b in ram.blocks}
        self.block_infos = {b.idstr: b.info for b in ram.blocks}
        self.sched: PageScheduler | None = None
        self.loop: SendLoop | None = None
        self._lock = threading.Lock()  # scheduler and bitmaps: migration vs return-path thread
        self._thread: threading.Thread | None = None
        self._cancel = False
        self._fault: BaseException | None = None  # the first fault of the current connection
        self._done = threading.Event()
        self._postcopy_requested = threading.Event()
        self._resume_cond = threading.Condition()
        self._resume_uri = None
        self._quit = False
        self._guest_paused = False  # we paused the workload (stop-and-copy or switch)
        self.rp: SourceReturnPath | None = None
        self.channel: PrecopyChannel | None = None
        self.channels: list = []  # index = scheduler channel number
        self.multifd: MF.MultifdSender | None = None  # capability multifd: precopy pages (engine/multifd_send.py)
        self._closed_bytes = 0  # bytes of channels of earlier connections (recoveries)
        self._verdict_at: int | None = None  # the main channel's bytes before the verdict went out
        self._closed_normal = 0
        self._closed_zero = 0
        self.uri = None
        self.in_postcopy = False
        self._downtime_unlimited = False  # guest paused: no rate limit (QEMU: RATE_LIMIT_DISABLED)
        self.admitted = False  # the destination holds all its memory (PONG PING_ADMITTED)
        self._rp_sends = False  # urgent-pages-from = return-path
        self._ram_section = 0
        self._confirmed_at: float | None = None
        self.req_trace = RequestTrace()  # engine/reqtrace.py: this side's stages of each request
        self.phases = PhaseStamps()  # engine/phasesplit.py: where the postcopy phase's time goes
        self.urgent = UrgentThreads(self.config)  # engine/urgent.py: the return-path thread's priority
        self._pace_probe: list | None = None  # the rate automatic pacing waits for: _pace_from_probe
        self.recoveries = 0
        self.passes = []  # per-pass figures (MIGRATION_PASS)

    # --- public API ---
    @property
    def status(self) -> str:
        return self.sm.state

    def start(self, uri: str) -> None:
        """Begin migrating to ``uri`` in a background thread.

        Raises ValueError for capabilities that do not fit the URI, StateError
        if this migration was started already.
        """
        u = parse_uri(uri)
        if self.config.cap("postcopy-ram"):
            if u.scheme == "file":
                raise ValueError("postcopy-ram needs a live destination: not possible with a file: uri")
            if not self.config.cap("return-path"):
                raise ValueError("postcopy-ram needs the return-path capability")
        if self.config.cap("postcopy-preempt") and not self.config.cap("postcopy-ram"):
            raise ValueError("postcopy-preempt needs the postcopy-ram capability")
        if self.config.cap("multifd"):
            MF.refuse_file_uri(u, "destination")
            if not self.peer.ferry_only_capabilities:
                raise ValueError("multifd: Ferry's multifd packets are not QEMU's; turn multifd off for peer=qemu")
        check_plaintext(self.config, u, "connecting to")  # PlaintextRefused (a ValueError)
        self.uri = u
        self.sm.fire(ST.START)
        self._thread = threading.Thread(target=self._run, name="migration", daemon=True)
        self._thread.start()

    def start_postcopy(self) -> None:
        """migrate-start-postcopy: switch at the end of the current iteration."""
        if not self.config.cap("postcopy-ram"):
            raise RuntimeError("postcopy not enabled: set the postcopy-ram capability before migrate")
        if self.status not in (ST.SETUP, ST.ACTIVE):
            raise RuntimeError(f"postcopy can only start during an active migration, not {self.status}")
        self._postcopy_requested.set()

    def wait(self, timeout: float | None = None) -> str:
        """Wait until the migration thread ends (a final state, or the worker quits a pause)."""
        self._done.wait(timeout)
        return self.status

    def parameters_changed(self) -> None:
        """migrate-set-parameters during the migration: apply the live ones now.

        downtime-limit is read at every iteration; the bandwidth limits go to
        the PRECOPY channel's rate limiter, which a sender asleep in it re-reads
        at once. While the guest is paused (stop-and-copy, the switch to
        postcopy) the channel is unlimited, as in QEMU, and stays so.
        """
        ch = self.channel
        if ch is not None and not self._downtime_unlimited:
            name = "max-postcopy-bandwidth" if self.in_postcopy else "max-bandwidth"
            ch.writer.rate_limit = self.config.param(name)
            mf = self.multifd
            if mf is not None and not mf.finished and not self.in_postcopy:
                mf.set_rate_limit(self.config.param("max-bandwidth"))

    def cancel(self) -> None:
        """migrate-cancel: stop sending, resume the guest here.

        Raises RuntimeError after the switch to postcopy: the guest runs on the
        destination and needs the pages only this side has.
        """
        st = self.status
        if st in ST.FINAL_STATES or st == ST.NONE:
            return
        if self.in_postcopy or not self.sm.can(ST.CANCEL):
            raise RuntimeError(f"migrate-cancel refused in {st}: the guest already runs on the destination "
                               "and still needs pages from this side (use migrate-pause to stop the channels)")
        self._cancel = True
        self.sm.try_fire(ST.CANCEL)
        self._shutdown_channels()

    def pause(self) -> None:
        """migrate-pause: cut the channels of a postcopy migration on purpose.

        Both sides enter postcopy-paused; resume() goes on. Raises RuntimeError
        outside postcopy-active / postcopy-recover.
        """
        if self.sm.try_fire(ST.PAUSE, reason="migrate-pause") is None:
            raise RuntimeError(f"migrate-pause: only in postcopy-active or postcopy-recover, not {self.status}")
        self.stats.error = "paused by migrate-pause"
        self._shutdown_channels()

    def resume(self, uri: str) -> None:
        """migrate with resume=true: recover a paused postcopy migration over ``uri``.

        Raises RuntimeError unless the migration is postcopy-paused, ValueError
        for a bad URI.
        """
        u = parse_uri(uri)
        if u.scheme == "file":
            raise ValueError("resume needs a live destination, not a file: uri")
        with self._resume_cond:
            if self.status != ST.POSTCOPY_PAUSED:
                raise RuntimeError(f"resume: the migration is {self.status}; only a postcopy-paused "
                                   "migration can be resumed")
            if self._resume_uri is not None:
                raise RuntimeError("resume: a recovery is already starting")
            self._resume_uri = u
            self._resume_cond.notify_all()

    def quit(self) -> None:
        """The worker exits: end a paused migration thread (its guest pages stay unsent)."""
        with self._resume_cond:
            self._quit = True
            self._resume_cond.notify_all()

    def query(self) -> dict:
        """query-migrate's fields (engine/stats.py)."""
        st = self.stats
        st.status = self.status
        if st.status not in ST.FINAL_STATES:
            st.remaining = sum(bm.count() for bm in self.bitmaps.values()) * C.TARGET_PAGE_SIZE
        if self.channels:
            if st.status not in ST.FINAL_STATES:  # at the end: as counted when the outcome was decided
                st.transferred = self._closed_bytes + sum(ch.transferred for ch in self.channels)
            # The verdict is Ferry's word after the stream, not migration data: the main
            # channel's bytes stop where it starts (as counted just before it was sent).
            st.channels = {ch.name: {"bytes": self._verdict_at if ch is self.channel and self._verdict_at is not None
                                     else ch.transferred, "normal": ch.normal_pages,
                                     "duplicate": ch.zero_pages} for ch in self.channels}
            if self.multifd is not None:
                st.channels.update(self.multifd.stats())
                st.extra.update(self.multifd.figures())
                if st.status not in ST.FINAL_STATES:
                    st.transferred += self.multifd.transferred
        if self.sched is not None and self.in_postcopy:
            st.extra.update(self.sched.counters())
            st.extra.update(self.loop.counters())  # engine/send_loop.py: background held behind requests
            if st.downtime_end is not None and st.status == ST.POSTCOPY_ACTIVE:
                st.extra["postcopy-bytes"] = self._postcopy_bytes()
        if self.recoveries:
            st.extra["postcopy-recoveries"] = self.recoveries
        st.extra.update(self.urgent.metrics())
        if st.status in ST.FINAL_STATES and self.in_postcopy:  # engine/reqtrace.py
            st.extra["postcopy-request-trace"] = self.req_trace.to_dict()
            st.extra["postcopy-phase-stamps"] = self.phases.to_dict()
        self._count_pages()
        return st.to_dict()

    # --- state ---
    def _state_changed(self, old: str, new: str, reason: str | None) -> None:
        self.stats.status = new
        info = ST.STATES[new]
        resumed = False
        if info.source_guest_may_run and self._guest_paused and self.workload is not None:
            self._guest_paused = False
            self.workload.resume()  # the guest goes on here, its memory untouched
            resumed = True
        if new == ST.COMPLETED and self.workload is not None:
            self.workload.stop()  # the guest runs on the destination now
        data = {"status": new}
        if reason:
            data["reason"] = reason
        self.on_event("MIGRATION", data)
        if resumed:
            self.on_event("RESUME", {"reason": f"migration {new}"})  # as QEMU's vm_start after a failure

    def _pause_guest(self) -> None:
        if self.workload is not None and not self._guest_paused:
            self._guest_paused = True
            self.workload.pause()

    def _on_fault(self, err: BaseException) -> None:
        """A channel or the return path failed: remember why, stop every channel."""
        if self._fault is None:
            self._fault = err
        self._shutdown_channels()

    def _shutdown_channels(self) -> None:
        for ch in list(self.channels):
            ch.shutdown()
        if self.multifd is not None:
            self.multifd.shutdown()

    def _stopping(self) -> bool:
        return self._cancel or self._fault is not None

    def _check(self) -> None:
        if self._cancel:
            raise MigrationCancelled()
        if self._fault is not None:
            raise self._fault

    # --- the migration thread ---
    def _run(self) -> None:
        st = self.stats
        st.start_time = time.monotonic()
        self.phases.mark("start", 0, st.start_time)
        self._last_sync = st.start_time
        try:
            try:
                self._setup()
                switch = self._precopy()
                st.ram.precopy_bytes = self.channel.transferred + self._multifd_bytes()
                self._check()
                st.downtime_start = time.monotonic()
                self.phases.mark("stop", self.channel.transferred, st.downtime_start)
                self._pause_guest()
                if not switch:
                    self.sm.fire(ST.STOP_AND_COPY)
                    self._stop_and_copy()
                    self._finish()
                    return
                self._switch()
            except BaseException as e:  # noqa: BLE001 - a worker reports, never dies silently
                if self.sm.state not in (ST.POSTCOPY_ACTIVE, ST.POSTCOPY_PAUSED, ST.POSTCOPY_RECOVER):
                    self._fail(e)  # before the point of no return
                    return
                self._pause(e)  # the package may have left: the destination may run the guest
            self._postcopy_until_done()
        except BaseException as e:  # noqa: BLE001 - a worker reports, never dies silently
            self._postcopy_lost(e)
        finally:
            self._close_connection()
            # Stored exceptions hold their tracebacks (frames, channels, buffers): the
            # messages are in the statistics; drop the objects (no cycle to wait for GC).
            self._fault = None
            if self.rp is not None:
                self.rp.error = None
            self._done.set()

    def _setup(self) -> None:
        st, cfg = self.stats, self.config
        postcopy = cfg.cap("postcopy-ram")
        preempt = cfg.cap("postcopy-preempt")
        nchannels = cfg.param("postcopy-channels") if preempt else 0
        self._rp_sends = preempt and cfg.param("urgent-pages-from") == "return-path"
        self.sched = PageScheduler([SchedBlock(b.npages, b.tp_per_hp, self.bitmaps[b.idstr]) for b in self.ram.blocks],
                                   preempt=preempt, break_huge=cfg.param("preempt-break-huge"),
                                   postcopy_channels=max(1, nchannels))
        self.loop = SendLoop(self.ram, self.bitmaps, self.sched, self._lock, self._stopping)
        self.loop.trace = self.req_trace
        self.loop.reset_bandwidth(st.start_time)
        # TLS, hello and the version handshake: nothing moves before the destination agreed.
        transport = open_channel(self.uri, cfg, ROLE_MAIN, 0)
        if hasattr(transport, "tune"):
            transport.tune(sndbuf=cfg.param("precopy-sndbuf"))
        use_rp = cfg.cap("return-path") and self.uri.scheme != "file"
        ch = self._main_channel(transport)
        ch.send_header()
        ch.send_raw(configuration_record(self.peer, self.devices, cfg.param("machine-type")))
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
        if self._preempt_at_setup():
            self._connect_postcopy_channels(nchannels)
        if cfg.cap("multifd"):  # after the POSTCOPY channels of setup: the order the destination accepts
            self.multifd = MF.open_multifd(self.uri, cfg, cfg.param("multifd-channels"), on_fault=self._on_fault,
                                           **self._channel_checks())
            self.loop.multifd = self.multifd
        self._ram_section = ram_section_id(ch, self.devices)
        ch.ram_start(self._ram_section, self.ram.blocks, postcopy=postcopy)
        if postcopy and use_rp:
            # After ADVISE and MEM_SIZE (a destination may create its RAM there): the
            # PONG says it backs all its memory. No switch before it.
            ch.send_raw(codec.encode_ping(SW.PING_ADMITTED))
        # First pass: every page. Writes before now are covered by it.
        self.ram.collect_dirty()
        with self.ram.dirty_lock:
            for b in self.ram.blocks:
                self.bitmaps[b.idstr].set_all()
                self.ram.dirty_log[b.idstr].clear_all()
        st.ram.dirty_sync_count = 1
        self.passes.append({"pass": 1, "dirty-pages": self.ram.npages, "dirty-pages-rate": 0,
                            "transferred": 0, "time": 0.0, "guest-paused": False})
        self.on_event("MIGRATION_PASS", {"pass": 1})
        ch.flush()
        st.setup_done = time.monotonic()
        self.sm.fire(ST.CONNECTED)

    def _main_channel(self, transport) -> PrecopyChannel:
        rate = self.config.param("max-postcopy-bandwidth" if self.in_postcopy else "max-bandwidth")
        writer = QEMUFileWriter(transport, rate_limit=rate, name="precopy")
        ch = PrecopyChannel(writer, **self._channel_checks())
        if self.channel is not None:
            # Section ids go on across a recovery.
            ch._next_section_id, ch._reserved = self.channel._next_section_id, self.channel._reserved
        self.channel = ch
        self.channels = [ch]
        self.loop.channels = self.channels
        return ch

    def _connect_postcopy_channels(self, n: int) -> None:
        """POSTCOPY channels: further connections to the same address, in order.

        QEMU 7.2 opens them at setup, QEMU 8.0+ at the switch; the destination
        tells them apart by order.
        """
        self.channels += open_postcopy_channels(self.uri, n, self.config.param("liveness-timeout"),
                                                config=self.config, **self._channel_checks())

    def _channel_checks(self) -> dict:
        """page-checksums (Ferry peers only): channels send check values before the pages
        they cover, from a staging copy while the guest runs (channels/channel.py)."""
        on = effective_capability(self.peer, "page-checksums", self.config.cap("page-checksums"))
        wl = self.workload  # not self: channels must not keep the source alive
        # may_write, not running: pause() says "not running" before the guest's last writes land.
        running = (lambda: wl.may_write) if wl is not None else None
        return {"page_checks": on, "guest_running": running}

    # --- peer and dialect (engine/peer.py) ---
    @property
    def peer(self):
        return peer_features(self.config.param("peer"))

    def _preempt_at_setup(self) -> bool:
        """QEMU 7.2 opens POSTCOPY channels at setup and ends them with EOS; 8.0+ at the switch, no EOS."""
        return self.config.param("preempt-dialect") == DIALECT_AT_SETUP

    def _start_return_path(self, transport) -> None:
        self.rp = SourceReturnPath(transport, self.block_infos, self._on_request,
                                   weak_callback(self._accepting_requests),
                                   self._on_fault, on_thread_start=self.urgent.enter)
        if self.peer.rp_keepalive and self.uri.scheme != "file":
            # A Ferry destination sends a keepalive every liveness-timeout/3 s: silence is a fault.
            self.rp.bound_silence(self.config.param("liveness-timeout"))
        self.rp.start()

    def _accepting_requests(self) -> bool:
        return self.in_postcopy and self.status not in ST.FINAL_STATES

    def _precopy(self) -> bool:
        """Precopy passes until stop-and-copy fits (False) or the switch is due (True)."""
        st, cfg, ch, loop = self.stats, self.config, self.channel, self.loop
        postcopy = cfg.cap("postcopy-ram")
        while True:
            self._check()
            downtime_limit = cfg.param("downtime-limit") / 1000.0  # may change mid-migration
            if self._should_switch():
                return True
            ch.section_part(self._ram_section)
            # The switch may come due mid-iteration (postcopy-after-percent).
            loop.send_for(ITERATION_BUDGET, self._should_switch if postcopy else None)
            if self._multifd_queued() and not any(bm.count() for bm in self.bitmaps.values()):
                # The bitmap may be empty while the multifd channels still send the pass:
                # wait for them rather than spin through empty sections.
                self.multifd.drain(ITERATION_BUDGET)
            ch.send_eos()
            ch.section_footer(self._ram_section)
            ch.flush()
            self._update_bandwidth()
            remaining = (sum(bm.count() for bm in self.bitmaps.values()) + self._multifd_queued()) * C.TARGET_PAGE_SIZE
            fixed = self._multifd_stop_cost()
            expected, _ = stop_estimate(remaining, loop.bandwidth, downtime_limit, fixed)  # engine/downtime.py
            st.remaining = remaining
            if expected is not None:
                st.expected_downtime_ms = int(expected * 1000)
            if stop_estimate(remaining, loop.bandwidth, downtime_limit)[1]:  # the pass ends on its bytes alone
                remaining = (self._sync() + self._multifd_queued()) * C.TARGET_PAGE_SIZE
                fixed = self._multifd_stop_cost()  # with the round this sync made, when it is the first
                expected, fits = stop_estimate(remaining, loop.bandwidth, downtime_limit, fixed)
                if expected is not None:  # the estimate the stop decision uses
                    st.expected_downtime_ms = int(expected * 1000)
                if fits and not self._should_switch():
                    return False

    def _should_switch(self) -> bool:
        if not self.config.cap("postcopy-ram"):
            return False
        if not self._admitted():
            return False  # the destination has not confirmed it holds all its memory
        if self._postcopy_requested.is_set():
            return True
        after = self.config.param("postcopy-after-passes")
        if after and self.stats.ram.dirty_sync_count > after:
            return True
        pct = self.config.param("postcopy-after-percent")
        if pct:
            return self.loop.pages_sent() * 100 >= pct * self.ram.npages
        return False

    def _admitted(self) -> bool:
        if not self.admitted and self.rp is not None:
            with self.rp.cond:
                self.admitted = SW.PING_ADMITTED in self.rp.pongs
        return self.admitted

    def _sync(self, guest_running: bool = True) -> int:
        """Move the guest's dirty log into the migration bitmaps. Returns dirty pages."""
        now = time.monotonic()
        if self.multifd is not None and not self.multifd.finished:
            # The pass ends: no page sent from here on may overtake one sent before (multifd_send.py).
            self.multifd.sync()
            MF.write_flush(self.channel, self._ram_section)
        self.ram.collect_dirty()  # writes tracked outside this process (a guest process)
        with self.ram.dirty_lock:
            newly = 0
            for b in self.ram.blocks:
                log = self.ram.dirty_log[b.idstr].bits
                bm = self.bitmaps[b.idstr].bits
                newly += int(log.sum())
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
                            "guest-paused": not guest_running,  # the last sync, once the guest stopped
                            "time": round(now - self.stats.start_time, 4)})
        self.on_event("MIGRATION_PASS", {"pass": r.dirty_sync_count})
        return remaining

    def _update_bandwidth(self, force: bool = False) -> None:
        st = self.stats
        self.loop.update_bandwidth(st.setup_done or st.start_time, force)
        st.ram.mbps = self.loop.mbps
        st.ram.pages_per_second = self.loop.pages_per_second

    def _count_pages(self) -> None:
        r = self.stats.ram
        r.normal = sum(c.normal_pages for c in self.channels) + self._closed_normal
        r.duplicate = sum(c.zero_pages for c in self.channels) + self._closed_zero
        if self.multifd is not None:
            r.normal += self.multifd.normal_pages
            r.duplicate += self.multifd.zero_pages

    # --- stop-and-copy ---
    def _stop_and_copy(self) -> None:
        st, ch = self.stats, self.channel
        use_rp = self.rp is not None
        # The guest is paused: every byte now adds to the downtime.
        self._downtime_unlimited = True
        ch.writer.rate_limit = 0
        if self.multifd is not None:
            self.multifd.set_rate_limit(0)  # its channels too: the rest goes out unlimited
        t_paused = time.monotonic()
        self._sync(guest_running=False)
        t_synced = time.monotonic()
        ch.section_part(self._ram_section, end=True)
        self.loop.send_for(None)
        self._end_multifd(in_section=True)
        ch.send_eos()
        ch.section_footer(self._ram_section)
        if carries_devices(self.devices):
            # Carried from a QEMU stream: sections, EOF and vmdesc as they came.
            SW.end_postcopy_channels(self.channels, self._lock, eos=self._preempt_at_setup())
            ch.send_raw(carried_precopy_end(self.devices))
        else:
            state_size = None
            if self.peer.guest_device:
                extra = None
                if not use_rp and self.peer.digests:
                    # No return path to confirm on: the stream itself carries the digests.
                    st.digests = {n: d.hex() for n, d in self.ram.digests().items()}
                    extra = {"digests": st.digests}
                payload = SW.guest_state_bytes(self.workload, extra)
                state_size = len(payload)
                ch.device_full(ch.new_section_id(), SW.GUEST_DEVICE, SW.GUEST_DEVICE_VERSION, payload)
            # POSTCOPY channels opened at setup but never used still end with EOS.
            SW.end_postcopy_channels(self.channels, self._lock, eos=self._preempt_at_setup())
            ch.send_eof(SW.vm_description(self.ram, state_size))
        ch.flush()
        st.ram.downtime_bytes = ch.transferred + self._multifd_bytes() - st.ram.precopy_bytes
        # Where the downtime goes (ms); "confirm" (the destination draining and
        # loading what is still in flight) is added when it answers.
        st.extra["downtime-phases"] = {"pause": st._ms(st.downtime_start, t_paused),
                                       "sync": st._ms(t_paused, t_synced),
                                       "send": st._ms(t_synced, time.monotonic())}
        st.remaining = 0
        self._check()

    # --- the switch and postcopy ---
    def _switch(self) -> None:
        """Discards, then the point of no return: postcopy-active, then the package."""
        st, ch = self.stats, self.channel
        # Paused until RUN reaches the destination: no limit for the switch.
        self._downtime_unlimited = True
        ch.writer.rate_limit = 0
        self._sync(guest_running=False)
        self._end_multifd()  # postcopy pages go on the PRECOPY and POSTCOPY channels (docs/protocol.md)
        SW.widen_to_host_pages(self.ram, self.bitmaps)
        SW.send_discards(ch, self.ram, self.bitmaps)
        if not self._preempt_at_setup():  # QEMU 8.0+: at the switch
            self._connect_postcopy_channels(self.sched.postcopy_channels if self.sched.preempt else 0)
        if carries_devices(self.devices):
            device_part = self.devices.device_bytes  # carried verbatim from a QEMU stream
        elif self.peer.guest_device:
            device_part = SW.guest_device_section(ch, SW.guest_state_bytes(self.workload))
        else:
            device_part = b""
        self._check()
        # From the first byte of the package on, the destination may run the guest.
        self.in_postcopy = True
        self.sm.fire(ST.SWITCHOVER, expect=ST.ACTIVE)
        ch.send_raw(SW.package(device_part))
        ch.flush()
        self.sched.postcopy = True
        st.downtime_end = time.monotonic()  # the destination runs the guest from RUN on
        self.phases.mark("package-sent", ch.transferred, st.downtime_end)
        st.ram.downtime_bytes = ch.transferred + self._multifd_bytes() - st.ram.precopy_bytes
        self._postcopy_tuning()

    def _end_multifd(self, in_section: bool = False) -> None:
        """The last pass on the multifd channels: a sync point (unless ``_sync`` just made one), FIN, closed."""
        mf = self.multifd
        if mf is None or mf.finished:
            return
        if in_section:
            mf.sync()
            MF.write_flush(self.channel, self._ram_section, end=True)
        mf.finish(CONFIRM_TIMEOUT)  # from here the send loop uses the PRECOPY channel again

    def _postcopy_tuning(self) -> None:
        """Rate limit, flush size and pacing of the PRECOPY channel in postcopy."""
        ch, cfg = self.channel, self.config
        self.loop.hold_background = self.sched.preempt and cfg.param("preempt-hold-background")
        self.loop.breaks = cfg.param("preempt-write-breaks")
        ch.writer.rate_limit = cfg.param("max-postcopy-bandwidth")
        self._downtime_unlimited = False
        if self.sched.preempt:
            # Come back from blocking sends often enough to serve requests.
            ch.writer.auto_flush = PREEMPT_FLUSH_BYTES
            if self._pace_probe is not None:  # a recovery's new channel: measure from here
                now = time.monotonic()
                self._pace_probe = [now, now, ch.transferred, 0.0]
            if "precopy-pacing-rate" not in self.stats.extra:
                self.stats.extra["precopy-pacing-rate"] = self._pacing_rate()
            if hasattr(ch.writer.transport, "tune"):
                ch.writer.transport.tune(notsent_lowat=cfg.param("precopy-notsent-lowat"),
                                         pacing_rate=self.stats.extra["precopy-pacing-rate"])

    def _postcopy_until_done(self) -> None:
        """Background pages and requests until done; every fault pauses and waits for a recovery."""
        while True:
            try:
                if self.status == ST.POSTCOPY_PAUSED:
                    self._await_resume()  # returns in postcopy-active, or raises Paused to end
                self._postcopy_background()
                self._finish()
                return
            except Paused:
                raise
            except BaseException as e:  # noqa: BLE001
                self._pause(e)
                if self.status == ST.FAILED:
                    return  # the destination never ran the guest: it runs here again

    def _postcopy_background(self) -> None:
        st, ch = self.stats, self.channel
        self.phases.mark("first-background", ch.transferred, writes=ch.writer.writes, total=self._postcopy_bytes())
        while True:
            self._check()
            ch.section_part(self._ram_section)
            done = self.loop.send_for(ITERATION_BUDGET)
            ch.send_eos()
            ch.section_footer(self._ram_section)
            ch.flush()
            self._update_bandwidth()
            if self._pace_probe is not None:
                self._pace_from_probe()
            if self.sched.preempt:
                # A send blocks about as long as a chunk of an interruptible huge page
                # takes (send_loop.BREAK_WAIT): flushes as big as the chunks, not smaller.
                ch.writer.auto_flush = max(PREEMPT_FLUSH_BYTES, self.loop.break_step() << C.TARGET_PAGE_BITS)
            if done:
                break
        self._check()
        SW.end_postcopy_channels(self.channels, self._lock, eos=self._preempt_at_setup())
        SW.send_ram_end(ch, self._ram_section)
        ch.send_eof(None)  # no VM description in postcopy, as QEMU
        ch.flush()
        self.phases.mark("background-done", ch.transferred, writes=ch.writer.writes, total=self._postcopy_bytes())
        st.remaining = 0
        st.extra["postcopy-bytes"] = self._postcopy_bytes()

    def _multifd_queued(self) -> int:
        """Target pages queued on multifd channels, not sent yet (0 without multifd)."""
        mf = self.multifd
        return mf.queued_pages if mf is not None and not mf.finished else 0

    def _multifd_stop_cost(self) -> float:
        """Seconds the stop spends in multifd sync rounds (engine/multifd_send.py; 0 without multifd)."""
        mf = self.multifd
        return mf.stop_cost() if mf is not None and not mf.finished else 0.0

    def _multifd_bytes(self) -> int:
        return self.multifd.transferred if self.multifd is not None else 0

    def _postcopy_bytes(self) -> int:
        """Bytes sent after the switch to postcopy, on every channel (background and requested pages)."""
        st = self.stats
        return (self._closed_bytes + sum(c.transferred for c in self.channels) + self._multifd_bytes()
                - st.ram.precopy_bytes - st.ram.downtime_bytes)

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
        if _to_loopback(self.channel.writer.transport):
            # No link, no queue at one to keep empty: kernel pacing would only cost
            # CPU and background rate (measured: docs/performance.md).
            return 0
        base = cfg.param("max-postcopy-bandwidth")
        if not base:
            # What the peer acknowledged, not what left our buffers: bytes still
            # in the socket or a link queue say nothing about the path's pace.
            ch = self.channel
            now = time.monotonic()
            elapsed = now - (self.stats.setup_done or self.stats.start_time)
            delivered = ch.transferred - ch.writer.transport.outq()
            if elapsed < PACE_MIN_SECONDS or delivered < PACE_MIN_BYTES:
                self._pace_probe = [now, now, delivered, 0.0]  # too little to go by: _pace_from_probe
                return 0
            base = delivered / elapsed
        return int(base * PACE_SHARE)

    def _pace_from_probe(self) -> None:
        """Postcopy's first PACE_PROBE_SECONDS run unpaced; then pace at PACE_SHARE of
        the best PACE_PROBE_WINDOW's delivered rate (bytes the peer acknowledged)."""
        probe = self._pace_probe  # [start, window start, bytes delivered at window start, best rate]
        now = time.monotonic()
        tr = self.channel.writer.transport
        if now - probe[1] >= PACE_PROBE_WINDOW:
            delivered = self.channel.transferred - tr.outq()
            probe[3] = max(probe[3], (delivered - probe[2]) / (now - probe[1]))
            probe[1], probe[2] = now, delivered
        if now - probe[0] < PACE_PROBE_SECONDS:
            return
        self._pace_probe = None
        rate = int(probe[3] * PACE_SHARE)
        if rate > 0 and hasattr(tr, "tune"):
            tr.tune(pacing_rate=rate)
            self.stats.extra["precopy-pacing-rate"] = rate

    # --- page requests (return-path thread) ---
    def _on_request(self, msg: codec.RpMessage, blk) -> None:
        if self.status != ST.POSTCOPY_ACTIVE:
            return  # a recovery is under way: the destination asks again after RESUME
        host_page = msg.start >> C.TARGET_PAGE_BITS
        self.req_trace.mark(blk.index, host_page, "request-read", self.rp.last_heard)
        if self.rp.last_arrived is not None:
            self.req_trace.mark(blk.index, host_page, "request-arrived", self.rp.last_arrived)
        if self._rp_sends:
            self._send_urgent(blk.index, host_page)
        else:
            with self._lock:
                self.sched.request(blk.index, host_page)
                # Under the lock: the migration thread may take it the moment it is released.
                self.req_trace.mark(blk.index, host_page, "queued")
            self.loop.wake()  # a background write in progress looks at the queue

    def _send_urgent(self, block: int, host_page: int) -> None:
        """urgent-pages-from=return-path: send a requested page from this thread, now."""
        with self._lock:
            order = self.sched.claim(block, host_page)
            if order is None:
                return
            pc = self.channels[order.channel]
            pc.lock.acquire()  # taken before releasing the scheduler: EOS waits for us
            self.loop.urgent_busy += 1
        try:
            tr = self.req_trace
            tr.mark(block, host_page, "queued")
            tr.mark(block, host_page, "send-start")
            pc.send_range(self.ram.blocks[block], order.start, order.end)
            pc.flush()
            tr.mark(block, host_page, "flushed")
        finally:
            pc.lock.release()
            with self._lock:
                self.loop.urgent_busy -= 1
            # After the send, not before: the migration thread then holds background
            # pages while these bytes leave, without taking the GIL from this send.
            self.loop.wake()

    # --- the end ---
    def _finish(self) -> None:
        """Wait for the destination's confirmation, compare digests, decide, tell the destination."""
        st = self.stats
        if self.rp is None:
            st.downtime_end = time.monotonic()
        else:
            self._await_confirmation()
        st.end_time = time.monotonic()
        st.extra["transfer-time"] = st._ms(st.start_time, self._confirmed_at or st.downtime_end)
        st.extra["verify-time"] = st._ms(self._confirmed_at or st.downtime_end, st.end_time)
        if self.in_postcopy and st.downtime_end is not None:
            # The postcopy phase: the switch's end -> the destination confirmed every page.
            st.extra["postcopy-time"] = st._ms(st.downtime_end, self._confirmed_at or st.end_time)
        self._update_bandwidth(force=True)
        st.transferred = self._closed_bytes + sum(c.transferred for c in self.channels) + self._multifd_bytes()
        self.sm.fire(ST.COMPLETE)
        if self.rp is not None and self.rp.digests is not None:
            # The destination's guest may run once it read this (docs/reliability.md).
            self._verdict_at = self.channel.transferred
            try:
                self.channel.send_raw(codec.encode_ferry_verdict(C.FERRY_VERDICT_COMPLETED))
                self.channel.flush()
                st.extra["verdict"] = "delivered"
                self.phases.mark("end", self.channel.transferred)
            except ChannelError as e:
                st.extra["verdict"] = f"not delivered: {e}"

    def _await_confirmation(self) -> None:
        """Wait for SHUT(0) and the destination's digests; compare with ours.

        Raises ChannelError on a timeout, a failure reported by the destination,
        or digests that differ.
        """
        rp = self.rp
        if not rp.wait(lambda: rp.shut is not None, CONFIRM_TIMEOUT):
            self._check()
            raise ChannelError("destination did not confirm the load in time")
        self._confirmed_at = time.monotonic()
        self.phases.mark("confirmed", self.channel.transferred, self._confirmed_at)
        if not self.in_postcopy:
            self.stats.downtime_end = self._confirmed_at  # the destination may run the guest now
            phases = self.stats.extra.get("downtime-phases")
            if phases is not None:
                phases["confirm"] = max(0, self.stats._ms(self.stats.downtime_start, self._confirmed_at)
                                        - sum(phases.values()))
        self._check()
        if self.peer.completion == COMPLETION_SHUT:
            # A QEMU destination sends SHUT(0) and closes the return path; no digests.
            self.stats.extra["completion"] = "shut"
            if not rp.wait(lambda: rp.closed, CONFIRM_TIMEOUT):
                raise ChannelError("destination confirmed (SHUT 0) but did not close the return path")
            return
        self.stats.extra["completion"] = "digests"
        ours = self.ram.digests()
        if not rp.wait(lambda: rp.digests is not None, CONFIRM_TIMEOUT):
            self._check()
            raise ChannelError("destination did not send its digests in time")
        theirs = rp.digests
        self.stats.digests = {n: d.hex() for n, d in ours.items()}
        bad = [n for n in ours if theirs.get(n) != ours[n]]
        extra = [n for n in theirs if n not in ours]
        if bad or extra:
            self._verdict_at = self.channel.transferred
            try:  # the destination must not run the guest on that memory
                self.channel.send_raw(codec.encode_ferry_verdict(C.FERRY_VERDICT_FAILED))
                self.channel.flush()
            except ChannelError:
                pass
            raise ProtocolError(f"digest mismatch after load: blocks {bad + extra} differ between source "
                                "and destination")

    def _fail(self, err: BaseException) -> None:
        """A fault before the point of no return: failed (or cancelled); the table resumes the guest."""
        st = self.stats
        st.end_time = time.monotonic()
        if isinstance(err, MigrationCancelled):
            err = None
        if (err is None or (isinstance(err, ChannelError) and not isinstance(err, ProtocolError))) \
                and self._fault is not None:
            err = self._fault  # the return path said why the stream broke
        elif isinstance(err, ChannelError) and not isinstance(err, ProtocolError) and self.rp is not None:
            # The stream broke; the return path may be reading why (the
            # destination's message is the more useful error).
            self.rp.join(1.0)
            if self._fault is not None:
                err = self._fault
        if self.channels:
            st.transferred = self._closed_bytes + sum(c.transferred for c in self.channels) + self._multifd_bytes()
        if self._cancel and (err is None or isinstance(err, ChannelError)):
            self.sm.try_fire(ST.CANCEL)
            self.sm.try_fire(ST.CANCEL_DONE)
            return
        st.error = str(err) if err is not None else "migration failed"
        self.sm.fire(ST.FAIL, reason=st.error)

    # --- pause and recovery ---
    def _pause(self, err: BaseException) -> None:
        """A fault after the point of no return: postcopy-paused, channels closed, guest kept stopped."""
        if self._fault is not None and (isinstance(err, ChannelError) and not isinstance(err, ProtocolError)):
            err = self._fault
        if isinstance(err, DestinationNeverRan) and self.status == ST.POSTCOPY_RECOVER:
            # The destination's word that its guest never ran (engine/never_ran.py): the one
            # row of the table back to a state where the guest may run here.
            self._close_connection()
            self.stats.error = str(err)
            self.stats.end_time = time.monotonic()
            if self.sm.try_fire(ST.NEVER_RAN, reason=self.stats.error) is not None:
                return
        if self.status != ST.POSTCOPY_PAUSED or not self.stats.error:
            self.stats.error = str(err)
        self.sm.try_fire(ST.FAIL, reason=self.stats.error)
        self._close_connection()

    def _postcopy_lost(self, e: BaseException) -> None:
        """The migration thread ends while paused (the worker quits): the guest stays stopped here."""
        if not isinstance(e, Paused):
            self._pause(e)
        self.stats.end_time = time.monotonic()

    def _close_connection(self) -> None:
        """Close every channel of the current connection and end its return path."""
        if self.rp is not None:
            self.rp.close()
            self.rp.join(5)
        for c in self.channels:
            c.writer.transport.shutdown()
            try:
                c.writer.transport.close()
            except OSError:
                pass
        if self.multifd is not None and not self.multifd.finished:
            self.multifd.shutdown()
            self.multifd.join()
            self.multifd.close()

    def _await_resume(self) -> None:
        """Block in postcopy-paused until resume() gives a URI; then recover (engine/recovery.py)."""
        from .recovery import recover_source  # recovery imports this module's names
        with self._resume_cond:
            while self._resume_uri is None:
                if self._quit:
                    raise Paused("worker quit while the migration was postcopy-paused")
                self._resume_cond.wait(0.5)
            self.uri, self._resume_uri = self._resume_uri, None
        self._fault = None
        recover_source(self)
        self.recoveries += 1
        self.stats.error = None
