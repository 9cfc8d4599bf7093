"""A guest in its own process: postcopy faults served through the kernel (userfaultfd).

Real processes: the destination worker spawns `ferry guest` (engine/guestproc.py),
receives its memfds and uffd over a Unix socket, and places pages with UFFDIO_COPY.
"""
import os
import threading

import numpy as np
import pytest

from ferry_migrate.channels import constants as C
from ferry_migrate.engine import uffd as U
from ferry_migrate.engine.guestlocal import GuestProcessConfig, run_guest_process_migration
from ferry_migrate.engine.guestproc import GuestLink, GuestSpec
from ferry_migrate.engine.uffd_dest import UffdFaultServer, UffdPlacer
from ferry_migrate.engine.postcopy import FaultHandler, ReceivedPages
from ferry_migrate.engine.ram import hugepage_status
from ferry_migrate.engine.workload import WorkloadConfig

REASON = U.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"userfaultfd unavailable: {REASON}")

PREEMPT = {"postcopy-ram": True, "postcopy-preempt": True}
# Switch early and slow the background pages, so the guest faults on pages not yet sent.
SLOW = {"postcopy-after-percent": 5, "max-postcopy-bandwidth": 16 << 20}


def check_migrated(src, dst, chk):
    assert src["status"] == "completed", src.get("error-desc")
    assert dst["status"] == "completed", dst.get("error-desc")
    assert src["digests"] == dst["digests"]
    # Every fault of the guest came through the kernel, each one became one request or a wake.
    assert dst["uffd-kernel-faults"] > 0
    assert dst["postcopy-faults"] == dst["uffd-kernel-faults"]
    assert dst["postcopy-requests"] > 0
    assert dst["uffd-copies"] > 0
    assert dst["uffd-eexist"] == 0 and dst["uffd-errors"] == [] and dst["uffd-fault-errors"] == []
    assert dst["postcopy-latency"]["count"] > 0
    # The guest's own check: every page it read first is the source's page.
    assert "error" not in chk, chk
    assert chk["pages-checked"] > 0
    assert chk["mismatches"] == 0, chk["first-mismatches"]


def test_guest_process_4k_postcopy_preempt():
    g = GuestProcessConfig(size=32 << 20)
    src, dst, chk = run_guest_process_migration(guest=g, caps=PREEMPT, params=SLOW, timeout=180)
    check_migrated(src, dst, chk)
    assert dst["channels"]["postcopy-1"]["pages-placed"] > 0
    assert dst["uffd-zeropages"] > 0  # the mixed fill has zero pages: ZEROPAGE on 4 KiB memory


HUGE = 2 << 20


def available_huge() -> int:
    """Free 2 MiB huge pages not promised to a mapping already (free - resv)."""
    d = "/sys/kernel/mm/hugepages/hugepages-2048kB"
    try:
        with open(f"{d}/free_hugepages") as f, open(f"{d}/resv_hugepages") as g:
            return int(f.read()) - int(g.read())
    except OSError:
        return 0


def run_on_huge_pages(*args, **kw):
    """run_guest_process_migration; skipped if other processes took the huge pages meanwhile."""
    try:
        return run_guest_process_migration(*args, **kw)
    except RuntimeError as e:
        if "HugePagesUnavailable" in str(e):
            pytest.skip(f"huge pages taken by other processes on this host: {e}")
        raise


@pytest.fixture
def reserved_huge_pages():
    """Reserve what the test needs (both sides' guests) and give it back after."""
    need = 2 * (16 << 20) // HUGE + 2  # both guests, and two spare
    path = "/proc/sys/vm/nr_hugepages"
    _, total = hugepage_status(HUGE)
    added = max(0, need - available_huge())
    try:
        if added:
            with open(path, "w") as f:
                f.write(str(total + added))
    except OSError as e:
        pytest.skip(f"cannot reserve 2 MiB huge pages: {e}")
    try:
        if available_huge() < need:
            pytest.skip(f"{need} huge pages of 2 MiB could not be reserved")
        yield
    finally:
        if added:
            _, total = hugepage_status(HUGE)
            with open(path, "w") as f:
                f.write(str(max(0, total - added)))


def test_guest_process_2m_hugetlb_postcopy_preempt(reserved_huge_pages):
    g = GuestProcessConfig(size=16 << 20, page_size=HUGE, backing="hugetlb", fill="pattern",
                           workload=WorkloadConfig(dirty_rate=8 << 20),
                           dest_workload=WorkloadConfig(threads=2, pattern="random", batch=1, dirty_rate=4 << 20))
    src, dst, chk = run_on_huge_pages(guest=g, caps=PREEMPT,
                                      params={"postcopy-after-percent": 5, "max-postcopy-bandwidth": 8 << 20},
                                      timeout=180)
    check_migrated(src, dst, chk)
    assert dst["uffd-zeropages"] == 0  # refused on hugetlb: zero huge pages are COPYs


