"""Destination demand paging through a guest process's userfaultfd.

:class:`UffdPlacer` is ReceivedPages' placement backend (UFFDIO_COPY /
ZEROPAGE, discards punched out of the memfd); :class:`UffdFaultServer` is the
fault thread (fault messages -> page requests); :class:`UffdBackend` plugs both
into a MigrationDestination. See docs/uffd.md ("Destination").
"""
from __future__ import annotations

import threading
import time

import numpy as np

from ferry_migrate.channels import constants as C

from . import uffd as U
from .guestproc import GuestLink, GuestProcessError, GuestProcessGone, SharedRAMBlock


class UffdPlacer:
    """ReceivedPages' placement backend for a guest process: UFFDIO_COPY / ZEROPAGE, discards punched.

    ``place`` gets what :meth:`RAMBlock.write_pages` gets: target pages
    (a slice or index array) and their data ((n, 4096) uint8, rows may be
    strided views of the stream buffer) or None for zero pages. A host page
    larger than 4 KiB always arrives whole (HostPageAssembler) and is one COPY.
    Errors: GuestProcessGone when the guest process exited (ESRCH),
    UffdRangeGone when its memory is not where it said; an EEXIST (page already
    there) is counted, reported in ``errors``, the data written through the
    worker's mapping and the range woken: never fatal.
    """

    def __init__(self, link: GuestLink):
        self.link = link
        self.uffd = link.uffd
        self.copies = 0  # UFFDIO_COPY calls
        self.zeropages = 0  # UFFDIO_ZEROPAGE calls
        self.eexist = 0
        self.errors: list[str] = []
        self.placed = {b.idstr: np.zeros(b.npages, bool) for b in link.ram.blocks}
        self._zero: dict[int, np.ndarray] = {}
        self._tls = threading.local()

    def _zero_page(self, size: int) -> np.ndarray:
        z = self._zero.get(size)
        if z is None:
            z = self._zero[size] = np.zeros(size, np.uint8)
        return z

    def _tmp(self, size: int) -> np.ndarray:
        t = getattr(self._tls, "tmp", None)
        if t is None or len(t) < size:
            t = self._tls.tmp = np.empty(size, np.uint8)
        return t[:size]

    def place(self, blk: SharedRAMBlock, where, data) -> None:
        tph = blk.tp_per_hp
        if isinstance(where, slice):
            p0, n = where.start, where.stop - where.start
            if tph > 1:
                if n != tph or p0 % tph:
                    raise U.UffdBadAddress(0, f"block {blk.idstr!r}: placement of pages {p0}..{p0 + n} is not "
                                           f"one whole host page of {tph} target pages")
                self._host_page(blk, p0, data)
                return
            if data is None:
                self._op(blk, p0, n, None)
                return
            if n > 1:
                # Consecutive 4 KiB pages: one contiguous copy of the stream rows and one COPY
                # for the run, not an ioctl per page.
                tmp = self._tmp(n << C.TARGET_PAGE_BITS)
                tmp.reshape(n, C.TARGET_PAGE_SIZE)[:] = data
                self._op(blk, p0, n, tmp)
                return
            pages = range(p0, p0 + n)
        else:
            pages = np.asarray(where).tolist()
        for i, p in enumerate(pages):
            self._op(blk, p, 1, None if data is None else data[i])

    def _host_page(self, blk, hp: int, data) -> None:
        size = blk.page_size
        if data is None:
            if blk.backing == "hugetlb":
                self._op(blk, hp, blk.tp_per_hp, self._zero_page(size))  # ZEROPAGE is refused on hugetlb
            else:
                self._op(blk, hp, blk.tp_per_hp, None)
            return
        if not (data.flags.c_contiguous and data.size == size):
            tmp = self._tmp(size)
            tmp.reshape(data.shape)[:] = data  # strided stream rows -> one contiguous host page
            data = tmp
        self._op(blk, hp, blk.tp_per_hp, data)

    def _op(self, blk, p: int, n: int, src) -> None:
        """COPY (``src``: contiguous n*4096 bytes) or ZEROPAGE (``src`` None) of target pages [p, p+n)."""
        dst = blk.guest_address + (p << C.TARGET_PAGE_BITS)
        length = n << C.TARGET_PAGE_BITS
        try:
            if src is None:
                self.uffd.zeropage(dst, length)
                self.zeropages += 1
            else:
                addr = src.ctypes.data
                self.uffd.copy(dst, addr, length)
                self.copies += 1
        except U.UffdPageExists as e:
            k = getattr(e, "done", 0) >> C.TARGET_PAGE_BITS
            if k or (n > 1 and blk.tp_per_hp == 1):
                # A run of small pages: the ones before the existing one are placed; that one
                # alone is the error; the rest go on one by one.
                self.placed[blk.idstr][p:p + k] = True
                one = None if src is None else src[k << C.TARGET_PAGE_BITS:(k + 1) << C.TARGET_PAGE_BITS]
                self._exists(blk, p + k, 1, one, e)
                self.placed[blk.idstr][p + k] = True
                for q in range(p + k + 1, p + n):
                    off = (q - p) << C.TARGET_PAGE_BITS
                    self._op(blk, q, 1, None if src is None else src[off:off + C.TARGET_PAGE_SIZE])
                return
            self._exists(blk, p, n, src, e)
        except U.UffdRangeGone as e:
            if not self.link.alive or e.errno == 3:  # ESRCH: the guest's memory is gone with it
                raise GuestProcessGone(f"guest process pid {self.link.pid} exited: placing host page at offset "
                                       f"0x{p << C.TARGET_PAGE_BITS:x} of block {blk.idstr!r} failed ({e})") from None
            raise
        self.placed[blk.idstr][p:p + n] = True

    def _exists(self, blk, p, n, src, e) -> None:
        # Something mapped the page before us (after a discard that is a bug to report).
        self.eexist += 1
        msg = (f"UffdPageExists: block {blk.idstr!r} offset 0x{p << C.TARGET_PAGE_BITS:x}: page already "
               f"there before its placement ({e.strerror})")
        if len(self.errors) < 16:
            self.errors.append(msg)
        if src is None:
            blk.pages[p:p + n] = 0
        else:
            blk.pages[p:p + n] = np.frombuffer(memoryview(src).cast("B"), np.uint8).reshape(n, -1)
        self.uffd.wake(blk.guest_address + (p << C.TARGET_PAGE_BITS), n << C.TARGET_PAGE_BITS)

    def discard(self, blk, start: int, length: int) -> None:
        """POSTCOPY_RAM_DISCARD: drop the pages from the memfd for real (the guest's next access faults)."""
        U.punch_hole(blk.fd, start, length)
        self.placed[blk.idstr][start >> C.TARGET_PAGE_BITS:(start + length) >> C.TARGET_PAGE_BITS] = False

    def metrics(self) -> dict:
        return {"uffd-copies": self.copies, "uffd-zeropages": self.zeropages, "uffd-eexist": self.eexist,
                "uffd-errors": list(self.errors)}


