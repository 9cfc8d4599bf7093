"""Guest RAM: RAM blocks backed by mmap (anonymous, memfd, memfd with MFD_HUGETLB).

A block's *host page size* is its migration granularity whatever backs it:
a 2 MiB-page block on ordinary memory migrates exactly like one on hugetlbfs,
so huge-page guests can be tested anywhere; real huge pages are used when the
backing is ``hugetlb``. The *target page* (4 KiB) is the unit of the stream.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import threading

import numpy as np

from ferry_migrate.channels import constants as C
from ferry_migrate.channels.codec import BlockInfo
from ferry_migrate.channels.pagecheck import page_fingerprints

from .bitmap import PageBitmap

BACKINGS = ("anon", "memfd", "hugetlb")
_MFD_HUGE_SHIFT = 26  # MFD_HUGE_SHIFT in linux/memfd.h
_MADV_POPULATE_WRITE = 23  # linux/mman.h, Linux 5.14+


# Page fingerprints (sum of each 64-bit word times an odd multiplier, mod
# 2^64) live in channels/pagecheck.py, where the page check values built on
# them are too; numpy computes them at about 10 GB/s, cheap enough to record
# for every page the destination places.


def fingerprint_digest(fps: np.ndarray) -> bytes:
    """sha256 over a block's page fingerprints (little-endian uint64)."""
    return hashlib.sha256(np.ascontiguousarray(fps, dtype="<u8").tobytes()).digest()


def page_selector(pages: np.ndarray):
    """A slice when ``pages`` are consecutive (cheaper numpy indexing), else the array itself."""
    n = len(pages)
    if n == 1 or bool(np.all(np.diff(pages) == 1)):
        return slice(int(pages[0]), int(pages[0]) + n)
    return pages


class HugePagesUnavailable(RuntimeError):
    """The host has not enough huge pages reserved for a hugetlb block."""


def parse_size(v) -> int:
    """'256M', '2MiB', '1G', '4k' or an int -> bytes."""
    if isinstance(v, int):
        return v
    s = str(v).strip().lower().replace("ib", "").replace("b", "")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(s)
    except ValueError:
        raise ValueError(f"size {v!r}: expected a number with an optional K/M/G suffix") from None


def format_size(n: int) -> str:
    for unit, sh in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << sh and n % (1 << sh) == 0:
            return f"{n >> sh} {unit}"
    return f"{n} B"


def hugepage_status(page_size: int) -> tuple[int, int]:
    """(free, total) huge pages of this size on the host."""
    d = f"/sys/kernel/mm/hugepages/hugepages-{page_size >> 10}kB"
    try:
        with open(f"{d}/free_hugepages") as f:
            free = int(f.read())
        with open(f"{d}/nr_hugepages") as f:
            total = int(f.read())
        return free, total
    except OSError:
        return 0, 0


def hugepage_advice(page_size: int, need: int) -> str:
    """How many huge pages of ``page_size`` are needed and free, and how to reserve ``need`` of them."""
    free, total = hugepage_status(page_size)
    kb = page_size >> 10
    if page_size == C.PAGE_SIZE_2M:
        how = f"echo {total + need - free} > /proc/sys/vm/nr_hugepages"
    else:
        how = f"echo {total + need - free} > /sys/kernel/mm/hugepages/hugepages-{kb}kB/nr_hugepages"
    return (f"{need} huge pages of {format_size(page_size)} needed, {free} free of {total} reserved; "
            f"reserve them as root with `{how}` (or hugepages= on the kernel command line)")


