"""Destination side of postcopy: host-page assembly and demand paging.

*Placement*: a host page becomes visible to the guest all at once, when it
is marked received. A run that holds a whole host page is placed straight
from the stream buffer (or from the channel's PageChecker copy with
page-checksums). A host page that arrives in pieces (a huge page the source
interrupted for a request) is assembled: with the memcpy backend in place,
each piece written straight into guest RAM and the page marked received after
its last piece; with the uffd backend in a per-channel temporary host page,
placed with one UFFDIO_COPY once complete (the kernel maps a host page only
whole). Every run is checked against its page check values before any of it
is copied or placed. Target pages of a host page must arrive in order, and no
page of another host page may arrive on that channel before the current one
is complete.

*Demand paging*: a guest thread about to touch pages calls
:meth:`FaultHandler.ensure`; for each host page not yet received it sends one
request (deduplicated while in flight, like QEMU's page_requested) and blocks
until the page is placed. Latency (request sent -> host page placed) and
blocktime (time guest threads spent blocked) are recorded.

*Placement backends*: by default a placed page is copied into guest RAM
(memcpy). A guest in its own process (engine/guestproc.py) sets
``ReceivedPages.placer``: each placement is then one UFFDIO_COPY of the whole
host page, which also wakes the guest threads the kernel stopped on it, and
its faults come in through :meth:`FaultHandler.kernel_fault` instead of
:meth:`FaultHandler.ensure`.
"""
from __future__ import annotations

import mmap
import threading
import time
from typing import Callable

import numpy as np

from ferry_migrate.channels import constants as C
from ferry_migrate.channels.codec import RamRun
from ferry_migrate.channels.errors import ProtocolError
from ferry_migrate.channels.pagecheck import PageChecker

from .bitmap import PageBitmap
from .callbacks import weak_callback  # noqa: F401 - re-exported
from .latency import LatencyRecorder
from .reqtrace import RequestTrace
from .ram import GuestRAM, RAMBlock, page_fingerprints, page_selector