class UffdFaultServer:
    """The fault thread: uffd fault messages in bulk -> one request per missing host page.

    A fault on a page already placed (the message was read after the COPY
    that woke the thread) is answered with a WAKE. A fault address outside
    every block of the guest is a named error (UffdBadAddress) in ``errors``;
    the thread stays stopped and the server goes on. When sending a request
    fails (the migration broke), the error is kept and the thread stays
    stopped in the kernel.
    """

    def __init__(self, link: GuestLink, faults, placer: UffdPlacer, on_guest_gone=None, on_thread_start=None):
        self.link = link
        self.on_thread_start = on_thread_start  # engine/urgent.py: the fault thread's priority
        self.uffd = link.uffd
        self.faults = faults
        self.placer = placer
        self.on_guest_gone = on_guest_gone
        blocks = link.ram.blocks
        order = np.argsort([b.guest_address for b in blocks])
        self._blocks = [blocks[i] for i in order]
        self._starts = np.array([b.guest_address for b in self._blocks], np.uint64)
        self.kernel_faults = 0  # fault messages read
        self.wakes = 0
        self.bad_faults = 0
        self.errors: list[str] = []
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="uffd-faults", daemon=True)
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """End the thread (at its next poll, within 0.2 s; ``wait``: join it)."""
        self._stop = True
        if wait and self._thread is not None:
            self._thread.join(5)

    def _error(self, msg: str) -> None:
        if len(self.errors) < 16:
            self.errors.append(msg)

    def _loop(self) -> None:
        if self.on_thread_start is not None:
            self.on_thread_start()
        while not self._stop:
            try:
                ev = self.uffd.read_events(0.2)
            except U.UffdError as e:
                self._error(f"reading the uffd: {e}")
                return
            if len(ev):
                self.handle(ev, time.monotonic())
            elif not self.link.alive:
                self._error(f"GuestProcessGone: guest process pid {self.link.pid} exited "
                            f"(status {self.link.proc.poll() if self.link.proc else '?'})")
                if self.on_guest_gone is not None:
                    self.on_guest_gone(GuestProcessGone(self.errors[-1]))
                return

    def handle(self, ev: np.ndarray, t: float) -> None:
        """Serve a batch of uffd messages (UFFD_MSG_DTYPE) read at ``t`` (monotonic seconds)."""
        faults = ev[ev["event"] == U.UFFD_EVENT_PAGEFAULT]
        self.kernel_faults += len(faults)
        if len(faults) == 0:
            return
        addrs = faults["a1"]
        tids = (faults["a2"] & np.uint64(0xFFFFFFFF)).tolist()
        bi = np.searchsorted(self._starts, addrs, side="right").astype(np.int64) - 1
        for a, i, tid in zip(addrs.tolist(), bi.tolist(), tids):
            blk = self._blocks[i] if i >= 0 else None
            if blk is None or a >= blk.guest_address + blk.length:
                self.bad_faults += 1
                self._error(f"UffdBadAddress: fault at 0x{a:x} (thread {tid}) outside every block of the guest "
                            f"({', '.join(f'{b.idstr}: 0x{b.guest_address:x}+0x{b.length:x}' for b in self._blocks)})")
                continue
            tp = (a - blk.guest_address) >> C.TARGET_PAGE_BITS
            hp = tp - tp % blk.tp_per_hp
            try:
                placed = self.placer.placed[blk.idstr][hp]
                if placed:
                    # Counted like every other fault (postcopy-faults == uffd-kernel-faults).
                    with self.faults.received.cond:
                        self.faults.faults += 1
                if placed or not self.faults.kernel_fault(blk, hp, tid, t):
                    # Placed since the kernel queued the message; the COPY woke it, or this does.
                    self.uffd.wake(blk.guest_address + (hp << C.TARGET_PAGE_BITS), blk.page_size)
                    self.wakes += 1
            except Exception as e:  # noqa: BLE001 - the thread stays stopped; the server goes on
                self._error(f"{type(e).__name__}: request for block {blk.idstr!r} offset "
                            f"0x{hp << C.TARGET_PAGE_BITS:x}: {e}")

    def metrics(self) -> dict:
        return {"uffd-kernel-faults": self.kernel_faults, "uffd-wakes": self.wakes,
                "uffd-bad-faults": self.bad_faults, "uffd-fault-errors": list(self.errors)}


