"""Source dirty tracking of a guest process: async userfaultfd write-protect and PAGEMAP_SCAN.

See docs/uffd.md ("Source") for why this mode and what the fallback is.
"""
from __future__ import annotations

import numpy as np

from ferry_migrate.channels import constants as C

from . import uffd as U
from .guestproc import GuestLink


class WriteProtectTracker:
    """Source dirty tracking of a guest process; install with ``ram.collect_dirty = tracker.collect``.

    ``wp-async`` (the guest registered its memory for async write-protect): each
    :meth:`collect` is one PAGEMAP_SCAN per block of the guest's /proc/PID/pagemap,
    which returns the pages written since the last scan and write-protects them
    again atomically. On hugetlb the kernel tracks whole host pages: a write to
    one target page reports all 512 of its huge page. To measure what that
    costs, the guest's own log of target pages written is fetched too and the
    target pages marked only because of the granularity are counted
    (``wp-extra-bytes``: re-sent bytes that a 4 KiB tracking would not send).
    ``dirty-log`` (no WP_ASYNC / PAGEMAP_SCAN here): the guest's own log is used.
    """

    def __init__(self, link: GuestLink):
        self.link = link
        self.mode = link.hello.get("tracking") or "dirty-log"
        self.why = link.hello.get("tracking-why")
        self.scanner = U.PagemapScanner(link.pid) if self.mode == "wp-async" else None
        self.huge = any(b.backing == "hugetlb" for b in link.ram.blocks)
        self.scans = 0
        self.dirty_pages = 0  # target pages reported dirty
        self.extra_pages = 0  # of which not written (host-page granularity)

    def _guest_log(self) -> dict[str, np.ndarray]:
        raw = np.frombuffer(self.link.call("dirty")[1], np.bool_)
        out, pos = {}, 0
        for b in self.link.ram.blocks:
            out[b.idstr] = raw[pos:pos + b.npages]
            pos += b.npages
        return out

    def collect(self) -> None:
        ram = self.link.ram
        marks: dict[str, np.ndarray] = {}
        if self.scanner is not None:
            for b in ram.blocks:
                r = self.scanner.collect(b.guest_address, b.guest_address + b.length)
                d = np.zeros(b.npages + 1, np.int32)
                if len(r):
                    p = ((r - np.uint64(b.guest_address)) >> np.uint64(C.TARGET_PAGE_BITS)).astype(np.int64)
                    np.add.at(d, np.minimum(p[:, 0], b.npages), 1)
                    np.add.at(d, np.minimum(p[:, 1], b.npages), -1)
                marks[b.idstr] = np.cumsum(d[:-1]) > 0
            self.scans += 1
            if self.huge:
                exact = self._guest_log()  # after the scan: covers every write the scan saw
                for b in ram.blocks:
                    if b.backing == "hugetlb":
                        self.extra_pages += int(np.count_nonzero(marks[b.idstr] & ~exact[b.idstr]))
        else:
            marks = self._guest_log()
        with ram.dirty_lock:
            for b in ram.blocks:
                m = marks[b.idstr]
                self.dirty_pages += int(np.count_nonzero(m))
                ram.dirty_log[b.idstr].bits[m] = True

    def metrics(self) -> dict:
        return {"wp-tracking": self.mode, "wp-tracking-why": self.why, "wp-scans": self.scans,
                "wp-dirty-pages": self.dirty_pages, "wp-extra-bytes": self.extra_pages * C.TARGET_PAGE_SIZE}

    def close(self) -> None:
        if self.scanner is not None:
            self.scanner.close()
