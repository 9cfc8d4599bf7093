"""Page check values (capability page-checksums): what a page must be, and where.

A *check value* is 64 bits per target page:

    check = fingerprint(page bytes) XOR place(block idstr, page index)

``fingerprint`` is sum(word[i] * K[i]) mod 2^64 over the page's 512 64-bit
little-endian words, K[i] = (i * 0x9E3779B97F4A7C15) | 1 (odd, so a change of
any one word, or two words swapped, changes it; numpy computes it at about
10 GB/s). A zero page's fingerprint is 0. ``place`` is splitmix64 of the
block's key (the first 8 bytes, little-endian, of blake2b-64 of the idstr)
plus (page index + 1) * 0x9E3779B97F4A7C15: the same bytes at another offset
or in another block give another check value.

The source sends the values in a FERRY_PAGE_CHECKS record before the page
records they cover (channels/codec.py); the destination recomputes them from
what arrived and compares before it places anything (:func:`verify_run`).
Everything here works on whole runs with numpy: no per-page Python objects.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np

from . import constants as C
from .errors import PageIntegrityError, UnverifiedStreamError

WORDS = C.TARGET_PAGE_SIZE // 8
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_FP_K = (np.arange(WORDS, dtype=np.uint64) * _GOLDEN) | np.uint64(1)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def page_fingerprints(words: np.ndarray) -> np.ndarray:
    """Fingerprints of (n, 512) uint64 page words -> (n,) uint64 (one numpy pass).

    einsum, not ``words @ K``: the same sums mod 2^64, about 1.7x faster on
    contiguous pages (numpy's integer matmul has no BLAS behind it).
    """
    return np.einsum("ij,j->i", words, _FP_K)


def nonzero_from_fingerprints(words: np.ndarray, fps: np.ndarray) -> np.ndarray:
    """Which of (n, 512) page words are not all zero -> (n,) bool, given their fingerprints.

    A page whose fingerprint is not 0 is not a zero page, so only pages with
    fingerprint 0 (zero pages, or very rarely others) are scanned: one pass less.
    """
    nonzero = fps != 0
    maybe = np.flatnonzero(~nonzero)
    if len(maybe):
        nonzero[maybe] = words[maybe].any(axis=1)
    return nonzero


@functools.lru_cache(maxsize=1024)
def block_key(idstr: str) -> int:
    """64-bit key of a RAM block's idstr (blake2b-64, little-endian)."""
    return int.from_bytes(hashlib.blake2b(idstr.encode(), digest_size=8).digest(), "little")


def place_values(idstr: str, pages: np.ndarray) -> np.ndarray:
    """(n,) uint64 values of (block, target page index): splitmix64, in bulk."""
    z = np.asarray(pages).astype(np.uint64) + np.uint64(1)
    z *= _GOLDEN
    z += np.uint64(block_key(idstr))
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


_MASK = (1 << 64) - 1


def place_value(idstr: str, page: int) -> int:
    """:func:`place_values` of one page, in Python integers (for single pages: no numpy call)."""
    z = ((page + 1) * 0x9E3779B97F4A7C15 + block_key(idstr)) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def page_check(idstr: str, page: int, words: np.ndarray) -> int:
    """Check value of one target page (``words``: its 512 uint64; all zero for a zero page)."""
    return int(np.dot(words, _FP_K)) ^ place_value(idstr, page)


def check_values(idstr: str, pages: np.ndarray, words: np.ndarray | None) -> np.ndarray:
    """Check values of target ``pages`` of block ``idstr``.

    ``words``: (n, 512) uint64 page contents in the same order, or None for
    zero pages. Returns (n,) uint64.
    """
    v = place_values(idstr, pages)
    if words is not None:
        v ^= page_fingerprints(words)
    return v


class PageChecker:
    """Checks the RamRuns of one channel before they are placed.

    Page data in a reader's buffer sits at any byte alignment (records of 9
    and 4104 bytes, block names), and fingerprints of unaligned words cost
    about three times those of aligned ones. So the run's data is first
    copied into an aligned buffer of this checker's, checked there, and the
    run then points at that copy (``run.data``): what is placed is exactly
    what was checked, and the copy into guest RAM reads aligned memory.
    ``required`` (capability page-checksums): a run without check values is
    refused. One per channel (one thread each); the copy is valid until the
    next :meth:`check`.
    """

    def __init__(self, channel: str, required: bool = True):
        self.channel = channel
        self.required = required
        self._buf = np.empty((0, WORDS), np.uint64)

    def check(self, run) -> None:
        """Raise PageIntegrityError (or UnverifiedStreamError) for ``run``; nothing of it may be placed then."""
        expected = run.checks
        if expected is None:
            if self.required:
                off = int(run.pages[0]) << C.TARGET_PAGE_BITS
                raise UnverifiedStreamError(
                    f"channel {self.channel}: page record at offset 0x{off:x} of block {run.block.idstr!r} is "
                    "not covered by a FERRY_PAGE_CHECKS record, and page-checksums is on; page not placed "
                    "(a QEMU source sends none: turn page-checksums off on this side)")
            return
        words = None
        if run.data is not None:
            n = len(run.pages)
            if len(self._buf) < n:
                self._buf = np.empty((max(n, 2 * len(self._buf)), WORDS), np.uint64)
            words = self._buf[:n]
            np.copyto(words.view(np.uint8), run.data)
            run.data = words.view(np.uint8)
        actual = check_values(run.block.idstr, run.pages, words)
        bad = np.flatnonzero(actual != expected)
        if len(bad):
            i = int(bad[0])
            raise PageIntegrityError(self.channel, run.block.idstr, int(run.pages[i]) << C.TARGET_PAGE_BITS,
                                     int(expected[i]), int(actual[i]), len(bad))


def verify_run(run, channel: str, required: bool = True) -> None:
    """Check one run with a one-off :class:`PageChecker` (tests, tools)."""
    PageChecker(channel, required).check(run)