class UffdBackend:
    """Demand paging of a MigrationDestination through a guest process's uffd.

    Plugs :class:`UffdPlacer` into ``dest.received`` and starts the fault
    thread. If the guest process exits mid-migration, the migration fails
    with GuestProcessGone (the worker itself keeps running).
    """

    def __init__(self, dest, link: GuestLink):
        if link.uffd is None:
            raise GuestProcessError("the guest process registered no userfaultfd (started as a source?)")
        self.dest = dest
        self.link = link
        self.placer = UffdPlacer(link)
        dest.received.placer = self.placer
        urgent = getattr(dest, "urgent", None)
        self.server = UffdFaultServer(link, dest.faults, self.placer, self._guest_gone,
                                      on_thread_start=urgent.enter if urgent is not None else None)
        self.server.start()
        if dest.config.param("postcopy-receiver") == "process":
            from .urgent_receiver import prestart
            prestart(self.placer)  # engine/urgent_receiver.py: imports done before the channel comes

    def _guest_gone(self, err: GuestProcessGone) -> None:
        d = self.dest
        if d.stats.status not in ("completed", "failed", "cancelled"):
            d.guest_lost(err)  # the guest is gone: a failure, never a pause waiting for pages

    def metrics(self) -> dict:
        return {**self.placer.metrics(), **self.server.metrics()}

    def close(self, wait: bool = True) -> None:
        self.server.stop(wait)
        from .urgent_receiver import stop_spare
        stop_spare(self.placer, wait)