def test_guest_process_dying_mid_migration_fails_it_by_name():
    g = GuestProcessConfig(size=32 << 20, kill_guest_after=0.2)
    src, dst, chk = run_guest_process_migration(guest=g, caps=PREEMPT,
                                                params={"postcopy-after-percent": 5,
                                                        "max-postcopy-bandwidth": 4 << 20}, timeout=20)
    # The source, paused for good (its guest may have run on the destination), waits out the
    # timeout: 20 s, not more, since nothing will end its wait. The destination worker
    # reported (it kept running); the migration failed naming the guest process.
    assert dst["status"] == "failed"
    assert "guest process" in dst["error-desc"] and "exited" in dst["error-desc"]
    assert dst["guest-alive"] is False
    assert src["status"] != "completed"
    assert "error" in chk  # nobody left to check


@pytest.fixture
def guest_link():
    link = GuestLink.spawn(GuestSpec(size=4 << 20, role="destination", workload={"threads": 0}))
    yield link
    link.close()


def test_fault_server_and_placer_bad_input(guest_link):
    """Bad fault addresses, duplicate faults and a second COPY: named, counted, never fatal."""
    link = guest_link
    blk = link.ram.blocks[0]
    received = ReceivedPages(link.ram)
    sent = []
    faults = FaultHandler(link.ram, received, lambda b, start, length: sent.append((b.idstr, start, length)))
    faults.enabled = True
    placer = UffdPlacer(link)
    received.placer = placer
    server = UffdFaultServer(link, faults, placer)

    def msgs(addrs):
        ev = np.zeros(len(addrs), U.UFFD_MSG_DTYPE)
        ev["event"] = U.UFFD_EVENT_PAGEFAULT
        ev["a1"] = addrs
        ev["a2"] = 4242
        return ev

    base = blk.guest_address
    outside = base + blk.length + (1 << 20)
    server.handle(msgs([outside, base + 5 * 4096 + 8, base + 5 * 4096]), 1.0)
    assert server.bad_faults == 1
    assert server.errors[0].startswith("UffdBadAddress") and f"0x{outside:x}" in server.errors[0]
    assert sent == [("pc.ram", 5 * 4096, 4096)]  # two faults on one page: one request

    data = np.full((1, C.TARGET_PAGE_SIZE), 7, np.uint8)
    assert received.place(blk, slice(5, 6), data) == 1
    assert placer.copies == 1 and blk.pages[5, 0] == 7  # the COPY went into the shared memfd
    assert faults.kernel_waiters == {} and faults.blocktime_by_thread  # the waiter's blocktime ended
    # A fault message read after the page was placed: a wake, no request.
    server.handle(msgs([base + 5 * 4096]), 2.0)
    assert server.wakes == 1 and len(sent) == 1

    # A second COPY to a placed page (bypassing the received bitmap): EEXIST, named, not fatal.
    placer.place(blk, slice(5, 6), np.full((1, C.TARGET_PAGE_SIZE), 9, np.uint8))
    assert placer.eexist == 1 and placer.errors[0].startswith("UffdPageExists")
    assert blk.pages[5, 0] == 9  # the data still reached memory

    # A discard punches the page out of the memfd for real; the next placement is a COPY again.
    received.discard(blk, 5 * 4096, 4096)
    assert os.lseek(blk.fd, 5 * 4096, os.SEEK_HOLE) == 5 * 4096  # (reading it would allocate it)
    assert received.place(blk, slice(5, 6), data) == 1
    assert placer.eexist == 1 and placer.copies == 2


def test_guest_thread_stays_blocked_without_a_page(guest_link):
    """A faulting guest thread is woken only by its page (never by a failed migration)."""
    link = guest_link
    blk = link.ram.blocks[0]
    received = ReceivedPages(link.ram)
    sent = threading.Event()
    faults = FaultHandler(link.ram, received, lambda *a: sent.set())
    faults.enabled = True
    placer = UffdPlacer(link)
    received.placer = placer
    server = UffdFaultServer(link, faults, placer)
    server.start()
    try:
        # Asked for the fingerprints of its memory, the guest reads every page: it faults on the first.
        done = threading.Event()
        out = {}

        def ask():
            out["r"] = link.call("fingerprints")
            done.set()

        t = threading.Thread(target=ask, daemon=True)
        t.start()
        assert sent.wait(60), "the guest's fault never became a request"
        faults.failed = "stream broke"  # the migration failing does not wake it
        assert not done.wait(0.5)
        # Place every page: the guest's read completes with what was placed.
        page = np.full((1, C.TARGET_PAGE_SIZE), 3, np.uint8)
        for p in range(blk.npages):
            received.place(blk, slice(p, p + 1), page)
        assert done.wait(60)
        fps = np.frombuffer(out["r"][1], np.uint64)
        assert len(fps) == blk.npages and len(set(fps.tolist())) == 1
    finally:
        server.stop()


