"""`ferry worker --guest process` between real worker processes on loopback.

Each worker's guest is a `ferry guest` process: the destination worker gets
its memfds and uffd over a Unix socket and every postcopy fault of the guest is
a kernel fault it serves with UFFDIO_COPY; the source worker tracks the guest's
writes with write-protect. Assertions: the kernel's fault count, the guest's
own fingerprint check (x-guest-check), digests, roles after the migration,
and what bad input (a guest process that dies, a uffd closed under Ferry, a
fault outside every block, a page already there) leaves of both workers.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from ferry_migrate.engine import uffd as U
from ferry_migrate.engine.control.client import CommandFailed, ControlClient
from ferry_migrate.engine.control.driver import run_migration
from ferry_migrate.engine.control.spawn import spawn_worker
from ferry_migrate.engine.process_guest import guest_check

from .conftest import group_gone
from .test_guestproc import reserved_huge_pages  # noqa: F401 - a fixture

REASON = U.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"userfaultfd unavailable: {REASON}")

GUEST = ["--guest", "process", "--size", "32M", "--dirty-rate", "8M"]
# The destination's guest: two threads touching one random page at a time, as vCPUs fault.
DEST = ["--workload-threads", "2", "--workload-pattern", "random", "--workload-batch", "1"]
PREEMPT = {"postcopy-ram": True, "postcopy-preempt": True}
# Switch early and slow the background pages: the guest faults on pages not yet sent.
SLOW = {"postcopy-after-percent": 5, "max-postcopy-bandwidth": 8 << 20}


@pytest.fixture
def spawn(tmp_path):
    """spawn(role, options, env=None) -> a ready worker in its own process group; all cleaned up."""
    started = []

    def _spawn(role, options=(), env=None, guest=GUEST):
        n = len(started)
        e = dict(os.environ)
        e.update(env or {})
        w = spawn_worker(role, f"ipc://{tmp_path}/{role[0]}{n}.ctl", [*guest, *options],
                         log_path=str(tmp_path / f"{role}{n}.log"), new_session=True, env=e)
        started.append(w)
        w.wait_ready(120)
        return w

    yield _spawn
    for w in started:
        if w.alive():
            w.stop()
        # The guest processes are in the worker's group: none may be left.
        deadline = time.monotonic() + 15
        while not group_gone(w.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not group_gone(w.pid):
            os.killpg(w.pid, signal.SIGKILL)
            pytest.fail(f"{w.role} worker group {w.pid} still had processes (a guest process left behind?)")


async def _until(c: ControlClient, want, timeout: float = 120) -> dict:
    want = (want,) if isinstance(want, str) else want
    deadline = time.monotonic() + timeout
    while True:
        q = await c.call("query-migrate")
        if q["status"] in want:
            return q
        assert time.monotonic() < deadline, f"never reached {want}: {q['status']} {q.get('error-desc')}"
        await asyncio.sleep(0.05)


def check_kernel_faults(dq: dict) -> None:
    """Every fault of the destination's guest came through the kernel and was served."""
    assert dq["guest"] == "process" and dq["guest-alive"]
    assert dq["uffd-kernel-faults"] > 0
    assert dq["postcopy-faults"] == dq["uffd-kernel-faults"]
    assert dq["postcopy-requests"] > 0 and dq["uffd-copies"] > 0
    assert dq["uffd-eexist"] == 0 and dq["uffd-errors"] == [] and dq["uffd-fault-errors"] == []


async def role_is(c: ControlClient, role: str, timeout: float = 30) -> None:
    """The roles swap just after the status says completed (the guest process turns source)."""
    deadline = time.monotonic() + timeout
    while (await c.call("query-status"))["role"] != role:
        assert time.monotonic() < deadline, f"the worker never became a {role}"
        await asyncio.sleep(0.05)


async def check_guest(s: ControlClient, d: ControlClient) -> dict:
    chk = await guest_check(s, d)
    assert chk["pages-checked"] > 0
    assert chk["mismatches"] == 0, chk["first-mismatches"]
    return chk


