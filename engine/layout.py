"""RAM layouts: a destination that takes the source's RAM blocks, or checks its own.

A destination started with a fixed guest has its blocks already; MEM_SIZE is
checked against them (channels/codec.py). A destination started *without* one
takes the blocks that MEM_SIZE announces (every idstr, used length, host page
size) once the list arrived, within limits the user sets: total bytes and
block count. QEMU guests have several blocks (``pc.ram``, ``pc.bios``,
``/rom@etc/acpi/tables``...), all of them in the ``ram`` section.

The host page size of a block is on the wire only with postcopy and only when
it differs from 4 KiB (QEMU 7.2 ram.c ram_save_setup); otherwise it is 4 KiB.
Huge-page backing is chosen per block: ``hugetlb`` backs only blocks with 2M or
1G pages, the others are anonymous memory.
"""
from __future__ import annotations

from dataclasses import dataclass

from ferry_migrate.channels import constants as C
from ferry_migrate.channels.errors import LayoutError

from .ram import BACKINGS, GuestRAM, RAMBlock, format_size

DEFAULT_MAX_TOTAL = 64 << 30  # bytes
DEFAULT_MAX_BLOCKS = 256


@dataclass(frozen=True)
class LayoutLimits:
    """What a destination without a fixed guest accepts from MEM_SIZE.

    ``max_total``: bytes over all blocks; ``max_blocks``: block count;
    ``backing``: memory of the blocks (anon, memfd, or hugetlb for huge-page
    blocks); ``prealloc``: back every block at once (QEMU's -mem-prealloc);
    ``machine_types``: machine types a CONFIGURATION may name (empty: any).
    """

    max_total: int = DEFAULT_MAX_TOTAL
    max_blocks: int = DEFAULT_MAX_BLOCKS
    backing: str = "anon"
    prealloc: bool = False
    machine_types: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_total <= 0 or self.max_blocks <= 0:
            raise ValueError(f"layout limits: max_total {self.max_total} and max_blocks {self.max_blocks} "
                             "must be positive")
        if self.backing not in BACKINGS:
            raise ValueError(f"layout limits: backing {self.backing!r}, expected one of {', '.join(BACKINGS)}")


def check_layout(blocks, limits: LayoutLimits) -> list[tuple[str, int, int]]:
    """Validate a MEM_SIZE block list; returns (idstr, length, page size) with sizes filled in.

    ``blocks``: (idstr, used length in bytes, page size or None) as the
    decoder's RamBlockList gives them. Raises LayoutError naming the block and
    the value: too many blocks, total over the limit, a length that is not a
    positive multiple of the block's page size, an unknown page size.
    """
    if len(blocks) > limits.max_blocks:
        raise LayoutError(f"MEM_SIZE: {len(blocks)} RAM blocks, this destination accepts at most "
                          f"{limits.max_blocks}")
    total = sum(b[1] for b in blocks)
    if total > limits.max_total:
        raise LayoutError(f"MEM_SIZE: RAM blocks total {format_size(total)} ({total} bytes), this destination "
                          f"accepts at most {format_size(limits.max_total)}")
    out = []
    for name, length, psize in blocks:
        psize = psize or C.PAGE_SIZE_4K
        if psize not in C.HOST_PAGE_SIZES:
            raise LayoutError(f"MEM_SIZE: RAM block {name!r}: page size 0x{psize:x} not one of 4K, 2M, 1G")
        if length <= 0 or length % psize:
            raise LayoutError(f"MEM_SIZE: RAM block {name!r}: length 0x{length:x} is not a positive multiple of "
                              f"its page size 0x{psize:x}")
        out.append((name, length, psize))
    return out


def ram_from_layout(blocks, limits: LayoutLimits) -> GuestRAM:
    """A GuestRAM with exactly the blocks MEM_SIZE announced (checked by :func:`check_layout`).

    Block indexes follow the announced order, as the decoder numbers them.
    Raises LayoutError, or HugePagesUnavailable when hugetlb pages are short.
    """
    made = []
    try:
        for i, (name, length, psize) in enumerate(check_layout(blocks, limits)):
            backing = limits.backing
            if backing == "hugetlb" and psize == C.PAGE_SIZE_4K:
                backing = "anon"
            made.append(RAMBlock(name, length, psize, backing, i, limits.prealloc))
    except BaseException:
        for b in made:
            b.close()
        raise
    return GuestRAM(made)


def check_machine_type(name: str, limits: LayoutLimits) -> None:
    """LayoutError when a CONFIGURATION names a machine type the user did not allow."""
    if limits.machine_types and name not in limits.machine_types:
        raise LayoutError(f"CONFIGURATION: machine type {name!r} not allowed here "
                          f"(allowed: {', '.join(limits.machine_types)})")


def page_size_summary(blocks) -> int:
    """OR of the blocks' page sizes, as POSTCOPY_ADVISE carries it (savevm.c)."""
    s = 0
    for b in blocks:
        s |= b[2] if isinstance(b, tuple) else b.page_size
    return s
