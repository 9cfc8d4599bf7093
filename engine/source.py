"""The source side: migration thread (precopy passes, stop-and-copy) and return-path thread.

Precopy: the first pass sends every page; each later pass sends the pages the
guest dirtied meanwhile (dirty bitmap synced from the guest's dirty log). The
migration thread estimates bandwidth every 100 ms; once the bytes still to
send fit the downtime limit at that bandwidth, it stops the guest, sends the
rest (stop-and-copy), the guest's non-RAM state and EOF. It reports
``completed`` only after the destination confirmed the load (SHUT 0) and its
per-block digests matched ours; until then the guest's memory is kept as it is.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Callable

from channels import codec
from channels import constants as C
from channels.channel import PrecopyChannel
from channels.errors import ChannelError, ProtocolError
from channels.qemufile import QEMUFileReader, QEMUFileWriter
from channels.transport import connect, parse_uri

from . import stats as S
from .bitmap import PageBitmap
from .params import MigrationConfig
from .ram import GuestRAM
from .workload import Workload

GUEST_DEVICE = "ferry-guest"  # Ferry's own device section: the workload's state
GUEST_DEVICE_VERSION = 1
BANDWIDTH_WINDOW = 0.1  # s, QEMU's BUFFER_DELAY
ITERATION_BUDGET = 0.05  # s of sending per PART section, QEMU's MAX_WAIT
RUN_PAGES = 256  # most target pages sent in one go on 4 KiB-page blocks
CONFIRM_TIMEOUT = 120.0  # s to wait for the destination's confirmation


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
        self._thread: threading.Thread | None = None
        self._rp_thread: threading.Thread | None = None
        self._cancel = False
        self._done = threading.Event()
        self.channel: PrecopyChannel | None = None
        self.uri = None
        # Return-path results
        self._rp_shut: int | None = None
        self._rp_digests: dict | None = None
        self._rp_error: BaseException | None = None
        self._rp_event = threading.Condition()
        self.passes = []  # per-pass figures (MIGRATION_PASS)

    # --- public API ---
    @property
    def status(self) -> str:
        return self.stats.status

    def start(self, uri: str) -> None:
        """Begin migrating to ``uri`` in a background thread."""
        if self.stats.status not in (S.NONE, S.FAILED, S.CANCELLED):
            raise RuntimeError(f"migration already {self.stats.status}")
        self.uri = parse_uri(uri)
        self._thread = threading.Thread(target=self._run, name="migration", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> str:
        self._done.wait(timeout)
        return self.stats.status

    def cancel(self) -> None:
        """migrate-cancel: stop sending, resume the guest here."""
        if self.stats.status in S.FINAL_STATES or self.stats.status == S.NONE:
            return
        self._cancel = True
        self._set_state(S.CANCELLING)
        if self.channel is not None:
            self.channel.shutdown()

    def query(self) -> dict:
        st = self.stats
        if st.status not in S.FINAL_STATES:
            st.remaining = sum(bm.count() for bm in self.bitmaps.values()) * C.TARGET_PAGE_SIZE
        if self.channel is not None:
            st.transferred = self.channel.transferred
            st.channels = {"precopy": {"bytes": self.channel.transferred,
                                       "normal": self.channel.normal_pages,
                                       "duplicate": self.channel.zero_pages}}
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

    def _sync(self) -> int:
        """Move the guest's dirty log into the migration bitmaps. Returns dirty pages."""
        now = time.monotonic()
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
        if r.dirty_sync_count > 0 and dt > 0:
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

    def _send_dirty(self, ch: PrecopyChannel, budget: float | None) -> bool:
        """Send dirty pages from the cursor on. True when the bitmaps are empty."""
        deadline = None if budget is None else time.monotonic() + budget
        blocks = self.ram.blocks
        nblocks = len(blocks)
        r = self.stats.ram
        checked = 0
        while checked <= nblocks:
            blk = blocks[self._cur_block]
            bm = self.bitmaps[blk.idstr]
            p = bm.next_set(self._cur_page)
            if p >= blk.npages:
                # Block done: next block, wrapping; a full lap with nothing = empty.
                self._cur_block = (self._cur_block + 1) % nblocks
                self._cur_page = 0
                checked += 1
                continue
            checked = 0
            limit = blk.host_page_of(p) + blk.tp_per_hp if blk.tp_per_hp > 1 else p + RUN_PAGES
            e = bm.next_clear(p, min(limit, blk.npages))
            bm.bits[p:e] = False
            normal, zero = ch.send_range(blk, p, e)
            r.normal += normal
            r.duplicate += zero
            self._cur_page = e
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if self._cancel or self._rp_error is not None:
                return False
        return True

    def _update_bandwidth(self, ch: PrecopyChannel, force: bool = False) -> None:
        now = time.monotonic()
        dt = now - self._bw_t
        if dt < BANDWIDTH_WINDOW and not force:
            return
        sent = ch.transferred - self._bw_bytes
        pages = (self.stats.ram.normal + self.stats.ram.duplicate) - self._bw_pages
        if dt > 0 and sent > 0:
            self._bandwidth = sent / dt
            self.stats.ram.mbps = self._bandwidth * 8 / 1e6
            self.stats.ram.pages_per_second = pages / dt
        self._bw_t, self._bw_bytes = now, ch.transferred
        self._bw_pages = self.stats.ram.normal + self.stats.ram.duplicate

    def _run(self) -> None:
        st = self.stats
        st.start_time = time.monotonic()
        self._last_sync = st.start_time
        self._cur_block = 0
        self._cur_page = 0
        self._bandwidth = 0.0
        self._bw_t, self._bw_bytes, self._bw_pages = st.start_time, 0, 0
        self._set_state(S.SETUP)
        transport = None
        paused_here = False
        try:
            transport = connect(self.uri)
            use_rp = self.config.cap("return-path") and self.uri.scheme != "file"
            writer = QEMUFileWriter(transport, rate_limit=self.config.param("max-bandwidth"), name="precopy")
            ch = self.channel = PrecopyChannel(writer)
            ch.send_header()
            if use_rp:
                ch.send_raw(codec.encode_open_return_path())
                self._start_return_path(transport)
            self._ram_section = ch.new_section_id()
            ch.ram_start(self._ram_section, self.ram.blocks, postcopy=False)
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
            downtime_limit = self.config.param("downtime-limit") / 1000.0
            while True:
                self._check_cancel()
                ch.section_part(self._ram_section)
                self._send_dirty(ch, ITERATION_BUDGET)
                ch.send_eos()
                ch.section_footer(self._ram_section)
                ch.flush()
                self._update_bandwidth(ch)
                remaining = sum(bm.count() for bm in self.bitmaps.values()) * C.TARGET_PAGE_SIZE
                threshold = self._bandwidth * downtime_limit
                st.remaining = remaining
                if self._bandwidth > 0:
                    st.expected_downtime_ms = int(remaining / self._bandwidth * 1000)
                if remaining <= threshold:
                    remaining = self._sync() * C.TARGET_PAGE_SIZE
                    if remaining <= threshold:
                        break
            st.ram.precopy_bytes = ch.transferred
            # Stop-and-copy.
            self._check_cancel()
            st.downtime_start = time.monotonic()
            if self.workload is not None:
                self.workload.pause()
                paused_here = True
            self._set_state(S.DEVICE)
            self._sync()
            ch.section_part(self._ram_section, end=True)
            self._send_dirty(ch, None)
            ch.send_eos()
            ch.section_footer(self._ram_section)
            state = dict(self.workload.state()) if self.workload is not None else {}
            if not use_rp:
                # No return path to confirm on: the stream itself carries the digests.
                state["digests"] = {n: d.hex() for n, d in self.ram.digests().items()}
            ch.device_full(ch.new_section_id(), GUEST_DEVICE, GUEST_DEVICE_VERSION,
                           json.dumps(state).encode())
            ch.send_eof(vm_description(self.ram))
            ch.flush()
            st.ram.downtime_bytes = ch.transferred - st.ram.precopy_bytes
            st.remaining = 0
            if use_rp:
                self._await_confirmation()
            else:
                st.digests = state["digests"]
                st.downtime_end = time.monotonic()
            st.end_time = time.monotonic()
            self._update_bandwidth(ch, force=True)
            st.transferred = ch.transferred
            if self.workload is not None:
                self.workload.stop()  # the guest now runs on the destination
            self._set_state(S.COMPLETED)
        except MigrationCancelled:
            self._fail(None, paused_here)
        except (ChannelError, OSError, ProtocolError, TimeoutError, ValueError) as e:
            self._fail(e, paused_here)
        except Exception as e:  # noqa: BLE001 - a worker must report, never die silently
            self._fail(e, paused_here)
        finally:
            if transport is not None:
                transport.shutdown()
                if self._rp_thread is not None:
                    self._rp_thread.join(5)
                transport.close()
            self._done.set()

    def _fail(self, err, paused_here: bool) -> None:
        st = self.stats
        st.end_time = time.monotonic()
        if self._rp_error is not None and (err is None or isinstance(err, ChannelError)):
            err = self._rp_error  # the return path said why the stream broke
        if paused_here and self.workload is not None:
            self.workload.resume()  # the guest goes on running here, memory untouched
        if self.channel is not None:
            st.transferred = self.channel.transferred
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
            if self.channel is not None:
                self.channel.shutdown()

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
            pass
        elif t == C.MIG_RP_MSG_FERRY_DIGESTS:
            with self._rp_event:
                self._rp_digests = msg.digests
                self._rp_event.notify_all()
        elif t in (C.MIG_RP_MSG_REQ_PAGES, C.MIG_RP_MSG_REQ_PAGES_ID):
            raise ProtocolError(f"return path {msg.name}: page request while not in postcopy "
                                f"(block {msg.block!r}, start 0x{msg.start:x})")
        else:
            raise ProtocolError(f"return path {msg.name}: not expected by the source in precopy")

    def _await_confirmation(self) -> None:
        """Wait for SHUT(0) and the destination's digests; compare with ours."""
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        with self._rp_event:
            while self._rp_shut is None and self._rp_error is None:
                left = deadline - time.monotonic()
                if left <= 0 or self._cancel:
                    break
                self._rp_event.wait(min(left, 0.5))
        self.stats.downtime_end = time.monotonic()  # the destination may run the guest now
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