async def test_guest_process_workers_postcopy_preempt_4k(spawn):
    src, dst = spawn("source", ["--blocks", "2"]), spawn("destination", [*DEST, "--blocks", "2"])
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        st = await d.call("query-status")
        assert st["guest"]["guest"] == "process" and st["guest"]["guest-pid"] and len(st["guest"]["blocks"]) == 2
        assert "guest process" in st["guest"]["description"]
        out = await run_migration(s, d, caps=PREEMPT, params=SLOW, timeout=240)
        assert out.verified, (out.source.get("error-desc"), out.destination.get("error-desc"))
        check_kernel_faults(out.destination)
        assert out.destination["channels"]["postcopy-1"]["pages-placed"] > 0
        assert out.source["wp-tracking"] in ("wp-async", "dirty-log") and out.source["wp-dirty-pages"] > 0
        whole = await check_guest(s, d)
        # In chunks that straddle the blocks: the same answer (the guest runs on: it may have read more).
        chunked = await guest_check(s, d, chunk=3000)
        assert chunked["mismatches"] == 0 and chunked["pages-checked"] >= whole["pages-checked"]
        # The roles swapped: the destination's guest process now runs the guest as a source.
        await role_is(d, "source")
        await role_is(s, "destination")


async def test_guest_process_migrates_back_and_forth(spawn):
    a, b = spawn("source"), spawn("destination", DEST)
    async with ControlClient(a.control) as ca, ControlClient(b.control) as cb:
        pids = []
        for src, dst in ((ca, cb), (cb, ca), (ca, cb)):
            out = await run_migration(src, dst, caps=PREEMPT, params=SLOW, timeout=240)
            assert out.verified, (out.source.get("error-desc"), out.destination.get("error-desc"))
            check_kernel_faults(out.destination)
            await check_guest(src, dst)
            await role_is(dst, "source")
            await role_is(src, "destination")
            pids.append(out.destination["guest-pid"])
            # Whichever guest process sends the guest, its writes are tracked with write-protect
            # (after the first migration: one that was a destination and turned source).
            assert out.source["wp-tracking"] == "wp-async" and out.source["wp-dirty-pages"] > 0
            # The guest process that received the guest is the one that sends it on.
            assert (await dst.call("query-status"))["guest"]["guest-pid"] == out.destination["guest-pid"]
        # Each incoming migration got a guest process that held nothing yet.
        assert len(set(pids)) == 3


async def test_guest_process_workers_postcopy_preempt_2m(spawn, reserved_huge_pages):
    g = ["--guest", "process", "--size", "16M", "--page-size", "2M", "--backing", "hugetlb", "--fill", "pattern",
         "--dirty-rate", "4M"]
    try:
        src, dst = spawn("source", guest=g), spawn("destination", DEST, guest=g)
    except Exception as e:  # noqa: BLE001 - other processes on this host may have taken the pages
        if "HugePages" in str(e) or "huge pages" in str(e):
            pytest.skip(f"huge pages taken by other processes on this host: {e}")
        raise
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        out = await run_migration(s, d, caps=PREEMPT,
                                  params={"postcopy-after-percent": 5, "max-postcopy-bandwidth": 8 << 20},
                                  timeout=240)
        assert out.verified, (out.source.get("error-desc"), out.destination.get("error-desc"))
        check_kernel_faults(out.destination)
        assert out.destination["uffd-zeropages"] == 0  # refused on hugetlb: zero huge pages are COPYs
        await check_guest(s, d)


