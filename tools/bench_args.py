"""Argument checks shared by the benchmark tools (bench_precopy, bench_postcopy, bench_preempt).

A bad value is refused before any run starts, with one argparse error line naming the
option and the value (exit status 2), never a traceback or a run that fails later.
"""
from __future__ import annotations

import argparse

from ferry_migrate.channels.constants import HOST_PAGE_SIZES
from ferry_migrate.engine.ram import parse_size


def size_type(text: str) -> int:
    """argparse ``type=`` for a byte count (``64M``, ``1G``, ``4096``): bytes, >= 0.

    Raises argparse.ArgumentTypeError (argparse prints "argument --X: ...")."""
    try:
        n = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected 0 or more bytes")
    return n


def size_arg(p: argparse.ArgumentParser, option: str, text: str, positive: bool = False) -> int:
    """``text`` of ``option`` as bytes; a bad value (or 0 with ``positive``) is ``p.error``."""
    try:
        n = size_type(text)
    except argparse.ArgumentTypeError as e:
        p.error(f"{option}: {e}")
    if positive and n <= 0:
        p.error(f"{option}: {text!r}; expected more than 0 bytes, e.g. 256M")
    return n


def page_sizes_arg(p: argparse.ArgumentParser, option: str, text: str) -> list[int]:
    """Comma list of host page sizes (4K, 2M, 1G) as bytes; anything else is ``p.error``."""
    out = []
    for s in (x.strip() for x in text.split(",")):
        if not s:
            continue
        n = size_arg(p, option, s)
        if n not in HOST_PAGE_SIZES:
            p.error(f"{option}: {s!r} is not a host page size; expected 4K, 2M or 1G")
        out.append(n)
    if not out:
        p.error(f"{option}: {text!r}; expected a comma list of 4K, 2M, 1G")
    return out


def positive_arg(p: argparse.ArgumentParser, option: str, value: float, unit: str = "seconds") -> float:
    """``value`` itself if it is more than 0; otherwise ``p.error`` naming ``option``."""
    if not value > 0:
        p.error(f"{option} {value:g}: expected more than 0 {unit}")
    return value
