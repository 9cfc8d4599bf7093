"""The destination side: accept the stream, validate every record, fill guest RAM.

Each channel has its own loader (reader + decoder with its own last-received
block). After EOF the destination confirms over the return path (SHUT 0),
then sends its per-block digests so the source can verify before it lets go
of the guest.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Callable

import numpy as np

from channels import codec
from channels import constants as C
from channels.channel import RamRecvChannel
from channels.codec import DeviceSpec, StreamDecoder
from channels.errors import ChannelError, ProtocolError
from channels.qemufile import QEMUFileReader, QEMUFileWriter
from channels.transport import Listener

from . import stats as S
from .bitmap import PageBitmap
from .params import MigrationConfig
from .ram import GuestRAM
from .source import GUEST_DEVICE, GUEST_DEVICE_VERSION

ACCEPT_POLL = 0.2  # s between checks for cancel while waiting for the source


class MigrationDestination:
    """Receives a migration into a GuestRAM of the same shape as the source's."""

    def __init__(self, ram: GuestRAM, config: MigrationConfig | None = None,
                 on_event: Callable[[str, dict], None] | None = None):
        self.ram = ram
        self.config = config or MigrationConfig()
        self.on_event = on_event or (lambda name, data: None)
        self.stats = S.MigrationStats()
        self.stats.total = ram.total
        self.received = {b.idstr: PageBitmap(b.npages) for b in ram.blocks}
        self.listener: Listener | None = None
        self.guest_state: dict | None = None
        self.vmdesc: dict | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._cancel = False
        self._channel: RamRecvChannel | None = None
        self._rp: QEMUFileWriter | None = None

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
        if self._channel is not None:
            self._channel.shutdown()

    def query(self) -> dict:
        st = self.stats
        if self._channel is not None:
            st.transferred = self._channel.transferred
            st.channels = {"precopy": {"bytes": self._channel.transferred,
                                       "normal": st.ram.normal, "duplicate": st.ram.duplicate}}
        if st.status not in S.FINAL_STATES:
            got = sum(bm.count() for bm in self.received.values())
            st.remaining = (self.ram.npages - got) * C.TARGET_PAGE_SIZE
        return st.to_dict()

    def _set_state(self, new: str) -> None:
        if self.stats.status != new:
            self.stats.status = new
            self.on_event("MIGRATION", {"status": new})

    def _accept(self):
        while True:
            if self._cancel:
                raise ChannelError("incoming migration cancelled")
            try:
                return self.listener.accept(timeout=ACCEPT_POLL)
            except TimeoutError:
                continue

    def _run(self) -> None:
        st = self.stats
        transport = None
        try:
            transport = self._accept()
            st.start_time = time.monotonic()
            self._set_state(S.ACTIVE)
            reader = QEMUFileReader(transport, name="precopy")
            dec = StreamDecoder(self.ram.infos(), devices=[DeviceSpec(GUEST_DEVICE, GUEST_DEVICE_VERSION)])
            self._channel = RamRecvChannel(reader, dec, "precopy")
            self._load(self._channel, transport)
            st.end_time = time.monotonic()
            self._finish()
            self._set_state(S.COMPLETED)
        except Exception as e:  # noqa: BLE001 - report every failure, never die silently
            st.end_time = time.monotonic()
            st.error = str(e) if not self._cancel else "incoming migration cancelled"
            if self._rp is not None:
                try:
                    self._rp.put_bytes(codec.encode_rp_shut(1))
                    self._rp.flush()
                except ChannelError:
                    pass
            self._set_state(S.CANCELLED if self._cancel else S.FAILED)
        finally:
            if transport is not None:
                transport.shutdown()
                transport.close()
            if self.listener is not None:
                self.listener.close()
            self._done.set()

    def _load(self, ch: RamRecvChannel, transport) -> None:
        got_eof = False
        while True:
            ev = ch.next_event()
            if ev is None:
                if got_eof:
                    return
                raise ProtocolError("stream ended before EOF")
            if isinstance(ev, codec.RamRun):
                self._place(ev)
            elif isinstance(ev, codec.Command):
                self._command(ev, transport)
            elif isinstance(ev, codec.DeviceState):
                try:
                    self.guest_state = json.loads(ev.payload)
                except ValueError as e:
                    raise ProtocolError(f"section {ev.idstr!r}: state is not valid JSON ({e})") from None
            elif isinstance(ev, codec.EndOfStream):
                got_eof = True
                if transport.name.startswith("file:"):
                    continue  # a saved stream ends with the VM description
                if ch.reader.available() > 0:
                    continue
                return
            elif isinstance(ev, codec.VMDescription):
                self.vmdesc = ev.json
                return

    def _place(self, run: codec.RamRun) -> None:
        """Write a run of pages into guest RAM and mark them received."""
        blk = self.ram.blocks[run.block.index]
        pages = run.pages
        n = len(pages)
        bits = self.received[blk.idstr].bits
        contiguous = n == 1 or bool(np.all(np.diff(pages) == 1))
        where = slice(int(pages[0]), int(pages[0]) + n) if contiguous else pages
        if run.data is None:
            # Like QEMU, leave pages that are already zero alone (no allocation).
            nz = blk.words[where].any(axis=1)
            if nz.any():
                blk.pages[(pages if not contiguous else np.arange(where.start, where.stop))[nz]] = 0
            self.stats.ram.duplicate += n
        else:
            blk.pages[where] = run.data
            self.stats.ram.normal += n
        bits[where] = True

    def _command(self, cmd: codec.Command, transport) -> None:
        c = cmd.cmd
        if c == C.MIG_CMD_OPEN_RETURN_PATH:
            if self._rp is None:
                self._rp = QEMUFileWriter(transport, name="return-path")
        elif c == C.MIG_CMD_PING:
            if self._rp is not None:
                self._rp.put_bytes(codec.encode_rp_pong(codec.parse_ping(cmd.payload)))
                self._rp.flush()
        elif c == C.MIG_CMD_POSTCOPY_ADVISE:
            if codec.parse_postcopy_advise(cmd.payload) is not None:
                raise ProtocolError("command POSTCOPY_ADVISE: postcopy is not supported by this destination")
        else:
            raise ProtocolError(f"command {cmd.name}: not supported by the destination in precopy")

    def _finish(self) -> None:
        """All loaded: check completeness, confirm, compare or send digests."""
        missing = {n: bm.npages - bm.count() for n, bm in self.received.items() if bm.count() < bm.npages}
        if missing:
            raise ProtocolError(f"stream ended with pages never received: {missing}")
        if self._rp is not None:
            self._rp.put_bytes(codec.encode_rp_shut(0))
            self._rp.flush()
        digests = self.ram.digests()
        self.stats.digests = {n: d.hex() for n, d in digests.items()}
        if self._rp is not None:
            self._rp.put_bytes(codec.encode_rp_digests(digests))
            self._rp.flush()
        expected = (self.guest_state or {}).get("digests")
        if expected is not None:
            bad = [n for n, d in self.stats.digests.items() if expected.get(n) != d]
            if bad:
                raise ProtocolError(f"digest mismatch after load: blocks {bad} differ from the saved stream")