class RAMBlock:
    """One RAM block of the guest: a named, mmap'd region with a host page size."""

    def __init__(self, idstr: str, length: int, page_size: int = C.PAGE_SIZE_4K,
                 backing: str = "anon", index: int = 0, prealloc: bool = False):
        if len(idstr.encode()) > C.IDSTR_MAX or not idstr:
            raise ValueError(f"RAM block idstr {idstr[:40]!r}: 1 to {C.IDSTR_MAX} bytes")
        if page_size not in C.HOST_PAGE_SIZES:
            raise ValueError(f"RAM block {idstr!r}: page size {page_size} not one of 4K, 2M, 1G")
        if length <= 0 or length % page_size:
            raise ValueError(f"RAM block {idstr!r}: length {length} is not a positive multiple "
                             f"of its page size {format_size(page_size)}")
        if backing not in BACKINGS:
            raise ValueError(f"RAM block {idstr!r}: backing {backing!r}, expected one of {', '.join(BACKINGS)}")
        self.idstr = idstr
        self.length = length
        self.page_size = page_size
        self.backing = backing
        self.index = index
        self.fd = -1
        self.npages = length >> C.TARGET_PAGE_BITS  # target pages
        self.tp_per_hp = page_size >> C.TARGET_PAGE_BITS
        self.mem = self._map()
        self.view = memoryview(self.mem)
        # (npages, 4096) bytes and (npages, 512) words views, no copy.
        self.pages = np.frombuffer(self.mem, dtype=np.uint8).reshape(self.npages, C.TARGET_PAGE_SIZE)
        self.words = self.pages.view(np.uint64)
        self.address = self.pages.ctypes.data  # for iovecs built in bulk (channels/iovec.py)
        self.info = BlockInfo(index, idstr, length, page_size)
        if prealloc:
            self.prealloc()

    def prealloc(self) -> None:
        """Back every page now (QEMU's -mem-prealloc), not at first touch.

        On a destination this moves the cost of faulting fresh memory in (large
        in a VM, whose host backs guest memory lazily too) out of the migration.
        """
        try:
            self.mem.madvise(_MADV_POPULATE_WRITE)
        except OSError:
            self.pages[:, 0] = self.pages[:, 0]  # touch a byte of every page

    def _map(self) -> mmap.mmap:
        if self.backing == "anon":
            m = mmap.mmap(-1, self.length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._advise_thp(m)
            return m
        flags = os.MFD_CLOEXEC
        if self.backing == "hugetlb":
            if self.page_size == C.PAGE_SIZE_4K:
                raise ValueError(f"RAM block {self.idstr!r}: hugetlb backing needs a 2M or 1G page size")
            need = self.length // self.page_size
            free, _ = hugepage_status(self.page_size)
            if free < need:
                raise HugePagesUnavailable(f"RAM block {self.idstr!r}: " + hugepage_advice(self.page_size, need))
            flags |= os.MFD_HUGETLB | ((self.page_size.bit_length() - 1) << _MFD_HUGE_SHIFT)
        try:
            self.fd = os.memfd_create(f"ferry:{self.idstr}", flags)
            os.ftruncate(self.fd, self.length)
            m = mmap.mmap(self.fd, self.length, flags=mmap.MAP_SHARED)
            if self.backing == "memfd":
                self._advise_thp(m)
            return m
        except OSError as e:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            if self.backing == "hugetlb":
                raise HugePagesUnavailable(f"RAM block {self.idstr!r}: {e.strerror}; "
                                           + hugepage_advice(self.page_size, self.length // self.page_size)) from e
            raise

    @staticmethod
    def _advise_thp(m: mmap.mmap) -> None:
        # As QEMU does for guest RAM: transparent huge pages make first touch
        # (the destination filling fresh memory) about 10x cheaper. The block's
        # host page size, its migration granularity, is not affected.
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass

    def write_pages(self, where, data) -> None:
        """Write target pages (``where``: a slice or an index array); ``data`` None = zero pages.

        Zero pages that are already zero are left alone, as QEMU does: no
        allocation of memory that was never touched.
        """
        if data is not None:
            self.pages[where] = data
            return
        nz = self.words[where].any(axis=1)
        if nz.any():
            idx = np.arange(where.start, where.stop) if isinstance(where, slice) else np.asarray(where)
            self.pages[idx[nz]] = 0

    def fingerprints(self, p0: int = 0, p1: int | None = None) -> np.ndarray:
        """64-bit fingerprints of target pages [p0, p1) (see :func:`page_fingerprints`)."""
        return page_fingerprints(self.words[p0:p1])

    def digest(self) -> bytes:
        """The block digest: sha256 over the fingerprints of all its target pages."""
        return fingerprint_digest(self.fingerprints())

    def host_page_of(self, target_page: int) -> int:
        """First target page of the host page holding ``target_page``."""
        return target_page - target_page % self.tp_per_hp

    def close(self) -> None:
        try:
            self.view.release()
            self.mem.close()
        except BufferError:
            pass  # numpy views still alive; the mapping goes with them
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self):
        return (f"RAMBlock({self.idstr!r}, {format_size(self.length)}, page {format_size(self.page_size)}, "
                f"{self.backing})")


class GuestRAM:
    """The guest's RAM blocks plus the guest's dirty log.

    The dirty log stands for KVM's dirty logging: the workload marks the target
    pages it wrote, *after* writing them, under ``dirty_lock``; the migration
    thread moves the log into its own bitmap at each sync.
    """

    def __init__(self, blocks: list[RAMBlock]):
        names = [b.idstr for b in blocks]
        if len(set(names)) != len(names):
            raise ValueError(f"RAM block names must be unique: {names}")
        self.blocks = blocks
        self.by_name = {b.idstr: b for b in blocks}
        self.dirty_lock = threading.Lock()
        self.dirty_log = {b.idstr: PageBitmap(b.npages) for b in blocks}

    @classmethod
    def create(cls, size: int, page_size: int = C.PAGE_SIZE_4K, backing: str = "anon",
               nblocks: int = 1, name: str = "pc.ram", prealloc: bool = False) -> "GuestRAM":
        """A guest of ``size`` bytes split into ``nblocks`` equal blocks (``prealloc``: back them now)."""
        if nblocks < 1 or size % (nblocks * page_size):
            raise ValueError(f"guest size {format_size(size)} does not split into {nblocks} blocks "
                             f"of whole {format_size(page_size)} pages")
        per = size // nblocks
        blocks = []
        try:
            for i in range(nblocks):
                blocks.append(RAMBlock(name if nblocks == 1 else f"{name}.{i}", per, page_size, backing, i,
                                       prealloc))
        except BaseException:
            for b in blocks:
                b.close()
            raise
        return cls(blocks)

    @property
    def total(self) -> int:
        return sum(b.length for b in self.blocks)

    @property
    def npages(self) -> int:
        return sum(b.npages for b in self.blocks)

    def infos(self) -> list[BlockInfo]:
        return [b.info for b in self.blocks]

    def digests(self) -> dict[str, bytes]:
        return {b.idstr: b.digest() for b in self.blocks}

    def collect_dirty(self) -> None:
        """Bring writes tracked outside this process into ``dirty_log`` (called before each sync).

        Nothing to do here: the workload marks its own writes. A guest in its
        own process (engine/guestproc.py) replaces it with a PAGEMAP_SCAN of
        that process's write-protected memory.
        """

    def mark_dirty(self, block: RAMBlock, pages) -> None:
        """Record guest writes to target pages (call after writing them)."""
        with self.dirty_lock:
            self.dirty_log[block.idstr].bits[pages] = True

    def fill(self, kind: str = "pattern", seed: int = 1) -> None:
        """Give the guest initial contents: zero, pattern, random, or mixed (1 in 4 pages zero)."""
        if kind == "zero":
            return
        rng = np.random.default_rng(seed)
        for b in self.blocks:
            step = 4096  # pages per chunk, bounds temporary memory
            for p in range(0, b.npages, step):
                q = min(p + step, b.npages)
                w = b.words[p:q]
                if kind == "random":
                    w[:] = rng.integers(0, 2**63, size=w.shape, dtype=np.uint64)
                elif kind in ("pattern", "mixed"):
                    base = (np.arange(p, q, dtype=np.uint64) + np.uint64(b.index << 40) + np.uint64(seed << 48))
                    w[:] = base[:, None] * np.uint64(0x9E3779B97F4A7C15) + np.arange(512, dtype=np.uint64)
                    if kind == "mixed":
                        w[(np.arange(p, q) % 4) == 3] = 0
                else:
                    raise ValueError(f"guest fill {kind!r}: expected zero, pattern, random or mixed")

    def close(self) -> None:
        for b in self.blocks:
            b.close()