def thread_waits(pid: int) -> list[str]:
    """Where each thread of ``pid`` sleeps in the kernel (/proc/PID/task/TID/wchan)."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                out.append(f.read().strip())
        except OSError:
            pass
    return out


async def test_pause_and_recovery_with_the_guest_blocked_in_the_kernel(spawn):
    src, dst = spawn("source"), spawn("destination", DEST)
    params = {"postcopy-after-percent": 5, "max-postcopy-bandwidth": 1 << 20}
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        first = asyncio.ensure_future(run_migration(s, d, caps=PREEMPT, params=params, timeout=240))
        await _until(s, "postcopy-active")
        await _until(d, "postcopy-active")
        # Wait until the guest has faulted through the kernel at least once, then cut.
        deadline = time.monotonic() + 60
        while (await d.call("query-migrate")).get("uffd-kernel-faults", 0) == 0:
            assert time.monotonic() < deadline, "the guest never faulted"
            await asyncio.sleep(0.05)
        assert await s.call("migrate-pause") == {}
        out = await first
        assert out.paused and not out.completed
        # While paused, guest threads fault and stay stopped in the kernel: faults come, nothing is woken.
        q0 = await d.call("query-migrate")
        await asyncio.sleep(1.0)
        q1 = await d.call("query-migrate")
        assert q1["status"] == "postcopy-paused" and q1["guest-alive"]
        assert q1["uffd-copies"] == q0["uffd-copies"]  # nothing placed while paused
        assert q1["uffd-kernel-faults"] > 0
        # The kernel says where the guest's threads wait: in the userfaultfd fault handler.
        assert "handle_userfault" in thread_waits(q1["guest-pid"]), thread_waits(q1["guest-pid"])
        prog0 = (await d.call("query-guest-progress"))["pages_touched"]
        await asyncio.sleep(1.0)
        prog1 = (await d.call("query-guest-progress"))["pages_touched"]
        assert prog1 == prog0, "guest threads made progress while the migration was paused"
        st = await d.call("query-status")
        assert st["status"] == "paused" and "waiting for pages" in st["reason"]
        out = await run_migration(s, d, resume=True, timeout=240)
        assert out.verified, (out.source.get("error-desc"), out.destination.get("error-desc"))
        assert out.destination["postcopy-recoveries"] == 1
        check_kernel_faults(out.destination)
        await check_guest(s, d)
        # The threads stopped during the pause were woken by pages after the recovery: the guest runs on.
        prog2 = (await d.call("query-guest-progress"))["pages_touched"]
        assert prog2 > prog1


# --- bad input -------------------------------------------------------------------------------

async def _source_fingerprints(s: ControlClient) -> bytes:
    return (await s.call("x-query-guest-fingerprints"))["fingerprints"]


# Slow background pages: the postcopy phase lasts while a test breaks something.
SLOWER = {"postcopy-after-percent": 5, "max-postcopy-bandwidth": 1 << 20}


async def _in_postcopy(s: ControlClient, d: ControlClient, dest_states=("postcopy-active",)):
    """Start a migration; once in postcopy, return (its task, the source's memory: stopped from the switch on)."""
    task = asyncio.ensure_future(run_migration(s, d, caps=PREEMPT, params=SLOWER, timeout=240))
    await _until(s, ("postcopy-active", "postcopy-paused", "failed"))
    await _until(d, dest_states)
    return task, await _source_fingerprints(s)


async def test_destination_guest_process_dies_mid_migration(spawn):
    src, dst = spawn("source"), spawn("destination", DEST)
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        task, before = await _in_postcopy(s, d)
        pid = (await d.call("query-status"))["guest"]["guest-pid"]
        os.kill(pid, signal.SIGKILL)
        dq = await _until(d, ("failed",), timeout=120)
        assert "guest process" in dq["error-desc"] and str(pid) in dq["error-desc"], dq["error-desc"]
        assert dq["guest-alive"] is False
        out = await task
        assert not out.completed
        # The destination worker keeps running; the source keeps the guest's memory, unchanged.
        assert (await d.call("query-status"))["role"] == "destination"
        sq = await s.call("query-migrate")
        assert sq["status"] != "completed"
        assert await _source_fingerprints(s) == before
        # The destination can receive again: a new guest process for the next incoming migration.
        r = await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        assert r["uri"]
        assert (await d.call("query-status"))["guest"]["guest-pid"] != pid
        await d.call("migrate-cancel")


async def test_uffd_closed_under_ferry(spawn):
    src = spawn("source")
    dst = spawn("destination", DEST, env={"FERRY_GUEST_FAULT": "close-uffd"})
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        task, before = await _in_postcopy(s, d, ("postcopy-paused", "failed"))
        dq = await d.call("query-migrate")
        assert "UFFDIO_COPY" in dq["error-desc"] or "uffd" in dq["error-desc"], dq["error-desc"]
        out = await task
        assert not out.completed
        dq = await d.call("query-migrate")
        assert any("reading the uffd" in e for e in dq["uffd-fault-errors"]), dq["uffd-fault-errors"]
        assert (await d.call("query-status"))["role"] == "destination"  # the worker keeps running
        assert (await s.call("query-migrate"))["status"] != "completed"
        assert await _source_fingerprints(s) == before


async def test_fault_outside_every_block_is_named_and_the_migration_goes_on(spawn):
    src = spawn("source")
    dst = spawn("destination", DEST, env={"FERRY_GUEST_FAULT": "stray-fault"})
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        out = await run_migration(s, d, caps=PREEMPT, params=SLOW, timeout=240)
        assert out.verified, (out.source.get("error-desc"), out.destination.get("error-desc"))
        dq = out.destination
        assert dq["uffd-bad-faults"] == 1
        assert dq["uffd-fault-errors"][0].startswith("UffdBadAddress"), dq["uffd-fault-errors"]
        assert "outside every block" in dq["uffd-fault-errors"][0]
        await check_guest(s, d)


async def test_page_already_there_is_eexist_handled(spawn):
    # An idle destination guest: the page allocated behind Ferry's back is never read before its placement.
    src = spawn("source")
    dst = spawn("destination", ["--workload-threads", "0"], env={"FERRY_GUEST_FAULT": "allocate-last-page"})
    params = {"postcopy-after-percent": 5, "max-postcopy-bandwidth": 4 << 20}
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        out = await run_migration(s, d, caps=PREEMPT, params=params, timeout=240)
        assert out.verified, (out.source.get("error-desc"), out.destination.get("error-desc"))
        dq = out.destination
        assert dq["uffd-eexist"] == 1, dq["uffd-errors"]
        assert dq["uffd-errors"][0].startswith("UffdPageExists") and "already there" in dq["uffd-errors"][0]
        # The page holds the source's data (the digests matched) and the worker goes on.
        await role_is(d, "source")


async def test_in_process_destination_refuses_the_guest_check(spawn):
    src = spawn("source")
    dst = spawn("destination", guest=["--size", "32M", "--dirty-rate", "8M"])
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        with pytest.raises(CommandFailed, match="--guest process"):
            await d.call("x-guest-check", {"fingerprints": b"\0" * 8})
        with pytest.raises(CommandFailed, match="guest has"):
            await s.call("x-query-guest-fingerprints", {"start": 1 << 30})


def test_ram_fingerprints_ranges_across_blocks():
    import numpy as np

    from ferry_migrate.engine.process_guest import ram_fingerprints
    from ferry_migrate.engine.ram import GuestRAM

    ram = GuestRAM.create(8 << 20, nblocks=2)
    try:
        ram.fill("random")
        every = np.frombuffer(ram_fingerprints(ram), "<u8")
        assert len(every) == ram.npages == 2048
        assert (every[:1024] == ram.blocks[0].fingerprints()).all()
        assert (every[1024:] == ram.blocks[1].fingerprints()).all()
        for start, count in ((0, 5), (1020, 10), (1024, 1024), (2047, 1), (2048, 0)):
            got = np.frombuffer(ram_fingerprints(ram, start, count), "<u8")
            assert (got == every[start:start + count]).all()
        with pytest.raises(ValueError, match="the guest has 2048 pages"):
            ram_fingerprints(ram, 2000, 100)
    finally:
        ram.close()


async def test_source_guest_process_dies_mid_precopy(spawn):
    src, dst = spawn("source"), spawn("destination", DEST)
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        await s.call("migrate-set-parameters", {"max-bandwidth": 4 << 20})  # precopy lasts (a pass: 8 s)
        task = asyncio.ensure_future(run_migration(s, d, timeout=240))
        await _until(s, "active")
        pid = (await s.call("query-status"))["guest"]["guest-pid"]
        os.kill(pid, signal.SIGKILL)
        sq = await _until(s, ("failed",), timeout=120)
        assert "guest process" in sq["error-desc"] and str(pid) in sq["error-desc"], sq["error-desc"]
        out = await task
        assert not out.completed
        # Both workers keep running; the source's worker still maps the guest's memory.
        assert (await s.call("query-status"))["role"] == "source"
        assert len((await s.call("x-query-guest-fingerprints"))["fingerprints"]) == (32 << 20) // 4096 * 8
        assert (await d.call("query-migrate"))["status"] in ("failed", "cancelled")
