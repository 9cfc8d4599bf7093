"""Destination side of multifd: one receiver thread per multifd channel, and the sync point.

Each receiver reads its channel's init record and answers it (OK, or the
destination's multifd-channels when the counts differ), then packets
(channels/multifd_codec.py). A packet's head (block, offsets, check values)
is read and checked first, then its data pages are read *straight into
guest RAM*: one recvmsg per packet with an iovec per run of consecutive
pages, built in bulk with numpy (channels/multifd_read.py), as QEMU's
multifd receiver reads into the pages' host addresses
(migration/multifd-nocomp.c). No page byte is copied in user space; zero
pages are cleared in bulk. The socket calls and numpy passes release the
GIL, so N receivers work in parallel.

Integrity (page-checksums): the check values are verified on the pages in
guest RAM, right after they were read (their fingerprints computed in place,
aligned). A mismatch fails the migration, the packet's data pages are
cleared and never marked received. A damaged page still never reaches a
running guest: multifd carries precopy only (its channels end before the
switch, and no multifd page is placed after POSTCOPY_LISTEN: see below), and
the destination's guest does not run before the migration completed, which
a failed check prevents. The bad-input checks of the head (page count,
offsets, pass, after LISTEN, a missing check value) all come before any page
byte is read.

Passes: after its SYNC packet of pass k a receiver stops reading. The main
loader, at RAM_SAVE_FLAG_MULTIFD_FLUSH on the main stream, calls
:meth:`MultifdReceiver.sync_main`: it waits until every channel reached its
SYNC of pass k, then opens pass k+1 and releases them (QEMU:
multifd_recv_sync_main and the receivers' sem_sync in migration/multifd.c).
So no page of pass k+1 is placed before every page of pass k, whatever the
channels' relative speed. A sync round wakes each thread once: receivers
count their arrival (the last one wakes the main loader) and then wait on a
second condition that only the main loader's release notifies; with one
condition for all, each arrival woke all N receivers (N x N wake-ups a pass).

Placement ends at POSTCOPY_LISTEN (:meth:`close_placement`): the source
flushes and closes its multifd channels before the switch, and a page on a
multifd channel after LISTEN is an error, never placed. A packet whose pages
are being read when LISTEN comes (only a misbehaving source sends one) is
finished and checked before LISTEN goes on, and its error fails the
migration.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable

import numpy as np

from ferry_migrate.channels import constants as C
from ferry_migrate.channels import hello as H
from ferry_migrate.channels import multifd_codec as M
from ferry_migrate.channels.errors import ChannelError, PageIntegrityError, UnverifiedStreamError
from ferry_migrate.channels.iovec import page_iovec
from ferry_migrate.channels.multifd_read import PacketReader
from ferry_migrate.channels.pagecheck import page_fingerprints, place_values

from .multifd_send import multifd_channel_name
from .ram import page_selector

PAGE = C.TARGET_PAGE_SIZE


def fingerprints_in_place(words: np.ndarray, pages: np.ndarray) -> np.ndarray:
    """Fingerprints (channels/pagecheck.py) of target ``pages`` of (npages, 512) ``words``, in their order.

    Computed on the memory itself (page-aligned): no copy when the pages are
    consecutive or fill at least half of their span, else one gather.
    """
    sel = page_selector(pages)
    if isinstance(sel, slice):
        return page_fingerprints(words[sel])
    lo, hi = int(pages.min()), int(pages.max()) + 1
    if hi - lo <= 2 * len(pages):
        return page_fingerprints(words[lo:hi])[pages - lo]
    return page_fingerprints(words[pages])


class MultifdRecvChannel:
    """One multifd channel of the destination: reader, decoder, checker, figures."""

    def __init__(self, index: int, reader: PacketReader):
        self.index = index  # order of acceptance (the hello's index when there is one)
        self.id: int | None = None  # from its init record
        self.name = multifd_channel_name(index)
        self.reader = reader
        self.decoder: M.MultifdDecoder | None = None
        self.reached = 0  # the last pass whose SYNC this channel read
        self.done = False  # FIN read
        self.placing = False  # reading a packet's pages into guest RAM, or checking them (under cond)
        self.normal_pages = 0
        self.zero_pages = 0
        self.last_placed: float | None = None  # monotonic time of its last placement
        self.thread: threading.Thread | None = None

    @property
    def transferred(self) -> int:
        return self.reader.transferred


class MultifdReceiver:
    """The destination's N multifd channels.

    ``channels``: multifd-channels; ``ram()``: the GuestRAM, waiting until
    the layout is known; ``received``: engine/postcopy.ReceivedPages (bits
    set as pages are placed); ``require_checks``: page-checksums;
    ``on_error(err)``: called once with the first receiver's error;
    ``connect_timeout``: seconds :meth:`sync_main` waits for a channel that
    has not connected before MultifdChannelMissing (and :meth:`close_placement`
    for a packet being read).
    """

    def __init__(self, channels: int, ram: Callable, received: Callable, require_checks: Callable[[], bool],
                 on_error: Callable[[BaseException], None], connect_timeout: float = 30.0):
        self.n = channels
        self._ram = ram
        self._received = received
        self._require_checks = require_checks
        self.on_error = on_error
        self.connect_timeout = connect_timeout
        self.channels: list[MultifdRecvChannel] = []
        self.by_id: dict[int, MultifdRecvChannel] = {}
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)  # the main loader waits here (all arrived, connected)
        self.released = threading.Condition(self.lock)  # receivers after their SYNC wait here
        self.arrived = 0  # channels that reached the SYNC of the open pass
        self.pass_ = 1  # the open pass
        self.error: BaseException | None = None
        self.stopped = False
        self.placement_closed = False  # POSTCOPY_LISTEN came
        self.closed_at: float | None = None
        self.sync_waits: collections.deque = collections.deque(maxlen=4)  # s the main loader waited, last syncs
        self.created = time.monotonic()

    @property
    def accepting(self) -> bool:
        return len(self.channels) < self.n

    @property
    def transferred(self) -> int:
        return sum(c.transferred for c in self.channels)

    def add(self, transport, index: int) -> MultifdRecvChannel:
        """A multifd connection was accepted (channel_auth verified it when a gate is up): read it."""
        ch = MultifdRecvChannel(index, PacketReader(transport, name=multifd_channel_name(index)))
        # A channel may carry nothing for long (every page of a pass went to the others): no idle
        # bound here; the source's liveness is watched on the main channel and by TCP (liveness-timeout).
        ch.reader.idle_timeout = None
        ch.thread = threading.Thread(target=self._run, args=(ch,), name=f"load-{ch.name}", daemon=True)
        with self.cond:
            self.channels.append(ch)
            ch.thread.start()  # started before a pause can join it
            self.cond.notify_all()
        return ch

    # --- the main loader's side ---
    def sync_main(self) -> None:
        """MULTIFD_FLUSH: wait until every channel reached its SYNC of the open pass, then release them.

        Raises a receiver's error, MultifdChannelMissing (a channel never
        connected within ``connect_timeout``, or ended before its FIN), or
        ChannelError once stopped.
        """
        t0 = time.monotonic()
        deadline = t0 + self.connect_timeout
        with self.cond:
            while True:
                if self.error is not None:
                    raise self.error
                if self.stopped:
                    raise ChannelError("multifd channels stopped")
                if len(self.by_id) == self.n and self.arrived >= self.n:
                    break
                if len(self.by_id) < self.n and time.monotonic() > deadline:
                    have = sorted(self.by_id)
                    missing = [i for i in range(1, self.n + 1) if i not in self.by_id]
                    raise M.MultifdChannelMissing(
                        f"multifd channel(s) {missing} of {self.n} never connected in {self.connect_timeout:g} s "
                        f"(connected: {have}); enable multifd with the same multifd-channels on both sides")
                self.cond.wait(0.1 if len(self.by_id) < self.n else 1.0)
            self.pass_ += 1
            self.arrived = 0
            self.released.notify_all()
            self.sync_waits.append(time.monotonic() - t0)

    def close_placement(self) -> None:
        """POSTCOPY_LISTEN: no multifd page may be placed from now on.

        Waits (up to ``connect_timeout``) for a packet whose pages are being
        read, and raises a receiver's error: pages whose check failed are not
        left behind a LISTEN that went on. A packet still being read then
        stops every channel, with MultifdError.
        """
        with self.cond:
            self.placement_closed = True
            self.closed_at = time.monotonic()
            self.cond.wait_for(lambda: not any(c.placing for c in self.channels), self.connect_timeout)
            stuck = [c.name for c in self.channels if c.placing]
            err = self.error
        if stuck:
            self.shutdown()
            raise M.MultifdError(f"multifd channel(s) {stuck}: a packet's pages still being read "
                                 f"{self.connect_timeout:g} s after POSTCOPY_LISTEN")
        if err is not None:
            raise err

    def shutdown(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
            self.released.notify_all()
        for c in self.channels:
            c.reader.shutdown()

    def close(self, join: float = 5.0) -> None:
        self.shutdown()
        for c in self.channels:
            if c.thread is not None and c.thread is not threading.current_thread():
                c.thread.join(join)
            try:
                c.reader.transport.close()
            except OSError:
                pass

    def figures(self) -> dict:
        """query-migrate figures: how long the main loader waited at the last sync points (ms, oldest
        first; the last two of a precopy are the stop-and-copy's)."""
        return {"sync-wait-ms": [round(w * 1000, 3) for w in self.sync_waits]}

    def stats(self) -> dict:
        """Per-channel figures (query-migrate ``channels``); ``last-placed-ms`` counts from this object's creation."""
        out = {}
        for c in self.channels:
            out[c.name] = {"bytes": c.transferred, "normal": c.normal_pages, "duplicate": c.zero_pages,
                           "done": c.done,
                           "last-placed-ms": None if c.last_placed is None
                           else round((c.last_placed - self.created) * 1000, 3)}
        return out

    # --- receiver threads ---
    def _run(self, ch: MultifdRecvChannel) -> None:
        try:
            self._receive(ch)
        except BaseException as e:  # noqa: BLE001 - reported, never lost
            self._report(e, ch)

    def _report(self, e: BaseException, ch: MultifdRecvChannel | None = None) -> None:
        """Keep the first receiver error and hand it to ``on_error`` (once)."""
        with self.cond:
            if ch is not None:
                ch.placing = False  # with its error recorded: close_placement sees both at once
            if self.stopped and isinstance(e, ChannelError) and not isinstance(e, M.MultifdError):
                self.cond.notify_all()
                return  # our own shutdown
            first = self.error is None
            if first:
                self.error = e
            self.cond.notify_all()
            self.released.notify_all()
        if first:
            self.on_error(e)

    def _receive(self, ch: MultifdRecvChannel) -> None:
        r = ch.reader
        if not r.fill(C.FERRY_MULTIFD_INIT_SIZE):
            raise M.MultifdChannelMissing(f"multifd channel {ch.name}: connection ended before its init record")
        try:
            cid = M.parse_init(r.view()[:C.FERRY_MULTIFD_INIT_SIZE], self.n, ch.name)
        except M.MultifdChannelsMismatch as e:
            # Reported before the source can learn it and close its main channel (this side's
            # error is then this one, not a truncated stream), and answered under the lock that
            # shutdown() takes before it closes any channel (the answer is not cut off).
            with self.cond:
                first = self.error is None
                if first:
                    self.error = e
                    self.on_error(e)  # sets the destination's error and stops its main loader only
                self._reply(ch, C.FERRY_MULTIFD_REPLY_CHANNELS)  # the source names both counts too
                self.cond.notify_all()
                self.released.notify_all()
            raise
        r.consume(C.FERRY_MULTIFD_INIT_SIZE)
        with self.cond:
            if cid in self.by_id:
                raise M.MultifdChannelTwice(f"multifd channel id {cid} connected twice (connections "
                                            f"{self.by_id[cid].index} and {ch.index})")
            ch.id = cid
            self.by_id[cid] = ch
            self.cond.notify_all()
        self._reply(ch, C.FERRY_MULTIFD_REPLY_OK)
        ram = self._ram()
        received = self._received()
        ch.decoder = dec = M.MultifdDecoder(ram.infos(), ch.name)
        required = self._require_checks()
        while True:
            pkt, n = dec.next_head(r.view())
            if pkt is M.NEED_DATA:
                if not r.fill(n):
                    raise M.MultifdChannelMissing(
                        f"multifd channel {ch.name}: connection ended before its FIN (after {r.transferred} bytes, "
                        f"packet {dec.packet_num}, pass {dec.pass_})")
                continue
            r.consume(n)
            if len(pkt.pages):
                self._place(ch, ram.blocks[pkt.block.index], received, required, pkt)
            if pkt.fin:
                ch.done = True
                # Nothing follows FIN: give the socket back now, not when the migration
                # ends (in postcopy that is long after these channels carried their last page).
                try:
                    r.transport.close()
                except OSError:
                    pass
                return
            if pkt.sync:
                with self.cond:
                    ch.reached = pkt.pass_
                    self.arrived += 1  # a packet of another pass than the open one: the decoder refused it
                    if self.arrived >= self.n:
                        self.cond.notify()  # only the main loader waits on it
                    while self.pass_ <= pkt.pass_:
                        if self.stopped or self.error is not None:
                            return
                        self.released.wait(1.0)
                dec.advance()

    def _reply(self, ch: MultifdRecvChannel, status: int) -> None:
        """Answer the init record (the source waits for it before it sends a page)."""
        try:
            H.send_bytes(ch.reader.transport, M.encode_init_reply(status, self.n))
        except OSError:
            pass  # the connection is gone: reading it says so

    def _place(self, ch: MultifdRecvChannel, blk, received, required: bool, pkt: M.MultifdPacket) -> None:
        """Read a packet's data pages straight into guest RAM, check them, clear its zero pages, mark
        them received.

        Raises (nothing marked received then): MultifdError after LISTEN or
        UnverifiedStreamError (page-checksums on, no check values) before a
        byte is read; MultifdChannelMissing (the stream ended in the page
        data) or PageIntegrityError (a check value differs) after, the
        packet's data pages cleared.
        """
        n, k = len(pkt.pages), pkt.nnormal
        if pkt.checks is None and required:
            raise UnverifiedStreamError(
                f"multifd channel {ch.name}: packet {pkt.packet_num} ({n} pages from offset "
                f"0x{int(pkt.pages[0]) << C.TARGET_PAGE_BITS:x} of block {blk.idstr!r}) carries no check values, "
                "and page-checksums is on; not placed")
        with self.cond:
            if self.placement_closed:
                raise M.MultifdError(f"multifd channel {ch.name}: {n} pages of block {blk.idstr!r} after "
                                     "POSTCOPY_LISTEN; not placed")
            ch.placing = True  # cleared below, or by _run once the error is recorded
        data = pkt.pages[:k]
        try:
            if k and not ch.reader.read_pages(page_iovec(blk.address, data, PAGE), blk.view, blk.address):
                raise M.MultifdChannelMissing(
                    f"multifd channel {ch.name}: connection ended before its FIN, in the pages of packet "
                    f"{pkt.packet_num} (after {ch.reader.transferred} bytes, pass {pkt.pass_})")
            if pkt.checks is not None:
                self._verify(ch, blk, pkt)
        except BaseException:
            if k:
                blk.pages[page_selector(data)] = 0  # what arrived of them is not what was sent
            raise
        if k < n:
            blk.write_pages(page_selector(pkt.pages[k:]), None)
        received.bitmaps[blk.idstr].bits[page_selector(pkt.pages)] = True
        ch.normal_pages += k
        ch.zero_pages += n - k
        ch.last_placed = time.monotonic()
        with self.cond:
            ch.placing = False
            self.cond.notify_all()

    @staticmethod
    def _verify(ch: MultifdRecvChannel, blk, pkt: M.MultifdPacket) -> None:
        """Check values of a packet's pages as they are in guest RAM (data pages) or will be (zero pages)."""
        k = pkt.nnormal
        actual = place_values(blk.idstr, pkt.pages)
        if k:
            actual[:k] ^= fingerprints_in_place(blk.words, pkt.pages[:k])
        bad = np.flatnonzero(actual != pkt.checks)
        if len(bad):
            i = int(bad[0])
            raise PageIntegrityError(ch.name, blk.idstr, int(pkt.pages[i]) << C.TARGET_PAGE_BITS,
                                     int(pkt.checks[i]), int(actual[i]), len(bad))