class ReceivedPages:
    """What the destination holds: received bitmaps and page fingerprints, per block.

    ``cond`` guards the bits; it is notified each time pages are placed.
    ``placer``, if set, writes placed pages instead of a memcpy: an object with
    ``place(block, where, data)`` (same arguments as :meth:`RAMBlock.write_pages`)
    and ``discard(block, start, length)`` (bytes), e.g. engine/guestproc.py's UffdPlacer.
    """

    def __init__(self, ram: GuestRAM):
        self.ram = ram
        self.bitmaps = {b.idstr: PageBitmap(b.npages) for b in ram.blocks}
        self.fingerprints = {b.idstr: np.zeros(b.npages, dtype=np.uint64) for b in ram.blocks}
        self.cond = threading.Condition()
        self.on_placed: Callable[[RAMBlock, str], None] | None = None
        self.placer = None
        # channel -> when its latest placement began (its data fully read) and when its pages
        # were in memory, just before they were marked received: the request trace's
        # "decoded" and "placed"
        self.place_started: dict[str, float] = {}
        self.place_done: dict[str, float] = {}
        self.place_where: dict[str, tuple] = {}  # channel -> (block index, pages) of its latest placement

    def count(self) -> int:
        return sum(b.count() for b in self.bitmaps.values())

    def snapshot_fingerprints(self) -> None:
        """Record the fingerprints of what memory holds now (at LISTEN: all precopy data).

        Only received pages are read: reading a missing page of shared memory
        would allocate it, and a guest in its own process would then find it
        there without a fault. (A missing page gets its fingerprint when placed.)
        """
        for b in self.ram.blocks:
            bits = self.bitmaps[b.idstr].bits
            fps = self.fingerprints[b.idstr]
            if bits.all():
                fps[:] = b.fingerprints()
                continue
            idx = np.flatnonzero(bits)
            for i in range(0, len(idx), 4096):  # bounded temporary copies
                sel = idx[i:i + 4096]
                fps[sel] = page_fingerprints(b.words[sel])

    def discard(self, block: RAMBlock, start: int, length: int) -> None:
        """POSTCOPY_RAM_DISCARD: these pages are stale (or were never sent); drop them.

        With a placer (uffd) their memory goes, so the guest's next access
        faults. With the memcpy backend only the memory of pages received
        before goes: a page never received holds nothing stale, and its
        memory, backed at POSTCOPY_ADVISE, stays, so placing it later is a
        copy, not a first touch (which costs several times the copy, much
        more in a VM). The guest waits for the received bit either way.
        """
        p0, p1 = start >> C.TARGET_PAGE_BITS, (start + length) >> C.TARGET_PAGE_BITS
        bits = self.bitmaps[block.idstr].bits
        with self.cond:
            held = bits[p0:p1].copy()
            bits[p0:p1] = False
        if self.placer is not None:
            self.placer.discard(block, start, length)
            return
        if block.backing == "hugetlb":
            # Keep the huge pages: given back to the pool, they might not be had
            # again when the page arrives. Not-received pages are never read.
            return
        advice = mmap.MADV_DONTNEED if block.backing == "anon" else mmap.MADV_REMOVE
        tph = block.tp_per_hp
        # Runs of received pages (whole host pages: discards are host-page aligned).
        edges = np.flatnonzero(np.diff(np.concatenate(([False], held, [False])).astype(np.int8)))
        for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist()):
            a, b = p0 + a - (p0 + a) % tph, p0 + b + (-(p0 + b)) % tph
            try:
                block.mem.madvise(advice, a << C.TARGET_PAGE_BITS, (b - a) << C.TARGET_PAGE_BITS)
            except (OSError, AttributeError, ValueError):
                block.pages[a:b] = 0

    def place(self, block: RAMBlock, where, data, channel: str = "precopy") -> int:
        """Write pages (``where``: a slice or index array) and mark them received.

        Pages already received are left alone (never overwrite a newer page).
        ``data`` is (n, 4096) uint8, or None for zero pages. Returns pages placed.
        """
        self.place_started[channel] = time.monotonic()
        bits = self.bitmaps[block.idstr].bits
        fresh = ~bits[where]
        if not fresh.all():
            idx = np.arange(where.start, where.stop) if isinstance(where, slice) else np.asarray(where)
            idx = idx[fresh]
            if data is not None:
                data = data[fresh]
            where = idx
            if len(idx) == 0:
                return 0
        if self.placer is not None:
            # The guest may write a page the moment it is mapped: fingerprint the data.
            fps = 0 if data is None else page_fingerprints(data.view(np.uint64))
            self.placer.place(block, where, data)
            self.fingerprints[block.idstr][where] = fps
        else:
            block.write_pages(where, data)
            # Read back from guest RAM: verification then covers the placement too.
            self.fingerprints[block.idstr][where] = page_fingerprints(block.words[where])
        return self._mark(block, where, channel)

    def commit(self, block: RAMBlock, hp: slice, channel: str = "precopy") -> int:
        """Mark host page ``hp`` (a slice of target pages) received; its bytes are in guest RAM already.

        The memcpy backend's in-place assembly (:class:`HostPageAssembler`)
        writes the pieces of an interrupted huge page straight into guest RAM;
        nothing reads them before the received bit is set here, after the
        last piece. Fingerprints are read back from guest RAM, as in
        :meth:`place`. Returns pages marked (0 if the page was received already).
        """
        if self.placer is not None:
            raise RuntimeError("commit: pages of a placer backend are placed whole (UFFDIO_COPY), not in place")
        if self.bitmaps[block.idstr].bits[hp.start]:
            return 0
        self.fingerprints[block.idstr][hp] = page_fingerprints(block.words[hp])
        return self._mark(block, hp, channel)

    def _mark(self, block: RAMBlock, where, channel: str) -> int:
        """Set the received bits of placed pages and wake their waiters."""
        bits = self.bitmaps[block.idstr].bits
        self.place_done[channel] = time.monotonic()
        self.place_where[channel] = (block.index, where)
        with self.cond:
            bits[where] = True
            self.cond.notify_all()
        if self.on_placed is not None:
            self.on_placed(block, channel)
        return len(bits[where]) if isinstance(where, slice) else len(where)


