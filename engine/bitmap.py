"""Page bitmaps: one byte per target page, a bytearray with a numpy view.

The bytearray gives memchr-speed "next set/clear bit" scans (``find``); the
numpy view gives bulk set/clear/or/count. Never a set of ints.
"""
from __future__ import annotations

import numpy as np


class PageBitmap:
    """A bitmap over the target pages of one RAM block."""

    __slots__ = ("raw", "bits", "npages")

    def __init__(self, npages: int, fill: bool = False):
        self.npages = npages
        self.raw = bytearray(b"\x01" * npages if fill else npages)
        self.bits = np.frombuffer(self.raw, dtype=np.bool_)

    def next_set(self, start: int, end: int | None = None) -> int:
        """First set page in [start, end), or ``end`` if none."""
        end = self.npages if end is None else end
        i = self.raw.find(1, start, end)
        return end if i < 0 else i

    def next_clear(self, start: int, end: int | None = None) -> int:
        """First clear page in [start, end), or ``end`` if none."""
        end = self.npages if end is None else end
        i = self.raw.find(0, start, end)
        return end if i < 0 else i

    def count(self) -> int:
        return int(np.count_nonzero(self.bits))

    def set_all(self) -> None:
        self.bits[:] = True

    def clear_all(self) -> None:
        self.bits[:] = False

    def __getitem__(self, i: int) -> bool:
        return bool(self.raw[i])
