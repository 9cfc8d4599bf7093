"""Guests of 1 GiB host pages: precopy, and postcopy with preemption on 1 and 2 POSTCOPY
channels, two worker processes on loopback, digests equal.

A block's host page size is its migration granularity whatever backs it (engine/ram.py), so
the 2 GiB guests of 1 GiB pages on ordinary memory run anywhere. The runs on real 1 GiB huge
pages (hugetlb) reserve them for the test and give them back, and skip, naming the 1 GiB
huge pages, when the kernel cannot reserve them (tests/conftest.py CI_ALLOWED_SKIPS).
"""
import pytest

from ferry_migrate.engine.local import GuestConfig, run_local_migration
from ferry_migrate.engine.workload import WorkloadConfig


GIB = 1 << 30
PREEMPT = {"postcopy-ram": True, "postcopy-preempt": True}


def guest(size: int = 2 * GIB, backing: str = "anon") -> GuestConfig:
    # The destination's guest touches random pages: it faults on the page not yet received.
    return GuestConfig(size=size, page_size=GIB, backing=backing, fill="pattern", workload=None,
                       dest_workload=WorkloadConfig(threads=1, pattern="random", batch=1, dirty_rate=64 * 4096))


def check(src, dst):
    assert src["status"] == "completed", src.get("error-desc")
    assert dst["status"] == "completed", dst.get("error-desc")
    assert src["digests"] == dst["digests"]


def test_2g_guest_on_1g_pages_precopy():
    src, dst = run_local_migration("tcp:127.0.0.1:0", guest(), timeout=300)
    check(src, dst)
    assert src["ram"]["transferred"] >= 2 * GIB


@pytest.mark.parametrize("channels", [1, 2])
def test_2g_guest_on_1g_pages_postcopy_preempt(channels):
    src, dst = run_local_migration("tcp:127.0.0.1:0", guest(), caps=PREEMPT,
                                   params={"postcopy-after-percent": 1, "postcopy-channels": channels},
                                   timeout=300)
    check(src, dst)
    # The first page went in precopy (a host page is never split there), the second after the switch.
    assert src["postcopy-bytes"] >= GIB
    # Placed after LISTEN, on whichever channel carried it: one whole 1 GiB page, 262144 target pages.
    placed = sum(c.get("pages-placed", c.get("postcopy-pages-placed", 0)) for c in dst["channels"].values())
    assert placed == GIB // 4096


def test_1g_guest_on_real_1g_huge_pages_precopy(huge_1g):
    huge_1g(2)  # one for each side
    src, dst = run_local_migration("tcp:127.0.0.1:0", guest(GIB, "hugetlb"), timeout=300)
    check(src, dst)


def test_2g_guest_on_real_1g_huge_pages_postcopy_preempt(huge_1g):
    huge_1g(4)  # two for each side
    src, dst = run_local_migration("tcp:127.0.0.1:0", guest(2 * GIB, "hugetlb"), caps=PREEMPT,
                                   params={"postcopy-after-percent": 1, "postcopy-channels": 2}, timeout=300)
    check(src, dst)
    assert src["postcopy-bytes"] >= GIB
