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

import errno
import json
import threading
import time
from typing import Callable


from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels import devices as D
from ferry_migrate.channels.channel import RamRecvChannel, postcopy_channel_name
from ferry_migrate.channels.codec import DeviceSpec, StreamDecoder
from ferry_migrate.channels.errors import ChannelError, LayoutError, ProtocolError, UnverifiedStreamError
from ferry_migrate.channels.pagecheck import PageChecker
from ferry_migrate.channels.qemufile import QEMUFileReader, QEMUFileWriter
from ferry_migrate.channels.transport import Listener, parse_uri

from . import states as ST
from . import stats as S
from .channel_auth import ROLE_MAIN, ROLE_MULTIFD, ROLE_POSTCOPY, ChannelGate, check_plaintext, handshake_timeout
from .multifd_recv import MultifdReceiver
from .multifd_send import listen_backlog, refuse_file_uri
from .layout import LayoutLimits, check_machine_type, page_size_summary, ram_from_layout
from .never_ran import NeverRanProof
from .params import MigrationConfig
from .peer import peer_features
from .phasesplit import PhaseStamps
from .postcopy import FaultHandler, HostPageAssembler, ReceivedPages
from .ram import GuestRAM, RAMBlock, fingerprint_digest, page_selector
from .source import GUEST_DEVICE, GUEST_DEVICE_VERSION
from .rxstamp import stamp_receives
from .urgent import UrgentThreads
from .urgent_receiver import start_receiver
from .workload import Workload

_MADV_POPULATE_WRITE = 23  # linux/mman.h, Linux 5.14+
ACCEPT_POLL = 0.2  # s between checks for cancel while waiting for the source
_DEVICES = [DeviceSpec(GUEST_DEVICE, GUEST_DEVICE_VERSION)]


class AdmissionError(ProtocolError):
    """The destination cannot hold all of its guest's memory: postcopy is refused in precopy."""


class Quit(Exception):
    """The worker ends while the migration is postcopy-paused."""


