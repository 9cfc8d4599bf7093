"""The destination side: accept the stream, validate every record, fill guest RAM.

Each channel has its own loader (reader + decoder with its own last-received
block). In precopy, pages are written as they come (a later version
overwrites an earlier one). After POSTCOPY_LISTEN, pages are assembled per
host page and placed whole (engine/postcopy.py), and guest threads that
touch a page not yet received request it over the return path and wait.

At the end the destination confirms over the return path (SHUT 0) once every
page is placed, then sends its per-block digests so the source can verify
before it lets go of the guest.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Callable


from channels import codec
from channels import constants as C
from channels.channel import RamRecvChannel
from channels.codec import DeviceSpec, StreamDecoder
from channels.errors import ChannelError, ProtocolError, UnverifiedStreamError
from channels.pagecheck import PageChecker
from channels.qemufile import QEMUFileReader, QEMUFileWriter
from channels.transport import Listener

from . import stats as S
from .params import MigrationConfig
from .postcopy import FaultHandler, HostPageAssembler, ReceivedPages
from .ram import GuestRAM, RAMBlock, fingerprint_digest, page_selector
from .source import GUEST_DEVICE, GUEST_DEVICE_VERSION
from .workload import Workload

ACCEPT_POLL = 0.2  # s between checks for cancel while waiting for the source
_DEVICES = [DeviceSpec(GUEST_DEVICE, GUEST_DEVICE_VERSION)]


class MigrationDestination:
    """Receives a migration into a GuestRAM of the same shape as the source's.

    ``workload``, if given, is the guest's workload on this side: it starts at
    POSTCOPY_RUN with the source's progress counters and faults pages in.
    """

    def __init__(self, ram: GuestRAM, config: MigrationConfig | None = None,
                 on_event: Callable[[str, dict], None] | None = None,
                 workload: Workload | None = None):
        self.ram = ram
        self.config = config or MigrationConfig()
        self.on_event = on_event or (lambda name, data: None)
        self.workload = workload
        self.stats = S.MigrationStats()
        self.stats.total = ram.total
        self.received = ReceivedPages(ram)
        self.faults = FaultHandler(ram, self.received, self._send_request)
        self.listener: Listener | None = None
        self.guest_state: dict | None = None
        self.vmdesc: dict | None = None
        self.postcopy_advised = False
        self.listening = False  # after POSTCOPY_LISTEN
        self.running = False  # after POSTCOPY_RUN: the guest runs here
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._cancel = False
        self._channel: RamRecvChannel | None = None
        self._assembler: HostPageAssembler | None = None
        self._checker: PageChecker | None = None  # precopy placement on the main channel
        self._rp: QEMUFileWriter | None = None
        self._rp_lock = threading.Lock()
        self._last_req_block: str | None = None
        self._listen_bytes = 0
        # POSTCOPY channels (postcopy-preempt): loaders, each in its own thread.
        self._pc_threads: list[threading.Thread] = []
        self._pc_channels: list[RamRecvChannel] = []
        self._pc_assemblers: list[HostPageAssembler] = []
        self._pc_error: BaseException | None = None
        self._pc_expected = 0
        self._pc_connected = threading.Condition()

    @property
    def status(self) -> str:
        return self.stats.status

    def listen(self, uri: str) -> str:
        """Bind the incoming URI; returns it with the real port (tcp port 0 allowed)."""
        self.listener = Listener(uri)
        self._set_state(S.SETUP)
        return str(self.listener.uri)

    def start(self) -> None:
        """Accept and load in a background thread (after listen)."""
        if self.listener is None:
            raise RuntimeError("listen() first")
        self._thread = threading.Thread(target=self._run, name="incoming", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> str:
        self._done.wait(timeout)
        return self.stats.status

    def cancel(self) -> None:
        self._cancel = True
        for ch in [self._channel, *self._pc_channels]:
            if ch is not None:
                ch.shutdown()

    def query(self) -> dict:
        st = self.stats
        r = st.ram
        if self._channel is not None:
            st.transferred = self._channel.transferred + sum(c.transferred for c in self._pc_channels)
            st.channels = {"precopy": {"bytes": self._channel.transferred,
                                       "normal": r.normal, "duplicate": r.duplicate}}
            if self._assembler is not None:
                st.channels["precopy"]["postcopy-pages-placed"] = self._assembler.pages_placed
            for c, a in zip(self._pc_channels, self._pc_assemblers):
                st.channels[c.name] = {"bytes": c.transferred, "pages-placed": a.pages_placed,
                                       "host-pages-placed": a.host_pages_placed}
        if st.status not in S.FINAL_STATES:
            st.remaining = (self.ram.npages - self.received.count()) * C.TARGET_PAGE_SIZE
        if self.postcopy_advised:
            st.extra.update(self.faults.metrics())
            if self._channel is not None and self.listening:
                st.extra["postcopy-bytes"] = self._channel.transferred - self._listen_bytes
        return st.to_dict()

    def _set_state(self, new: str) -> None:
        if self.stats.status != new:
            self.stats.status = new
            self.on_event("MIGRATION", {"status": new})

    def _accept(self):
        while True:
            if self._cancel:
                raise ChannelError("incoming migration cancelled")
            listener = self.listener
            if listener is None:
                raise ChannelError("incoming listener closed")
            try:
                return listener.accept(timeout=ACCEPT_POLL)
            except TimeoutError:
                continue

    def _rp_send(self, data: bytes) -> None:
        with self._rp_lock:
            self._rp.put_bytes(data)
            self._rp.flush()

    def _send_request(self, blk: RAMBlock, start: int, length: int) -> None:
        """One REQ_PAGES_ID (block changed since the last request) or REQ_PAGES."""
        with self._rp_lock:
            name = blk.idstr if blk.idstr != self._last_req_block else None
            self._last_req_block = blk.idstr
            self._rp.put_bytes(codec.encode_rp_req_pages(start, length, name))
            self._rp.flush()

    def _run(self) -> None:
        st = self.stats
        transport = None
        try:
            transport = self._accept()
            st.start_time = time.monotonic()
            # The destination's setup is the wait for the source; it ends here.
            # (Unset, query-migrate's setup-time would keep growing past total-time.)
            st.setup_done = st.start_time
            cfg = self.config
            if hasattr(transport, "tune"):
                transport.tune(rcvbuf=cfg.param("precopy-rcvbuf"))
            self._pc_expected = cfg.param("postcopy-channels") if cfg.cap("postcopy-preempt") else 0
            if self._pc_expected:
                threading.Thread(target=self._accept_channels, name="incoming-channels", daemon=True).start()
            else:
                self._close_listener()  # a further connection is refused
            self._set_state(S.ACTIVE)
            reader = QEMUFileReader(transport, name="precopy")
            dec = StreamDecoder(self.ram.infos(), devices=_DEVICES)
            self._channel = RamRecvChannel(reader, dec, "precopy")
            self._load(self._channel, transport)
            self._join_channels()
            self._finish()
            st.end_time = time.monotonic()
            self._set_state(S.COMPLETED)
        except Exception as e:  # noqa: BLE001 - report every failure, never die silently
            st.end_time = time.monotonic()
            if self._pc_error is not None and isinstance(e, ChannelError) and not isinstance(e, ProtocolError):
                e = self._pc_error  # a POSTCOPY channel failed and broke the main one
            st.error = str(e) if not self._cancel else "incoming migration cancelled"
            for c in self._pc_channels:
                c.shutdown()
            if self.running:
                # The guest runs here and some pages never arrived: its threads
                # stay blocked on them rather than read memory that is not there.
                self.faults.failed = st.error
            if self._rp is not None:
                try:
                    self._rp_send(codec.encode_rp_shut(1))
                except ChannelError:
                    pass
            self._set_state(S.CANCELLED if self._cancel and not self.running else S.FAILED)
        finally:
            if transport is not None:
                transport.shutdown()
                transport.close()
            self._close_listener()
            for t in self._pc_threads:
                t.join(5)
            for c in self._pc_channels:
                c.reader.transport.close()
            self._done.set()

    def _close_listener(self) -> None:
        with self._pc_connected:
            if self.listener is not None:
                self.listener.close()
                self.listener = None

    def _accept_channels(self) -> None:
        """Accept the POSTCOPY channels: the connections after the main one, in order."""
        try:
            for i in range(self._pc_expected):
                t = self._accept()
                name = "postcopy" if self._pc_expected == 1 else f"postcopy{i + 1}"
                dec = StreamDecoder(self.ram.infos(), mode="pages", channel_name=name)
                ch = RamRecvChannel(QEMUFileReader(t, bufsize=1 << 20, name=name), dec, name)
                asm = HostPageAssembler(self.ram, self.received, name, self.config.cap("page-checksums"))
                th = threading.Thread(target=self._channel_loop, args=(ch, asm), name=f"load-{name}", daemon=True)
                with self._pc_connected:
                    self._pc_channels.append(ch)
                    self._pc_assemblers.append(asm)
                    self._pc_threads.append(th)
                    self._pc_connected.notify_all()
                th.start()
        except Exception as e:  # noqa: BLE001
            if not self._done.is_set() and not self._cancel:
                self._channel_failed(e)
        finally:
            self._close_listener()  # beyond the expected number: refused

    def _channel_loop(self, ch: RamRecvChannel, asm: HostPageAssembler) -> None:
        """Loader of one POSTCOPY channel: bare page records until EOS."""
        try:
            while True:
                ev = ch.next_event()
                if ev is None:
                    if ch.decoder.at_boundary():
                        return
                    raise ProtocolError(f"channel {ch.name}: stream ended before EOS")
                if isinstance(ev, codec.RamEOS):
                    return
                if not self.listening:
                    raise ProtocolError(f"channel {ch.name}: page record before POSTCOPY_LISTEN")
                asm.add(ev)
        except Exception as e:  # noqa: BLE001
            if not self._done.is_set() and not self._cancel and self.stats.status not in S.FINAL_STATES:
                self._channel_failed(e)

    def _channel_failed(self, e: BaseException) -> None:
        self._pc_error = e
        if self._channel is not None:
            self._channel.shutdown()  # fail the whole migration, with this error

    def _join_channels(self) -> None:
        """Wait until every POSTCOPY channel connected and reached EOS."""
        if not self._pc_expected:
            return
        deadline = time.monotonic() + 30
        with self._pc_connected:
            while len(self._pc_threads) < self._pc_expected and self._pc_error is None:
                if time.monotonic() > deadline:
                    raise ProtocolError(f"postcopy-preempt: {len(self._pc_threads)} of {self._pc_expected} POSTCOPY "
                                        "channels connected; enable postcopy-preempt (and the same "
                                        "postcopy-channels) on both sides")
                self._pc_connected.wait(0.2)
        for t in self._pc_threads:
            while t.is_alive():
                if self._pc_error is not None:
                    break
                if time.monotonic() > deadline:
                    raise ProtocolError(f"POSTCOPY channel {t.name[5:]}: no EOS after the main stream ended")
                t.join(0.2)
        if self._pc_error is not None:
            raise self._pc_error

    def _load(self, ch: RamRecvChannel, transport) -> None:
        got_eof = False
        while True:
            ev = ch.next_event()
            if ev is None:
                if got_eof:
                    return
                raise ProtocolError("stream ended before EOF")
            if isinstance(ev, codec.RamRun):
                if self.listening:
                    self._assembler.add(ev)
                else:
                    self._place_precopy(ev)
            elif isinstance(ev, codec.EndOfStream):
                got_eof = True
                if self.listening:
                    return  # no VM description in postcopy
                if transport.name.startswith("file:") or ch.reader.available() > 0:
                    continue  # a saved stream ends with the VM description
                return
            elif isinstance(ev, codec.VMDescription):
                self.vmdesc = ev.json
                return
            else:
                self._event(ev)

    def _event(self, ev) -> None:
        """Non-RAM events, of the main stream or of a PACKAGED blob."""
        if isinstance(ev, codec.Command):
            self._command(ev)
        elif isinstance(ev, codec.DeviceState):
            try:
                state = json.loads(ev.payload)
            except (ValueError, RecursionError) as e:
                raise ProtocolError(f"section {ev.idstr!r}: state is not valid JSON ({e})") from None
            if not isinstance(state, dict):
                raise ProtocolError(f"section {ev.idstr!r}: state is a JSON {type(state).__name__}, "
                                    "expected an object")
            digests = state.get("digests")
            if digests is not None and not (isinstance(digests, dict)
                                            and all(isinstance(v, str) for v in digests.values())):
                raise ProtocolError(f"section {ev.idstr!r}: field 'digests' is {digests!r:.60}, expected an "
                                    "object of block name to hex digest")
            self.guest_state = state

    def _place_precopy(self, run: codec.RamRun) -> None:
        """Precopy: check a run of pages, write it (newer versions overwrite), mark it received.

        Raises PageIntegrityError (or UnverifiedStreamError, with page-checksums
        on and no check values) before anything is written.
        """
        if self._checker is None:
            self._checker = PageChecker(self._channel.name, self.config.cap("page-checksums"))
        self._checker.check(run)
        blk = self.ram.blocks[run.block.index]
        where = page_selector(run.pages)
        blk.write_pages(where, run.data)
        if run.data is None:
            self.stats.ram.duplicate += len(run.pages)
        else:
            self.stats.ram.normal += len(run.pages)
        self.received.bitmaps[blk.idstr].bits[where] = True

    def _command(self, cmd: codec.Command) -> None:
        c = cmd.cmd
        if c == C.MIG_CMD_OPEN_RETURN_PATH:
            if self._rp is None:
                self._rp = QEMUFileWriter(self._channel.reader.transport, name="return-path")
        elif c == C.MIG_CMD_PING:
            if self._rp is not None:
                self._rp_send(codec.encode_rp_pong(codec.parse_ping(cmd.payload)))
        elif c == C.MIG_CMD_POSTCOPY_ADVISE:
            self._advise(codec.parse_postcopy_advise(cmd.payload))
        elif c == C.MIG_CMD_POSTCOPY_RAM_DISCARD:
            self._discard(cmd.payload)
        elif c == C.MIG_CMD_PACKAGED:
            self._packaged(cmd.payload)
        elif c == C.MIG_CMD_POSTCOPY_LISTEN:
            self._listen()
        elif c == C.MIG_CMD_POSTCOPY_RUN:
            self._run_guest()
        else:
            raise ProtocolError(f"command {cmd.name}: not supported by this destination")

    def _advise(self, adv) -> None:
        if adv is None:
            return  # precopy-only advise: nothing to do
        summary, tps = adv
        ours = 0
        for b in self.ram.blocks:
            ours |= b.page_size
        if tps != C.TARGET_PAGE_SIZE:
            raise ProtocolError(f"POSTCOPY_ADVISE: target page size 0x{tps:x}, destination has "
                                f"0x{C.TARGET_PAGE_SIZE:x}; postcopy refused")
        if summary != ours:
            raise ProtocolError(f"POSTCOPY_ADVISE: source host page sizes 0x{summary:x}, destination has "
                                f"0x{ours:x}; postcopy refused")
        if self._rp is None:
            raise ProtocolError("POSTCOPY_ADVISE: postcopy needs the return path (OPEN_RETURN_PATH first)")
        self.postcopy_advised = True

    def _discard(self, payload: bytes) -> None:
        if not self.postcopy_advised:
            raise ProtocolError("POSTCOPY_RAM_DISCARD: postcopy was not advised")
        if self.listening:
            raise ProtocolError("POSTCOPY_RAM_DISCARD: after POSTCOPY_LISTEN")
        name, pairs = codec.parse_postcopy_discard(payload)
        blk = self.ram.by_name.get(name)
        if blk is None:
            raise ProtocolError(f"POSTCOPY_RAM_DISCARD: unknown RAM block {name!r}")
        for start, length in pairs:
            if start % blk.page_size or length % blk.page_size or start + length > blk.length or length == 0:
                raise ProtocolError(f"POSTCOPY_RAM_DISCARD: range 0x{start:x}+0x{length:x} of block {name!r} "
                                    f"not host-page aligned (0x{blk.page_size:x}) or outside it "
                                    f"(length 0x{blk.length:x})")
            self.received.discard(blk, start, length)

    def _packaged(self, blob: bytes) -> None:
        dec = StreamDecoder(self.ram.infos(), mode="packaged", devices=_DEVICES, channel_name="packaged")
        mv = memoryview(blob)
        pos = 0
        while pos < len(blob):
            ev, n = dec.next_event(mv[pos:])
            if ev is codec.NEED_DATA:
                raise ProtocolError(f"PACKAGED: truncated blob: {dec.expecting()} at byte {pos} of {len(blob)}")
            pos += n
            if isinstance(ev, codec.RamRun):
                raise ProtocolError("PACKAGED: RAM pages inside the package")
            self._event(ev)

    def _listen(self) -> None:
        if not self.postcopy_advised:
            raise ProtocolError("POSTCOPY_LISTEN: postcopy was not advised")
        if self.listening:
            raise ProtocolError("POSTCOPY_LISTEN: received twice")
        # What memory holds now is what precopy delivered (the guest has not run here).
        self.received.snapshot_fingerprints()
        self._assembler = HostPageAssembler(self.ram, self.received, "precopy", self.config.cap("page-checksums"))
        self.listening = True
        self._listen_bytes = self._channel.transferred
        self.faults.enabled = True
        self._set_state(S.POSTCOPY_ACTIVE)

    def _run_guest(self) -> None:
        if not self.listening:
            raise ProtocolError("POSTCOPY_RUN: before POSTCOPY_LISTEN")
        if self.running:
            raise ProtocolError("POSTCOPY_RUN: received twice")
        if self.guest_state is None and self.config.cap("page-checksums"):
            raise UnverifiedStreamError(f"POSTCOPY_RUN: the package carried no {GUEST_DEVICE!r} section; "
                                        "the guest does not start without its state")
        self.running = True
        self.stats.extra["guest-state"] = self.guest_state or {}
        if self.workload is not None:
            self.workload.restore(self.guest_state or {})
            self.workload.access_hook = self.faults.ensure
            self.workload.start()

    def _finish(self) -> None:
        """All loaded: check completeness, confirm, send digests."""
        if self.config.cap("page-checksums"):
            # A Ferry stream always carries its guest section; without a return
            # path (file:) its digests are the only check of the whole load.
            if self.guest_state is None:
                raise UnverifiedStreamError(f"stream ended without the {GUEST_DEVICE!r} section: the guest's "
                                            "state and the source's digests are missing")
            if self._rp is None and not self.guest_state.get("digests"):
                raise UnverifiedStreamError(f"section {GUEST_DEVICE!r} carries no digests and the stream has no "
                                            "return path: nothing would verify this load")
        missing = {n: bm.npages - bm.count() for n, bm in self.received.bitmaps.items()
                   if bm.count() < bm.npages}
        if missing:
            raise ProtocolError(f"stream ended with pages never received: {missing}")
        for a in [self._assembler, *self._pc_assemblers]:
            if a is not None and a.busy:
                raise ProtocolError(f"channel {a.channel}: stream ended inside a host page")
        if self._rp is not None:
            self._rp_send(codec.encode_rp_shut(0))
        if self.listening:
            # The guest may have written since RUN: compare what was received.
            digests = {n: fingerprint_digest(fp) for n, fp in self.received.fingerprints.items()}
        else:
            digests = self.ram.digests()
        self.stats.digests = {n: d.hex() for n, d in digests.items()}
        if self._rp is not None:
            self._rp_send(codec.encode_rp_digests(digests))
        expected = (self.guest_state or {}).get("digests")
        if expected is not None:
            bad = [n for n, d in self.stats.digests.items() if expected.get(n) != d]
            if bad:
                raise ProtocolError(f"digest mismatch after load: blocks {bad} differ from the saved stream")