class HostPageAssembler:
    """One per channel: assembles the host pages that arrive on it in pieces.

    In place in guest RAM with the memcpy backend; with a placer (uffd) in a
    temporary host page of this channel's, allocated at the first partial
    huge page of each size: up to one host page (1 GiB with 1 GiB pages) per
    channel, kept for the migration (anonymous memory, untouched parts cost
    nothing).

    ``require_checks`` (capability page-checksums): a run without check
    values is refused. Every run is checked against the values it carries
    before any of it is copied or placed (channels/pagecheck.py).
    """

    def __init__(self, ram: GuestRAM, received: ReceivedPages, channel: str, require_checks: bool = False):
        self.ram = ram
        self.received = received
        self.channel = channel
        self.checker = PageChecker(channel, require_checks)
        self.cur: tuple[int, int] | None = None  # (block index, first target page of host page)
        self.next_page = 0
        self._tmp: dict[int, np.ndarray] = {}  # host page size -> (tph, 4096) buffer
        self._tmp_zero: np.ndarray | None = None
        self.pages_placed = 0
        self.host_pages_placed = 0

    @property
    def busy(self) -> bool:
        """A host page is partly assembled."""
        return self.cur is not None

    def _tmp_for(self, blk: RAMBlock) -> np.ndarray:
        t = self._tmp.get(blk.page_size)
        if t is None:
            # Anonymous memory: untouched parts of a 1 GiB temp page cost nothing.
            m = mmap.mmap(-1, blk.page_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            t = np.frombuffer(m, dtype=np.uint8).reshape(blk.tp_per_hp, C.TARGET_PAGE_SIZE)
            self._tmp[blk.page_size] = t
        return t

    def add(self, run: RamRun) -> list[tuple[int, int]]:
        """Take a run of records; returns the (block, host page) pairs completed.

        Raises PageIntegrityError / UnverifiedStreamError before placing anything of the run.
        """
        self.checker.check(run)
        blk = self.ram.blocks[run.block.index]
        tph = blk.tp_per_hp
        pages = run.pages
        n = len(pages)
        done = []
        if tph == 1:
            if self.cur is not None:
                raise self._mixed(blk, int(pages[0]))
            self.pages_placed += self.received.place(blk, page_selector(pages), run.data, self.channel)
            self.host_pages_placed += n
            return [(blk.index, int(p)) for p in pages] if n <= 64 else [(blk.index, -1)]
        i = 0
        while i < n:
            p = int(pages[i])
            hp = p - p % tph
            if self.cur is None:
                if p != hp:
                    raise ProtocolError(
                        f"channel {self.channel}: target page at offset 0x{p << C.TARGET_PAGE_BITS:x} of block "
                        f"{blk.idstr!r} starts host page 0x{hp << C.TARGET_PAGE_BITS:x} in its middle "
                        f"(expected offset 0x{hp << C.TARGET_PAGE_BITS:x} first)")
                self.cur = (blk.index, hp)
                self.next_page = hp
            elif self.cur != (blk.index, hp):
                raise self._mixed(blk, p)
            elif p != self.next_page:
                raise ProtocolError(
                    f"channel {self.channel}: target page at offset 0x{p << C.TARGET_PAGE_BITS:x} of block "
                    f"{blk.idstr!r} out of order; expected offset 0x{self.next_page << C.TARGET_PAGE_BITS:x} "
                    f"of host page 0x{hp << C.TARGET_PAGE_BITS:x}")
            # The longest stretch of consecutive pages from i inside this host page.
            want = min(n - i, hp + tph - p)
            seg = pages[i:i + want]
            bad = np.flatnonzero(seg != np.arange(p, p + want))
            k = int(bad[0]) if len(bad) else want
            data = None if run.data is None else run.data[i:i + k]
            if p == hp and k == tph:
                self.received.place(blk, slice(hp, hp + tph), data, self.channel)  # whole host page at once
            elif self.received.placer is None:
                self._piece_in_place(blk, hp, p, k, data)
            else:
                tmp = self._tmp_for(blk)
                off = p - hp
                if data is None:
                    tmp[off:off + k] = 0
                else:
                    tmp[off:off + k] = data
                if p + k == hp + tph:
                    self.received.place(blk, slice(hp, hp + tph), tmp, self.channel)
            self.next_page = p + k
            i += k
            if self.next_page == hp + tph:
                self.cur = None
                self.pages_placed += tph
                self.host_pages_placed += 1
                done.append((blk.index, hp))
        return done

    def _piece_in_place(self, blk: RAMBlock, hp: int, p: int, k: int, data) -> None:
        """Memcpy backend: write target pages [p, p+k) of host page ``hp`` straight into guest RAM.

        The guest waits for the received bit of the whole host page, which is
        set only after the last piece (:meth:`ReceivedPages.commit`), so a
        partly written host page is never read; each piece was checked
        (page-checksums) by :meth:`add` before this, so nothing unchecked is
        ever written. One copy per piece instead of two (temporary host page,
        then guest RAM). A host page already received is not written again
        (never overwrite what the guest may have changed since): no host page
        spans two channels, so that happens only with a peer that resends one.
        """
        rp = self.received
        bits = rp.bitmaps[blk.idstr].bits
        last = p + k == hp + blk.tp_per_hp
        if last:
            rp.place_started[self.channel] = time.monotonic()  # the trace's "decoded": all of it read
        if bits[hp]:
            return
        blk.write_pages(slice(p, p + k), data)
        if last:
            rp.commit(blk, slice(hp, hp + blk.tp_per_hp), self.channel)

    def _mixed(self, blk: RAMBlock, p: int) -> ProtocolError:
        cb, chp = self.cur
        cur_blk = self.ram.blocks[cb]
        return ProtocolError(
            f"channel {self.channel}: target page at offset 0x{p << C.TARGET_PAGE_BITS:x} of block {blk.idstr!r} "
            f"arrived while host page at offset 0x{chp << C.TARGET_PAGE_BITS:x} of block {cur_blk.idstr!r} "
            f"is incomplete (next expected offset 0x{self.next_page << C.TARGET_PAGE_BITS:x})")


class FaultHandler:
    """Demand paging: guest threads wait here for host pages not yet received.

    ``send_request(block, start_bytes, length_bytes)`` sends one REQ_PAGES(_ID).
    """

    def __init__(self, ram: GuestRAM, received: ReceivedPages,
                 send_request: Callable[[RAMBlock, int, int], None]):
        self.ram = ram
        self.received = received
        self.send_request = weak_callback(send_request)  # its owner holds us
        self.requested: dict[tuple[int, int], float] = {}  # (block, host page) -> time sent
        self.latency = LatencyRecorder()
        self.latency_by_channel: dict[str, LatencyRecorder] = {}
        self.blocktime = 0.0  # seconds, summed over guest threads
        self.blocktime_by_thread: dict[str, float] = {}
        self.faults = 0
        self.requests = 0
        self.enabled = False  # set at LISTEN; before that nothing is missing
        self.failed: str | None = None  # the stream broke: waiters stay blocked
        # uffd backend: (block, host page) -> [(thread id, time of the kernel fault)]
        self.kernel_waiters: dict[tuple[int, int], list[tuple[int, float]]] = {}
        self.trace = RequestTrace()  # engine/reqtrace.py: this side's stages of each request
        received.on_placed = weak_callback(self._placed)

    def ensure(self, blk: RAMBlock, pages: np.ndarray) -> None:
        """Block until every target page in ``pages`` of ``blk`` is received."""
        if not self.enabled:
            return
        bits = self.received.bitmaps[blk.idstr].bits
        missing = pages[~bits[pages]]
        if len(missing) == 0:
            return
        tph = blk.tp_per_hp
        hps = np.unique(missing - missing % tph)
        t0 = time.monotonic()
        cond = self.received.cond
        with cond:
            self.faults += 1
            for hp in hps.tolist():
                if bits[hp]:
                    continue
                key = (blk.index, hp)
                if key not in self.requested:
                    self.requested[key] = time.monotonic()
                    self.requests += 1
                    self.trace.mark(blk.index, hp, "fault", t0)
                    self.trace.mark(blk.index, hp, "request-written")
                    self.send_request(blk, hp << C.TARGET_PAGE_BITS, blk.page_size)
            # The bit of a host page's first target page is set with the whole host page.
            while not bits[hps].all():
                cond.wait(0.5)
        t1 = time.monotonic()
        for hp in hps.tolist():
            if self.trace.has(blk.index, hp):
                self.trace.mark(blk.index, hp, "woken", t1)
        dt = t1 - t0
        name = threading.current_thread().name
        with cond:
            self.blocktime += dt
            self.blocktime_by_thread[name] = self.blocktime_by_thread.get(name, 0.0) + dt

    def pending(self) -> list[tuple[RAMBlock, int]]:
        """(block, first target page of host page) of every request still waiting for its page."""
        with self.received.cond:
            return [(self.ram.blocks[b], hp) for (b, hp) in self.requested
                    if not self.received.bitmaps[self.ram.blocks[b].idstr].bits[hp]]

    def kernel_fault(self, blk: RAMBlock, hp: int, tid: int, t: float) -> bool:
        """The kernel stopped guest thread ``tid`` on host page ``hp`` (first target page) at ``t``.

        Sends one request unless the page is received or already requested
        (deduplicated while in flight); the thread's blocktime runs until the
        page is placed (placement wakes it). Returns False if the page is
        already received (the caller wakes the thread). Errors of
        ``send_request`` propagate; the thread stays blocked.
        """
        bits = self.received.bitmaps[blk.idstr].bits
        with self.received.cond:
            self.faults += 1
            if bits[hp]:
                return False
            key = (blk.index, hp)
            self.kernel_waiters.setdefault(key, []).append((tid, t))
            if key not in self.requested:
                self.requested[key] = t
                self.requests += 1
                self.trace.mark(blk.index, hp, "fault", t)
                self.trace.mark(blk.index, hp, "request-written")
                self.send_request(blk, hp << C.TARGET_PAGE_BITS, blk.page_size)
        return True

    def _placed(self, blk: RAMBlock, channel: str) -> None:
        if not self.requested:
            return
        now = time.monotonic()
        with self.received.cond:
            bits = self.received.bitmaps[blk.idstr].bits
            done = [k for k in self.requested if k[0] == blk.index and bits[k[1]]]
            if not done:
                return
            rec = self.latency_by_channel.get(channel)
            if rec is None:
                rec = self.latency_by_channel[channel] = LatencyRecorder()
            rp = self.received
            decoded, placed = rp.place_started.get(channel), rp.place_done.get(channel, now)
            wb, where = rp.place_where.get(channel, (None, None))
            for k in done:
                # Only pages of this channel's placement get its times (another channel's
                # may have set the bit and not yet come here).
                mine = wb == k[0] and (where.start <= k[1] < where.stop if isinstance(where, slice)
                                       else bool((where == k[1]).any()))
                # Up to the placement (a receiver process reports it after the fact).
                end = placed if mine else now
                dt = max(0.0, end - self.requested.pop(k))  # asked after it was placed: no wait
                if mine:
                    self.trace.mark(k[0], k[1], "decoded", decoded)
                    self.trace.mark(k[0], k[1], "placed", placed)
                    if k in self.kernel_waiters:
                        self.trace.mark(k[0], k[1], "woken", placed)  # UFFDIO_COPY woke them
                self.latency.add(dt)
                rec.add(dt)
                for tid, t in self.kernel_waiters.pop(k, ()):
                    name = f"guest-tid{tid}"
                    wait = max(0.0, end - t)
                    self.blocktime += wait
                    self.blocktime_by_thread[name] = self.blocktime_by_thread.get(name, 0.0) + wait

    def metrics(self) -> dict:
        return {
            "postcopy-requests": self.requests,
            "postcopy-faults": self.faults,
            "postcopy-blocktime": int(self.blocktime * 1000),
            "postcopy-vcpu-blocktime": {k: int(v * 1000) for k, v in self.blocktime_by_thread.items()},
            "postcopy-latency": (lat := self.latency.summary()),
            # QEMU 10.1's name for the log2 histogram: bucket N = [2^N, 2^(N+1)) us
            "postcopy-latency-dist": lat["histogram"],
            "postcopy-latency-by-channel": {c: r.summary() for c, r in self.latency_by_channel.items()},
        }