class MigrationDestination:
    """Receives a migration into a GuestRAM of the same shape as the source's.

    ``workload``, if given, is the guest's workload on this side: it starts at
    POSTCOPY_RUN with the source's progress counters and faults pages in.
    States and what they allow come from engine/states.py: a fault before
    POSTCOPY_RUN fails the migration (the guest never ran here); after it, a
    fault pauses it (``postcopy-paused``): guest threads stay blocked on the
    pages they wait for, and :meth:`recover` continues over a new connection.

    ``ram`` None: no fixed guest; the RAM blocks MEM_SIZE announces are taken
    within ``layout`` (engine/layout.py). Device state of a QEMU source is kept
    verbatim in ``devices`` (channels/devices.py).
    """

    def __init__(self, ram: GuestRAM | None, config: MigrationConfig | None = None,
                 on_event: Callable[[str, dict], None] | None = None,
                 workload: Workload | None = None, layout: LayoutLimits | None = None):
        self.ram = ram
        self.config = config or MigrationConfig()
        self.on_event = on_event or (lambda name, data: None)
        self.workload = workload
        self.stats = S.MigrationStats()
        self.sm = ST.MigrationStateMachine(self._state_changed)
        self.layout = layout or LayoutLimits()
        self.devices = D.GuestDevices()
        self._layout_ready = threading.Event()
        self._advised_summary: int | None = None
        self.received = self.faults = None
        if ram is not None:
            self._use_ram(ram)
        self.listener: Listener | None = None
        self.gate = ChannelGate(self.config)  # TLS and hello of every connection (engine/channel_auth.py)
        self.guest_state: dict | None = None
        self.vmdesc: dict | None = None
        self.postcopy_advised = False
        self.listening = False  # after POSTCOPY_LISTEN
        self.running = False  # after POSTCOPY_RUN: the guest runs here
        self.verdict: str | None = None  # the source's verdict: completed, failed, or lost
        self.recoveries = 0
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._cancel = False
        self._quit = False
        self._recover_cond = threading.Condition()
        self._recoverable = threading.Event()  # paused, and the old connection is closed
        self._guest_lost: BaseException | None = None
        self._digests_sent = False
        self._channel: RamRecvChannel | None = None
        self._transport = None
        self._assembler: HostPageAssembler | None = None
        self._checker: PageChecker | None = None  # precopy placement on the main channel
        self._rp: QEMUFileWriter | None = None
        self._rp_lock = threading.Lock()
        self._last_req_block: str | None = None
        self._listen_bytes = 0
        self.phases = PhaseStamps()  # engine/phasesplit.py: package read, LISTEN, RUN
        self._closed_bytes = 0  # bytes of the connections before a recovery
        # POSTCOPY channels (postcopy-preempt): loaders, each in its own thread.
        self._pc_threads: list[threading.Thread] = []
        self._pc_channels: list[RamRecvChannel] = []
        self._pc_assemblers: list[HostPageAssembler] = []
        self._pc_error: BaseException | None = None
        self._pc_expected = 0
        self._pc_connected = threading.Condition()
        self._gen = 0  # connection generation: a recovery starts a new one
        self._proof: NeverRanProof | None = None  # migrate-recover after a failure before RUN
        self._pages_complete = False  # every page placed: POSTCOPY channels may end without EOS
        self._multifd: MultifdReceiver | None = None  # capability multifd (engine/multifd_recv.py)
        self.urgent = UrgentThreads(self.config)  # engine/urgent.py: POSTCOPY loaders' and fault thread's priority

    def _use_ram(self, ram: GuestRAM) -> None:
        self.ram = ram
        self.stats.total = ram.total
        self.received = ReceivedPages(ram)
        self.faults = FaultHandler(ram, self.received, self._send_request)
        self._layout_ready.set()

    def _take_layout(self, ev: codec.RamBlockList) -> None:
        """MEM_SIZE arrived: a destination without a fixed guest creates the blocks it names."""
        if self._layout_ready.is_set():
            return  # fixed guest: the decoder checked every block against it
        ram = ram_from_layout(ev.blocks, self.layout)
        if self._advised_summary is not None and page_size_summary(ram.blocks) != self._advised_summary:
            ram.close()
            raise LayoutError(f"POSTCOPY_ADVISE: source host page sizes 0x{self._advised_summary:x}, its MEM_SIZE "
                              f"blocks give 0x{page_size_summary(ev.blocks):x}")
        self._use_ram(ram)
        if self.postcopy_advised:
            self._admit()
        self.stats.extra["ram-layout"] = [{"idstr": b.idstr, "length": b.length, "page-size": b.page_size}
                                          for b in ram.blocks]
        self.on_event("RAM_LAYOUT", {"blocks": len(ram.blocks), "total": ram.total})

    def _wait_layout(self) -> None:
        while not self._layout_ready.wait(ACCEPT_POLL):
            if self._cancel or self._done.is_set():
                raise ChannelError("incoming migration ended before the RAM layout was known")

    @property
    def status(self) -> str:
        return self.sm.state

    def listen(self, uri: str) -> str:
        """Bind the incoming URI; returns it with the real port (tcp port 0 allowed)."""
        if self.config.cap("multifd") and not peer_features(self.config.param("peer")).ferry_only_capabilities:
            raise ValueError("multifd: Ferry's multifd packets are not QEMU's; turn multifd off for peer=qemu")
        if self.config.cap("multifd"):
            refuse_file_uri(uri, "source")  # as the source refuses it, before anything is bound
        listener = Listener(uri, backlog=listen_backlog(self.config), liveness=self.config.param("liveness-timeout"))
        try:
            check_plaintext(self.config, listener.uri, "listening on")  # PlaintextRefused (a ValueError)
        except ValueError:
            listener.close()
            raise
        self.listener = listener
        self.sm.fire(ST.START)
        return str(self.listener.uri)

    def start(self) -> None:
        """Accept and load in a background thread (after listen)."""
        if self.listener is None:
            raise RuntimeError("listen() first")
        self._thread = threading.Thread(target=self._run, name="incoming", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> str:
        """Wait until the incoming thread ends; returns the state."""
        self._done.wait(timeout)
        return self.status

    def cancel(self) -> None:
        """migrate-cancel on the destination. Raises RuntimeError once the guest runs here."""
        if self.running:
            raise RuntimeError(f"migrate-cancel refused in {self.status}: the guest runs on this destination")
        self._cancel = True
        self.sm.try_fire(ST.CANCEL)
        self._shutdown_channels()

    def pause(self) -> None:
        """migrate-pause: cut the channels of a postcopy migration on purpose.

        Raises RuntimeError outside postcopy-active / postcopy-recover.
        """
        if self.sm.try_fire(ST.PAUSE, reason="migrate-pause") is None:
            raise RuntimeError(f"migrate-pause: only in postcopy-active or postcopy-recover, not {self.status}")
        self.stats.error = "paused by migrate-pause"
        self.faults.failed = self.stats.error
        self._shutdown_channels()

    def recover(self, uri: str) -> str:
        """migrate-recover: listen on ``uri`` for the source's recovery; returns the real URI.

        Raises RuntimeError unless postcopy-paused; ValueError/OSError for the URI.
        """
        if self.status in (ST.FAILED, ST.CANCELLED):
            return self._prove_never_ran(uri)
        # A pause asked for by migrate-pause is visible at once; wait until the
        # incoming thread has closed that connection (and its listener).
        self._recoverable.wait(10)
        with self._recover_cond:
            if self.status != ST.POSTCOPY_PAUSED or not self._recoverable.is_set():
                raise RuntimeError(f"migrate-recover: the migration is {self.status}; only a postcopy-paused "
                                   "migration can be recovered")
            if _listens_on(self.listener, uri):
                return str(self.listener.uri)  # asked again for its own address: keep listening there
            listener = Listener(uri, liveness=self.config.param("liveness-timeout"))
            try:
                check_plaintext(self.config, listener.uri, "listening on")
            except ValueError:
                listener.close()
                raise
            # Asked again while still listening (the source never got through): the new
            # address replaces the old one, as QEMU's migrate-recover releases its transport.
            with self._pc_connected:
                old, self.listener = self.listener, listener
            if old is not None:
                old.close()
            self._recover_cond.notify_all()
            return str(listener.uri)

    @property
    def never_ran(self) -> bool:
        """Failed (or cancelled) after POSTCOPY_ADVISE and before RUN: the guest never ran here, and a
        source that entered postcopy may be paused waiting for this side's word (engine/never_ran.py)."""
        return (self.status in (ST.FAILED, ST.CANCELLED) and self.postcopy_advised and not self.running
                and self._guest_lost is None)

    def _prove_never_ran(self, uri: str) -> str:
        """migrate-recover after a failure before RUN: tell the recovering source (NeverRanProof)."""
        if not self.never_ran:
            why = ("the guest ran here" if self.running else "postcopy was never advised, so the source's "
                   "guest runs there already")
            raise RuntimeError(f"migrate-recover: the migration is {self.status} and {why}; nothing to recover")
        if self._proof is not None and self._proof.serving and _listens_on(self._proof.listener, uri):
            return self._proof.uri  # asked again for its own address: keep listening there
        proof = NeverRanProof(self, uri)
        if self._proof is not None:
            self._proof.close()  # asked again: the new address replaces the old one
        proof.start()
        self._proof = proof
        return proof.uri

    def guest_lost(self, err: BaseException) -> None:
        """The guest itself died (its process): the migration fails; there is nothing to pause for."""
        self._guest_lost = err
        self._shutdown_channels()
        with self._recover_cond:
            self._recover_cond.notify_all()

    def quit(self) -> None:
        """The worker exits: end a paused incoming thread (the guest stays blocked)."""
        if self._proof is not None:
            self._proof.close()
        with self._recover_cond:
            self._quit = True
            self._recover_cond.notify_all()

    def query(self) -> dict:
        """query-migrate's fields (engine/stats.py)."""
        st = self.stats
        st.status = self.status
        r = st.ram
        if self._channel is not None:
            # The verdict is Ferry's word after the stream, not migration data (the source
            # counts what it sent before it).
            st.transferred = (self._closed_bytes + self._channel.transferred
                              + sum(c.transferred for c in self._pc_channels) - self._verdict_bytes())
            st.channels = {"precopy": {"bytes": self._channel.transferred - self._verdict_bytes(),
                                       "normal": r.normal, "duplicate": r.duplicate}}
            if self._assembler is not None:
                st.channels["precopy"]["postcopy-pages-placed"] = self._assembler.pages_placed
            for c, a in zip(self._pc_channels, self._pc_assemblers):
                st.channels[c.name] = {"bytes": c.transferred, "pages-placed": a.pages_placed,
                                       "host-pages-placed": a.host_pages_placed}
        if st.status not in S.FINAL_STATES and self.ram is not None:
            st.remaining = (self.ram.npages - self.received.count()) * C.TARGET_PAGE_SIZE
        st.extra.update(self.urgent.metrics())
        if self._channel is None and self.gate.mismatch is not None and st.status == ST.SETUP:
            # A source whose hello was refused never reaches this side's state: say why here too.
            st.extra["incoming-refused"] = str(self.gate.mismatch)
        if self.postcopy_advised and self.faults is not None:
            st.extra.update(self.faults.metrics())
            if st.status in S.FINAL_STATES:  # engine/reqtrace.py: stage times of each request
                st.extra["postcopy-request-trace"] = self.faults.trace.to_dict()
                st.extra["postcopy-phase-stamps"] = self.phases.to_dict()
            if self._channel is not None and self.listening:
                r.precopy_bytes = self._listen_bytes  # received before the switch
                # After the switch: the PRECOPY channel's rest and every POSTCOPY channel (and
                # those of the connections before a recovery).
                st.extra["postcopy-bytes"] = (self._closed_bytes + self._channel.transferred - self._listen_bytes
                                              + sum(c.transferred for c in self._pc_channels)
                                              - self._verdict_bytes())
        if self.verdict is not None:
            st.extra["verdict"] = self.verdict
        if self.recoveries:
            st.extra["postcopy-recoveries"] = self.recoveries
        if self.never_ran:
            # The word a paused source needs to run its guest again (migrate-recover gives it).
            st.extra["never-ran"] = True
            if self._proof is not None:
                st.extra["never-ran-told"] = self._proof.sent
        if self._multifd is None:
            return st.to_dict()
        return self._multifd_query(st)

    def _multifd_query(self, st) -> dict:
        """query-migrate with the multifd channels: their bytes and pages, and when LISTEN closed them."""
        mf = self._multifd
        st.extra["multifd"] = {"channels": mf.n, "listen-ms": None if mf.closed_at is None
                               else round((mf.closed_at - mf.created) * 1000, 3), **mf.figures()}
        d = st.to_dict()
        d.setdefault("channels", {}).update(mf.stats())
        r = d["ram"]
        r["transferred"] += mf.transferred
        if self.listening or st.status in (ST.SETUP, ST.ACTIVE):
            r["precopy-bytes"] += mf.transferred  # every multifd byte arrives before LISTEN
        r["normal"] += sum(c.normal_pages for c in mf.channels)
        r["duplicate"] += sum(c.zero_pages for c in mf.channels)
        r["normal-bytes"] = r["normal"] * C.TARGET_PAGE_SIZE
        return d

    def _require_checks(self) -> bool:
        """Ferry's page check values are required (capability page-checksums) from a Ferry source; a
        QEMU stream (parameter peer qemu, or one that carried CONFIGURATION) has none."""
        ferry = peer_features(self.config.param("peer")).ferry_only_capabilities
        return self.config.cap("page-checksums") and ferry and self.devices.configuration is None

    def _verdict_bytes(self) -> int:
        """The verdict is Ferry's word after the stream, not migration data (the source counts
        what it sent before it)."""
        return C.FERRY_VERDICT_SIZE if self.verdict in ("completed", "failed") else 0

    def _state_changed(self, old: str, new: str, reason: str | None) -> None:
        self.stats.status = new
        data = {"status": new}
        if reason:
            data["reason"] = reason
        self.on_event("MIGRATION", data)

    def _shutdown_channels(self) -> None:
        for ch in [self._channel, *self._pc_channels]:
            if ch is not None:
                ch.shutdown()
        if self._multifd is not None:
            self._multifd.shutdown()

    def _accept(self, role: int = ROLE_MAIN, index: int = 0):
        """The next connection that proved it is channel (role, index) (engine/channel_auth.py)."""
        while True:
            if self._cancel:
                raise ChannelError("incoming migration cancelled")
            if self._quit:
                raise Quit()
            listener = self.listener
            if listener is None:
                raise ChannelError("incoming listener closed")
            try:
                return self.gate.accept(listener, role, index, ACCEPT_POLL)
            except TimeoutError:
                continue
            except (OSError, AttributeError):
                if listener is not self.listener:
                    continue  # migrate-recover replaced (and closed) it meanwhile
                raise

    def _rp_send(self, data: bytes) -> None:
        with self._rp_lock:
            self._rp.put_bytes(data)
            self._rp.flush()

    def _start_keepalive(self) -> None:
        """A Ferry source bounds the return path's silence (liveness-timeout): feed it every T/3 s."""
        period = self.config.param("liveness-timeout") / 3
        if period > 0 and peer_features(self.config.param("peer")).rp_keepalive:
            threading.Thread(target=self._keepalive, args=(self._gen, period), name="rp-keepalive",
                             daemon=True).start()

    def _keepalive(self, gen: int, period: float) -> None:
        msg = codec.encode_rp_pong(C.FERRY_PONG_KEEPALIVE)
        while not self._done.wait(period) and not self._quit:
            with self._rp_lock:
                rp = self._rp
                if gen != self._gen or rp is None:
                    return  # a later connection has its own keepalive
                try:
                    rp.put_bytes(msg)
                    rp.flush()
                except ChannelError:
                    return  # the loader notices the broken link

    def _send_request(self, blk: RAMBlock, start: int, length: int) -> None:
        """One REQ_PAGES_ID (block changed since the last request) or REQ_PAGES.

        While the return path is down (a fault not yet noticed, a pause, a
        recovery) the request is only recorded: it is sent again after RESUME.
        """
        with self._rp_lock:
            if self._rp is None or self.status != ST.POSTCOPY_ACTIVE:
                return
            name = blk.idstr if blk.idstr != self._last_req_block else None
            try:
                self._rp.put_bytes(codec.encode_rp_req_pages(start, length, name))
                self._rp.flush()
            except ChannelError:
                return  # the loader notices the broken link and pauses
            self._last_req_block = blk.idstr

    # --- the incoming thread ---
    def _run(self) -> None:
        st = self.stats
        try:
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
                if cfg.cap("multifd"):
                    self._multifd = MultifdReceiver(cfg.param("multifd-channels"), self._layout_ram,
                                                    lambda: self.received, self._require_checks,
                                                    self._multifd_failed, handshake_timeout(cfg))
                self._connected(transport, StreamDecoder(
                    self.ram.infos() if self.ram is not None else [], devices=_DEVICES,
                    learn_blocks=self.ram is None, opaque_devices=True))
                self._channel.decoder.multifd = self._multifd is not None
                self.sm.fire(ST.CONNECTED)
                self._load(self._channel, transport)
                self._join_channels()
                self._finish()
                self._conclude()
                return
            except BaseException as e:  # noqa: BLE001 - report every failure, never die silently
                if not self.running:
                    self._fail(e)  # the guest never ran here
                    return
                self._pause(e)
            self._postcopy_until_done()
        except Quit:
            pass
        except BaseException as e:  # noqa: BLE001
            self._pause(e)
        finally:
            st.end_time = st.end_time or time.monotonic()
            self._close_connection()
            self._close_listener()
            self._pc_error = None  # its traceback holds frames and buffers; the message is in stats
            self.gate.close()
            self._done.set()

    def _connected(self, transport, decoder: StreamDecoder) -> None:
        """A main channel is up: its loader, and the POSTCOPY channels' acceptor."""
        self._transport = transport
        self._channel = RamRecvChannel(QEMUFileReader(transport, name="precopy"), decoder, "precopy")
        with self._pc_connected:
            # Threads of an earlier connection may still be ending: they check
            # the generation and leave this connection alone.
            self._gen += 1
            self._pc_threads, self._pc_channels, self._pc_assemblers = [], [], []
            self._pc_error = None
        if self._pc_expected or (self._multifd is not None and self._multifd.accepting):
            threading.Thread(target=self._accept_channels, args=(self._gen,), name="incoming-channels",
                             daemon=True).start()
        else:
            self._close_listener()  # a further connection is refused

    def _postcopy_until_done(self) -> None:
        """Paused after RUN: wait for migrate-recover, recover, load on; pause again on a fault."""
        while True:
            try:
                if self.status == ST.POSTCOPY_PAUSED:
                    self._await_recovery()
                self._load(self._channel, self._transport)
                self._join_channels()
                self._finish()
                self._conclude()
                return
            except Quit:
                raise
            except BaseException as e:  # noqa: BLE001
                self._pause(e)

    def _await_recovery(self) -> None:
        """Block until migrate-recover gave a listener and the source connected to it."""
        with self._recover_cond:
            while self.listener is None:
                if self._quit:
                    raise Quit()
                if self._guest_lost is not None:
                    self._pause(self._guest_lost)
                self._recover_cond.wait(0.5)
        transport = self._accept()
        self._closed_bytes += ((self._channel.transferred if self._channel else 0)
                               + sum(c.transferred for c in self._pc_channels))
        self._rp = QEMUFileWriter(transport, name="return-path")
        self._last_req_block = None
        self._recoverable.clear()
        self._connected(transport, self._channel.decoder.resumed())
        self._start_keepalive()  # after _connected: it runs for this connection's generation
        self._assembler = HostPageAssembler(self.ram, self.received, "precopy", self._require_checks())
        self.sm.fire(ST.RECOVER, expect=ST.POSTCOPY_PAUSED)

    def _resume(self) -> None:
        """MIG_CMD_POSTCOPY_RESUME: POSTCOPY channels back, RESUME_ACK, pending requests again."""
        if self.status != ST.POSTCOPY_RECOVER:
            raise ProtocolError(f"POSTCOPY_RESUME: not in a recovery (state {self.status})")
        self._wait_channels_connected()
        self.sm.fire(ST.RESUMED, expect=ST.POSTCOPY_RECOVER)
        self.faults.failed = None
        self.stats.error = None
        self.recoveries += 1
        self._rp_send(codec.encode_rp_resume_ack())
        for blk, hp in self.faults.pending():
            self._send_request(blk, hp << C.TARGET_PAGE_BITS, blk.page_size)

    def _recv_bitmap(self, payload: bytes) -> None:
        """MIG_CMD_RECV_BITMAP: send the received bitmap of the named block on the return path."""
        name = codec.parse_recv_bitmap(payload)
        if self.status != ST.POSTCOPY_RECOVER:
            raise ProtocolError(f"RECV_BITMAP for block {name!r}: not in a recovery (state {self.status})")
        bm = self.received.bitmaps.get(name)
        if bm is None:
            raise ProtocolError(f"RECV_BITMAP: unknown RAM block {name!r}")
        with self.received.cond:
            bits = bm.bits.copy()
        self._rp_send(codec.encode_rp_recv_bitmap(name, bits))

    def _fail(self, e: BaseException) -> None:
        """A fault before the guest ran here: failed (or cancelled); tell the source (SHUT 1)."""
        st = self.stats
        st.end_time = time.monotonic()
        if self._pc_error is not None and isinstance(e, ChannelError) and not isinstance(e, ProtocolError):
            e = self._pc_error  # a POSTCOPY channel failed and broke the main one
        if self._guest_lost is not None:
            e = self._guest_lost
        st.error = str(e) if not self._cancel else "incoming migration cancelled"
        if self._cancel and self._channel is None and self.gate.mismatch is not None:
            st.error += f" (no source got in; the last one tried: {self.gate.mismatch})"  # say why
        if self._rp is not None:
            try:
                self._rp_send(codec.encode_rp_shut(1))
            except ChannelError:
                pass
        self._shutdown_channels()
        if self._cancel:
            self.sm.try_fire(ST.CANCEL)
            self.sm.try_fire(ST.CANCEL_DONE)
        else:
            self.sm.try_fire(ST.FAIL, reason=st.error)

    def _pause(self, e: BaseException) -> None:
        """A fault after RUN: postcopy-paused; guest threads stay blocked on missing pages."""
        if isinstance(e, Quit):
            return
        if self._guest_lost is not None:
            self._close_connection()
            self._close_listener()
            self.stats.error = str(self._guest_lost)
            self.sm.try_fire(ST.GUEST_LOST, reason=self.stats.error)
            raise Quit()  # nothing left to wait for
        if self._pc_error is not None and isinstance(e, ChannelError) and not isinstance(e, ProtocolError):
            e = self._pc_error
        if self.status != ST.POSTCOPY_PAUSED or not self.stats.error:
            self.stats.error = str(e)
        self.faults.failed = self.stats.error
        # Close the old connection's sockets before the state says paused: a
        # migrate-recover that follows must find nothing of it left to close.
        self._close_connection()
        self._close_listener()
        self.sm.try_fire(ST.FAIL, reason=self.stats.error)
        self._recoverable.set()

    def _close_connection(self) -> None:
        self._shutdown_channels()
        if self._multifd is not None:
            self._multifd.close()
        for t in self._pc_threads:
            t.join(5)
        for c in [self._channel, *self._pc_channels]:
            if c is not None:
                try:
                    c.reader.transport.close()
                except OSError:
                    pass
        with self._rp_lock:
            self._rp = None

    def _conclude(self) -> None:
        """After SHUT 0 and the digests: the outcome.

        Between Ferry workers the source decides and says so after the end of
        the stream (the verdict); this side's guest may run only once it read
        "completed". A lost verdict is never a guess: in precopy the migration
        stays in ``device`` with the reason (the source knows the outcome); in
        postcopy it is a fault like any other (paused).
        """
        st = self.stats
        if not self._digests_sent:
            st.end_time = time.monotonic()
            self.sm.fire(ST.COMPLETE)  # no Ferry source to decide (file: stream, QEMU source)
            return
        if not self.running:
            self.sm.fire(ST.STOP_AND_COPY)  # loaded and verified; the source decides
        reader = self._channel.reader
        try:
            ok = reader.fill(C.FERRY_VERDICT_SIZE)
        except ChannelError as e:
            ok, why = False, str(e)
        else:
            why = "the source closed the connection"
        if not ok:
            self.verdict = "lost"
            msg = (f"outcome unknown: the source's verdict did not arrive ({why}); query the source: "
                   "if it reports completed, the guest belongs here")
            if self.running:
                raise ChannelError(msg)
            st.error = msg
            st.end_time = time.monotonic()
            return  # stays in device: no guess either way
        outcome = codec.parse_ferry_verdict(bytes(reader.view()[:C.FERRY_VERDICT_SIZE]))
        reader.consume(C.FERRY_VERDICT_SIZE)
        st.end_time = time.monotonic()
        if outcome != C.FERRY_VERDICT_COMPLETED:
            self.verdict = "failed"
            raise ProtocolError("the source's verdict is failed: its digests differ from what this side loaded")
        self.verdict = "completed"
        self.sm.fire(ST.COMPLETE)

    def _close_listener(self) -> None:
        with self._pc_connected:
            if self.listener is not None:
                self.listener.close()
                self.listener = None

    def _accept_order(self) -> list[tuple[int, int]]:
        """(role, index) of the connections after the main one, in the order a source opens them:
        POSTCOPY channels opened at setup, then multifd channels (first connection only), then
        POSTCOPY channels opened at the switch (preempt-dialect qemu-8.0)."""
        pc = [(ROLE_POSTCOPY, i + 1) for i in range(self._pc_expected)]
        mf = ([(ROLE_MULTIFD, i + 1) for i in range(self._multifd.n)]
              if self._multifd is not None and self._multifd.accepting else [])
        at_setup = self.config.param("preempt-dialect") == "qemu-7.2"
        return pc + mf if at_setup else mf + pc

    def _accept_channels(self, gen: int) -> None:
        """Accept the POSTCOPY and multifd channels: the connections after the main one, in order."""
        try:
            for role, index in self._accept_order():
                t = self._accept(role, index)
                if gen != self._gen:
                    t.close()
                    return
                if role == ROLE_MULTIFD:
                    self._multifd.add(t, index)
                    continue
                i = index - 1
                self._wait_layout()  # a QEMU 7.2 source connects it before MEM_SIZE
                name = postcopy_channel_name(i)
                dec = StreamDecoder(self.ram.infos(), mode="pages", channel_name=name)
                reader = QEMUFileReader(t, bufsize=1 << 20, name=name)
                reader.idle_timeout = None  # idle while the guest faults on nothing
                ch = RamRecvChannel(reader, dec, name)
                asm = HostPageAssembler(self.ram, self.received, name, self._require_checks())
                rx = stamp_receives(t)  # the request trace's "arrived" (engine/rxstamp.py)
                # postcopy-receiver=process: a process of its own reads and places this channel.
                proc = start_receiver(self, t, name)
                th = threading.Thread(target=self._channel_loop if proc is None else proc.serve,
                                      args=(ch, asm, gen, rx), name=f"load-{name}", daemon=True)
                with self._pc_connected:
                    if gen != self._gen:
                        t.close()
                        return
                    self._pc_channels.append(ch)
                    self._pc_assemblers.append(asm)
                    # Started before it is listed: a pause that closes the connection
                    # meanwhile joins every listed thread (joining one not yet started
                    # raises, and the destination stayed postcopy-active, guest stuck).
                    th.start()
                    self._pc_threads.append(th)
                    self._pc_connected.notify_all()
        except Exception as e:  # noqa: BLE001
            if not self._done.is_set() and not self._cancel:
                self._channel_failed(e, gen)
        finally:
            if gen == self._gen:
                self._close_listener()  # beyond the expected number: refused

    def _channel_loop(self, ch: RamRecvChannel, asm: HostPageAssembler, gen: int, rx=None) -> None:
        """Loader of one POSTCOPY channel: bare page records until EOS."""
        self.urgent.enter()
        trace = self.faults.trace
        try:
            while True:
                ev = ch.next_event()
                if ev is None:
                    if ch.decoder.at_boundary() or self._pages_complete:
                        return  # QEMU 8.0+ sources close the channel without EOS
                    raise ProtocolError(f"channel {ch.name}: stream ended before EOS")
                if isinstance(ev, codec.RamEOS):
                    return
                if not self.listening:
                    raise ProtocolError(f"channel {ch.name}: page record before POSTCOPY_LISTEN")
                done = asm.add(ev)
                if rx is not None and rx.last is not None:
                    for b, hp in done:
                        if trace.has(b, hp):
                            trace.mark(b, hp, "arrived", rx.last)
        except Exception as e:  # noqa: BLE001
            if self._pages_complete:
                return  # every page is placed: what comes after on this channel does not matter
            if not self._done.is_set() and not self._cancel and self.status not in S.FINAL_STATES:
                self._channel_failed(e, gen)

    def _channel_failed(self, e: BaseException, gen: int) -> None:
        with self._pc_connected:
            if gen != self._gen:
                return  # a channel of an earlier connection: already given up
            if self._pc_error is None:
                self._pc_error = e
            self._pc_connected.notify_all()
        # Before RUN the main channel goes on: the package with RUN may be on its way, and
        # failing now would leave a source that sent it paused with no guest anywhere. The
        # error surfaces at RUN (a pause) or at the end of precopy (a failure).
        if self._channel is not None and self.running:
            self._channel.shutdown()  # pause the whole migration, with this error

    def _layout_ram(self) -> GuestRAM:
        """The guest RAM, once MEM_SIZE gave the layout (multifd receivers wait for it)."""
        self._wait_layout()
        return self.ram

    def _multifd_failed(self, e: BaseException) -> None:
        """A multifd receiver failed. In precopy the migration fails (the main loader is stopped
        with this error); after LISTEN every multifd page is already placed: only recorded."""
        if self.listening:
            self.stats.extra["multifd-error"] = str(e)
            return
        with self._pc_connected:
            if self._pc_error is None:
                self._pc_error = e
        if self._channel is not None:
            self._channel.shutdown()

    def _all_placed(self) -> bool:
        """Every page is here and no channel is inside a host page."""
        if self.ram is None or self.received.count() < self.ram.npages:
            return False
        return not any(a is not None and a.busy for a in [self._assembler, *self._pc_assemblers])

    def _wait_channels_connected(self, until_placed: bool = False) -> bool:
        """Wait until every POSTCOPY channel connected; True if ``until_placed`` and every page is placed first."""
        deadline = time.monotonic() + 30
        with self._pc_connected:
            while len(self._pc_threads) < self._pc_expected and self._pc_error is None:
                if until_placed and self._all_placed():
                    return True
                if time.monotonic() > deadline:
                    raise ProtocolError(f"postcopy-preempt: {len(self._pc_threads)} of {self._pc_expected} POSTCOPY "
                                        "channels connected; enable postcopy-preempt (and the same "
                                        "postcopy-channels) on both sides")
                self._pc_connected.wait(0.2)
        if self._pc_error is not None:
            raise self._pc_error
        return False

    def _join_channels(self) -> None:
        """Wait until every page is placed, or every POSTCOPY channel connected and reached EOS.

        A QEMU 8.0+ source opens its POSTCOPY channel only at the switch and
        never sends EOS on it: once every page is placed nothing more is
        waited for (a QEMU 7.2 source's late EOS is still read until the end).
        """
        if not self._pc_expected:
            return
        if self._wait_channels_connected(until_placed=True):
            self._pages_complete = True
            return
        deadline = time.monotonic() + 30
        for t in self._pc_threads:
            while t.is_alive():
                if self._pc_error is not None:
                    break
                if self._all_placed():
                    self._pages_complete = True
                    return
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
                if ch.decoder.in_device_tail:
                    raise D.tail_error(ch.decoder.tail)
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
                # A saved stream and a Ferry source (its guest section came) send the VM description.
                if (transport.name.startswith("file:") or ch.reader.available() > 0
                        or self.guest_state is not None):
                    continue  # a saved stream ends with the VM description
                return
            elif isinstance(ev, codec.VMDescription):
                self.vmdesc = ev.json
                return
            elif isinstance(ev, D.DeviceTail):
                # QEMU's device sections, EOF and vmdesc: kept verbatim.
                self.devices.device_bytes = ev.device_bytes
                self.devices.vmdesc_raw = ev.vmdesc_raw
                self.devices.sections = ev.idstrs
                self.vmdesc = ev.vmdesc
                self.stats.extra["device-sections"] = len(ev.sections)
                return
            elif isinstance(ev, codec.DeviceBytes):
                continue
            else:
                self._event(ev)

    def _event(self, ev) -> None:
        """Non-RAM events, of the main stream or of a PACKAGED blob."""
        if isinstance(ev, codec.Command):
            self._command(ev)
        elif isinstance(ev, codec.RamBlockList):
            self._take_layout(ev)
        elif isinstance(ev, codec.Configuration):
            check_machine_type(ev.name, self.layout)
            self.devices.configuration = ev.raw
            self.stats.extra["machine-type"] = ev.name
        elif isinstance(ev, codec.MultifdFlush):
            self._multifd.sync_main()  # every page of the pass is placed before anything after this
        elif isinstance(ev, codec.SectionStart) and ev.idstr == C.RAM_SECTION_IDSTR:
            self.devices.ram_section_id = ev.section_id
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
            self._checker = PageChecker(self._channel.name, self._require_checks())
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
        if self.ram is None and c in (C.MIG_CMD_POSTCOPY_RAM_DISCARD, C.MIG_CMD_POSTCOPY_LISTEN,
                                      C.MIG_CMD_POSTCOPY_RUN, C.MIG_CMD_PACKAGED):
            raise ProtocolError(f"command {cmd.name}: before MEM_SIZE announced the RAM blocks")
        if c == C.MIG_CMD_OPEN_RETURN_PATH:
            if self._rp is None:
                self._rp = QEMUFileWriter(self._channel.reader.transport, name="return-path")
                self._start_keepalive()
        elif c == C.MIG_CMD_PING:
            if self._rp is not None:
                self._rp_send(codec.encode_rp_pong(codec.parse_ping(cmd.payload)))
        elif c == C.MIG_CMD_POSTCOPY_ADVISE:
            self._advise(codec.parse_postcopy_advise(cmd.payload))
        elif c == C.MIG_CMD_POSTCOPY_RAM_DISCARD:
            self._discard(cmd.payload)
        elif c == C.MIG_CMD_PACKAGED:
            self.phases.mark("package-read")
            self._packaged(cmd.payload)
        elif c == C.MIG_CMD_POSTCOPY_LISTEN:
            self._listen()
        elif c == C.MIG_CMD_POSTCOPY_RUN:
            self._run_guest()
        elif c == C.MIG_CMD_RECV_BITMAP:
            self._recv_bitmap(cmd.payload)
        elif c == C.MIG_CMD_POSTCOPY_RESUME:
            self._resume()
        else:
            raise ProtocolError(f"command {cmd.name}: not supported by this destination")

    def _advise(self, adv) -> None:
        if adv is None:
            return  # precopy-only advise: nothing to do
        summary, tps = adv
        if tps != C.TARGET_PAGE_SIZE:
            raise ProtocolError(f"POSTCOPY_ADVISE: target page size 0x{tps:x}, destination has "
                                f"0x{C.TARGET_PAGE_SIZE:x}; postcopy refused")
        if self.ram is None:
            self._advised_summary = summary  # checked when MEM_SIZE gives the blocks
            ours = summary
        else:
            ours = page_size_summary(self.ram.blocks)
        if summary != ours:
            raise ProtocolError(f"POSTCOPY_ADVISE: source host page sizes 0x{summary:x}, destination has "
                                f"0x{ours:x}; postcopy refused")
        if self._rp is None:
            raise ProtocolError("POSTCOPY_ADVISE: postcopy needs the return path (OPEN_RETURN_PATH first)")
        if self.ram is not None:
            self._admit()  # else when MEM_SIZE gives the blocks (_take_layout)
        self.postcopy_advised = True

    def _admit(self) -> None:
        """Hold every page of guest RAM now, before the switch can be asked for.

        After the switch a page that cannot be backed would stop the guest for
        good; before it, refusing only fails the migration and the source keeps
        the guest. MADV_POPULATE_WRITE reports a short huge-page pool as an
        error instead of a SIGBUS at first touch. Raises AdmissionError.
        """
        for b in self.ram.blocks:
            try:
                b.mem.madvise(_MADV_POPULATE_WRITE)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    continue  # kernel before 5.14: nothing to check with, prealloc covered it
                raise AdmissionError(f"POSTCOPY_ADVISE: RAM block {b.idstr!r} ({b.length} bytes, "
                                     f"{b.backing} memory, {b.page_size}-byte pages) cannot be backed: "
                                     f"{e.strerror}; postcopy refused before the switch") from None

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
        """PACKAGED: commands, then device sections (a QEMU source's kept verbatim), then PING, RUN."""
        try:
            pkg = D.split_package(blob)
            qemu_devices = (bool(pkg.device_bytes)
                            and pkg.device_bytes[0] in (C.QEMU_VM_SECTION_START, C.QEMU_VM_SECTION_FULL)
                            and D.first_section(pkg.device_bytes)[1] not in (GUEST_DEVICE, C.RAM_SECTION_IDSTR))
        except ProtocolError:
            qemu_devices = False  # not QEMU-shaped: the record-by-record path names what is wrong
        if qemu_devices:
            for cmd, payload in pkg.head:
                self._command(codec.Command(cmd, payload))
            self.devices.device_bytes = pkg.device_bytes
            self.devices.vmdesc_raw = None
            self.stats.extra["device-bytes"] = len(pkg.device_bytes)
            for cmd, payload in pkg.tail:
                self._command(codec.Command(cmd, payload))
            return
        self._packaged_ferry(blob)

    def _packaged_ferry(self, blob: bytes) -> None:
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
        if self._multifd is not None:
            self._multifd.close_placement()  # the source flushed them before the switch (docs/protocol.md)
        # What memory holds now is what precopy delivered (the guest has not run here).
        self.received.snapshot_fingerprints()
        self._assembler = HostPageAssembler(self.ram, self.received, "precopy", self._require_checks())
        self.listening = True
        # Bytes up to the end of the package that held LISTEN, not what was read ahead of it.
        self._listen_bytes = self._channel.transferred - self._channel.reader.available()
        self.faults.enabled = True
        self.phases.mark("listen")

    def _run_guest(self) -> None:
        if not self.listening:
            raise ProtocolError("POSTCOPY_RUN: before POSTCOPY_LISTEN")
        if self.running:
            raise ProtocolError("POSTCOPY_RUN: received twice")
        if self.guest_state is None and not self.devices.device_bytes and self._require_checks():
            raise UnverifiedStreamError(f"POSTCOPY_RUN: the package carried no {GUEST_DEVICE!r} section; "
                                        "the guest does not start without its state")
        # The guest runs here from now on: every later fault pauses, none fails.
        self.sm.fire(ST.SWITCHOVER, expect=ST.ACTIVE)
        self.running = True
        self.phases.mark("run")
        self.stats.extra["guest-state"] = self.guest_state or {}
        if self.workload is not None:
            self.workload.restore(self.guest_state or {})
            self.workload.access_hook = self.faults.ensure
            self.workload.start()
        if self._pc_error is not None:
            raise self._pc_error  # a POSTCOPY channel failed before RUN: pause now (docs/reliability.md)

    def _finish(self) -> None:
        """All loaded: check completeness, confirm, send digests."""
        if self.ram is None:
            raise ProtocolError("stream ended before MEM_SIZE announced any RAM block")
        if self._require_checks():
            # A Ferry stream carries its guest's state (its own section, or a QEMU guest's
            # device sections); without a return path (file:) the guest section's digests
            # are the only check of the whole load.
            if self.guest_state is None and (self._rp is None or not self.devices.device_bytes):
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
        if not peer_features(self.config.param("peer")).digests or self.devices.configuration is not None:
            # A stream with CONFIGURATION comes from QEMU (or a Ferry source set to
            # peer=qemu): SHUT(0) and closing the return path is all it expects.
            return
        if self.listening:
            # The guest may have written since RUN: compare what was received.
            digests = {n: fingerprint_digest(fp) for n, fp in self.received.fingerprints.items()}
        else:
            digests = self.ram.digests()
        self.stats.digests = {n: d.hex() for n, d in digests.items()}
        if self._rp is not None:
            self._rp_send(codec.encode_rp_digests(digests))
            self._digests_sent = True  # a Ferry source compares them and sends its verdict
        expected = (self.guest_state or {}).get("digests")
        if expected is not None:
            bad = [n for n, d in self.stats.digests.items() if expected.get(n) != d]
            if bad:
                raise ProtocolError(f"digest mismatch after load: blocks {bad} differ from the saved stream")


def _listens_on(listener, uri: str) -> bool:
    """True when ``listener`` (a Listener or None) is open on exactly the address ``uri`` names.

    migrate-recover asked again for the address it already listens on (`ferry migrate
    --resume --uri U` after `migrate-recover U`) keeps that listener: a new one could not
    bind it. A tcp port 0 always means a new listener.
    """
    if listener is None or getattr(listener, "sock", None) is None:
        return False
    try:
        want = parse_uri(uri)
    except ValueError:
        return False  # the new Listener names what is wrong
    if want.scheme == "file" or (want.scheme == "tcp" and want.port == 0):
        return False
    return str(want) == str(listener.uri)
