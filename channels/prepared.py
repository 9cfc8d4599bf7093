"""A range of target pages prepared once and sent in slices: interruptible huge pages.

With postcopy-preempt the source sends a huge page on the PRECOPY channel in
chunks and looks at the request queue between them (engine/send_loop.py), so a
request waits behind at most one chunk. Preparing each chunk on its own (zero
detection, fingerprints and check values, record headers, an iovec) costs a
fixed few tens of microseconds of numpy calls per chunk: at 16 target pages a
chunk that was about five times the CPU of sending the same huge page whole.
:class:`PreparedRange` does that work once for the whole range, in bulk, and
:meth:`PreparedRange.send` then only slices it: a FERRY_PAGE_CHECKS record
(page-checksums) and an iovec view per run of the slice.

The bytes on the wire are exactly what RamSendChannel.send_range(block, i, j,
ordered=True) would send for each slice: records in page order, a
FERRY_PAGE_CHECKS record before each run of records of one kind, the first
record on the channel for a block naming it. Only for a stopped guest (the
source in postcopy): the pages must not change between preparation and send.
"""
from __future__ import annotations

import numpy as np

from . import codec
from . import constants as C
from .iovec import IOVEC
from .pagecheck import nonzero_from_fingerprints, page_fingerprints, place_values

PAGE = C.TARGET_PAGE_SIZE


class PreparedRange:
    """Target pages [p0, p1) of ``block`` on channel ``ch`` (a RamSendChannel), ready to send in slices.

    Shapes: one bool and (with page-checksums) one uint64 per target page,
    big-endian record headers and a 2-entry iovec per page; about 40 bytes
    per target page (20 KiB for a 2 MiB page, 10 MiB for a 1 GiB page).
    ``p1 - p0`` is at most what one host page holds. Raises ValueError for an
    empty or out-of-block range.
    """

    __slots__ = ("ch", "block", "p0", "p1", "nonzero", "checks", "hdr", "iov", "cuts")

    def __init__(self, ch, block, p0: int, p1: int):
        if not 0 <= p0 < p1 <= block.npages:
            raise ValueError(f"prepared range [{p0}, {p1}) of block {block.idstr!r} ({block.npages} target pages)")
        self.ch, self.block, self.p0, self.p1 = ch, block, p0, p1
        words = block.words[p0:p1]
        if ch.page_checks:
            fps = page_fingerprints(words)
            nonzero = nonzero_from_fingerprints(words, fps)
            self.checks = fps ^ place_values(block.idstr, np.arange(p0, p1))
        else:
            nonzero = words.any(axis=1)
            self.checks = None
        self.nonzero = nonzero
        n = p1 - p0
        pages = np.arange(p0, p1, dtype=np.uint64)
        self.hdr = codec.page_run_headers(pages, C.RAM_SAVE_FLAG_PAGE)
        iov = np.empty(2 * n, IOVEC)
        iov["base"][0::2] = np.uint64(self.hdr.ctypes.data) + np.arange(n, dtype=np.uint64) * np.uint64(8)
        iov["len"][0::2] = 8
        iov["base"][1::2] = np.uint64(block.address) + pages * np.uint64(PAGE)
        iov["len"][1::2] = PAGE
        self.iov = iov
        # Local offsets where a run of one kind (data or zero pages) ends.
        self.cuts = np.append(np.flatnonzero(nonzero[1:] != nonzero[:-1]) + 1, n)

    def send(self, a: int, b: int, flush: bool = True) -> tuple[int, int]:
        """Queue target pages [a, b) (block page indices, inside the range) on the channel.

        Flushes when the writer holds its flush size, unless ``flush`` is False
        (the caller then sends them, e.g. with QEMUFileWriter.flush_pieces).
        Returns (normal, zero) page counts.
        """
        if not self.p0 <= a < b <= self.p1:
            raise ValueError(f"slice [{a}, {b}) outside prepared range [{self.p0}, {self.p1})")
        ch, blk, w = self.ch, self.block, self.ch.writer
        i, j = a - self.p0, b - self.p0
        normal = 0
        k = int(np.searchsorted(self.cuts, i, side="right"))
        while i < j:
            e = min(j, int(self.cuts[k]))
            data = bool(self.nonzero[i])
            if self.checks is not None:
                w.put_bytes(codec.encode_page_checks(self.checks[i:e]))
            s = i
            if ch.last_sent_block != blk.idstr:
                # The first record on this channel for this block names it.
                p = self.p0 + i
                if data:
                    w.put_bytes(codec.encode_page_header(p << C.TARGET_PAGE_BITS, C.RAM_SAVE_FLAG_PAGE, blk.idstr))
                    w.put_bytes(blk.view[p * PAGE:(p + 1) * PAGE])
                else:
                    w.put_bytes(codec.encode_zero_page(p << C.TARGET_PAGE_BITS, blk.idstr))
                ch.last_sent_block = blk.idstr
                s += 1
            if s < e:
                if data:
                    w.put_iovec(self.iov[2 * s:2 * e], (e - s) * codec.PAGE_RECORD, keep=(self.hdr, blk), flush=flush)
                else:
                    w.put_bytes(codec.zero_run_records(np.arange(self.p0 + s, self.p0 + e)))
            if data:
                normal += e - i
            i = e
            k += 1
        zero = (b - a) - normal
        ch.normal_pages += normal
        ch.zero_pages += zero
        if flush and w.pending() >= w.auto_flush:
            w.flush()
        return normal, zero