def test_source_guest_process_tracked_with_async_write_protect_precopy():
    """Precopy only: the digests match only if every write of the source's guest process was tracked."""
    g = GuestProcessConfig(size=32 << 20, source_process=True,
                           workload=WorkloadConfig(threads=2, dirty_rate=16 << 20))
    src, dst, chk = run_guest_process_migration(guest=g, params={"max-bandwidth": 32 << 20}, warm=0.3,
                                                timeout=180)
    assert src["status"] == "completed", src.get("error-desc")
    assert dst["status"] == "completed", dst.get("error-desc")
    assert src["digests"] == dst["digests"]
    assert src["ram"]["dirty-sync-count"] >= 2
    assert src["wp-dirty-pages"] > 0
    if src["wp-tracking"] == "wp-async":
        assert src["wp-scans"] >= 2
    else:
        assert src["wp-tracking"] == "dirty-log" and src["wp-tracking-why"]
    assert dst["uffd-kernel-faults"] == 0 and chk["pages-checked"] == 0  # the guest never ran there


def test_source_and_destination_guest_processes_postcopy_preempt():
    g = GuestProcessConfig(size=32 << 20, source_process=True,
                           workload=WorkloadConfig(threads=2, dirty_rate=16 << 20))
    src, dst, chk = run_guest_process_migration(guest=g, caps=PREEMPT, params=SLOW, warm=0.3, timeout=180)
    check_migrated(src, dst, chk)
    assert src["wp-dirty-pages"] > 0


def test_hugetlb_write_protect_granularity_reported(reserved_huge_pages):
    g = GuestProcessConfig(size=16 << 20, page_size=HUGE, backing="hugetlb", fill="pattern", source_process=True,
                           workload=WorkloadConfig(threads=1, pattern="random", dirty_rate=4 << 20),
                           dest_workload=WorkloadConfig(threads=2, pattern="random", batch=1, dirty_rate=4 << 20))
    src, dst, chk = run_on_huge_pages(guest=g, caps=PREEMPT,
                                      params={"postcopy-after-percent": 5, "max-postcopy-bandwidth": 8 << 20},
                                      warm=0.3, timeout=180)
    check_migrated(src, dst, chk)
    if src["wp-tracking"] != "wp-async":
        pytest.skip(f"no async write-protect here: {src['wp-tracking-why']}")
    # Random 4 KiB writes into 2 MiB pages: the kernel reports whole huge pages.
    assert src["wp-extra-bytes"] > 0


def test_ferry_demo_guest_process_json():
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ferry_migrate.engine.cli", "demo", "--guest-process", "--size", "16M",
                        "--dirty-rate", "8M", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["verified"] and out["digests-equal"]
    assert out["guest-check"]["mismatches"] == 0
    assert out["source"]["wp-tracking"] in ("wp-async", "dirty-log")


def test_uffd_closed_under_ferry(guest_link):
    """The worker's uffd closed under it: placements and the fault thread fail by name, nothing hangs."""
    import errno

    link = guest_link
    blk = link.ram.blocks[0]
    received = ReceivedPages(link.ram)
    faults = FaultHandler(link.ram, received, lambda *a: None)
    placer = UffdPlacer(link)
    received.placer = placer
    server = UffdFaultServer(link, faults, placer)
    os.close(link.uffd.fd)
    link.uffd.closed = True  # (its number may be reused by the next open: nothing else must close it)
    with pytest.raises(U.UffdError) as ei:
        received.place(blk, slice(0, 1), np.zeros((1, C.TARGET_PAGE_SIZE), np.uint8))
    assert ei.value.errno == errno.EBADF and "UFFDIO_COPY" in str(ei.value)
    assert not received.bitmaps[blk.idstr].bits[0]  # not marked received
    server.start()
    server._thread.join(30)
    assert not server._thread.is_alive()
    assert server.errors and "reading the uffd" in server.errors[0]


def test_run_of_small_pages_with_one_already_there(guest_link):
    """One COPY for a run of 4 KiB pages; a page already there in its middle is named, the others placed."""
    link = guest_link
    blk = link.ram.blocks[0]
    received = ReceivedPages(link.ram)
    placer = UffdPlacer(link)
    received.placer = placer
    blk.pages[12, 0] = 1  # something mapped page 12 behind Ferry's back (through the worker's mapping)
    data = np.arange(16, dtype=np.uint8).repeat(C.TARGET_PAGE_SIZE).reshape(16, C.TARGET_PAGE_SIZE)
    assert received.place(blk, slice(8, 24), data) == 16
    assert placer.eexist == 1 and "offset 0xc000" in placer.errors[0]
    assert (blk.pages[8:24, 7] == np.arange(16)).all()  # every page holds its data, page 12 too
    assert placer.placed[blk.idstr][8:24].all()
    # Zero pages likewise: one ZEROPAGE for the run.
    blk.pages[40, 0] = 1
    received.place(blk, slice(32, 48), None)
    assert placer.eexist == 2 and not blk.pages[32:48].any()
