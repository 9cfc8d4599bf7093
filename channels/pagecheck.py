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
    """Fingerprints of (n, 512) uint64 page words -> (n,) uint64 (one numpy pass)."""
    return words @ _FP_K


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


def check_values(idstr: str, pages: np.ndarray, words: np.ndarray | None) -> np.ndarray:
    """Check values of target ``pages`` of block ``idstr``.

    ``words``: (n, 512) uint64 page contents in the same order, or None for
    zero pages. Returns (n,) uint64.
    """
    v = place_values(idstr, pages)
    if words is not None:
        v ^= page_fingerprints(words)
    return v


def run_words(data: np.ndarray) -> np.ndarray:
    """(n, 512) uint64 view of (n, 4096) uint8 page data (a decoder's view into its buffer)."""
    return data.view(np.uint64)


def verify_run(run, channel: str, required: bool = True) -> None:
    """Check a decoded RamRun against the check values the stream carried, before placing it.

    Raises :class:`PageIntegrityError` naming channel, block, offset, expected
    and actual value of the first bad page; :class:`UnverifiedStreamError`
    when ``required`` and the run came without check values.
    """
    expected = run.checks
    if expected is None:
        if required:
            off = int(run.pages[0]) << C.TARGET_PAGE_BITS
            raise UnverifiedStreamError(
                f"channel {channel}: page record at offset 0x{off:x} of block {run.block.idstr!r} is not "
                "covered by a FERRY_PAGE_CHECKS record, and page-checksums is on; page not placed "
                "(a QEMU source sends none: turn page-checksums off on this side)")
        return
    words = None if run.data is None else run_words(run.data)
    actual = check_values(run.block.idstr, run.pages, words)
    bad = np.flatnonzero(actual != expected)
    if len(bad):
        i = int(bad[0])
        raise PageIntegrityError(channel, run.block.idstr, int(run.pages[i]) << C.TARGET_PAGE_BITS,
                                 int(expected[i]), int(actual[i]), len(bad))
