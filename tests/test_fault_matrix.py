"""The fault matrix of docs/reliability.md, between real `ferry worker` processes.

Every case runs a real source and destination worker (their own process groups,
loopback only), puts the fault relay of tests/faultrelay.py between them or
signals a worker, and asserts on BOTH workers' states (``query-migrate``,
``query-status``) and on memory: the per-block digests of a migration that
completes (after a recovery, or a clean migration of the source's guest after a
precopy fault: its memory is still a whole, consistent guest).

- precopy: link cut, black hole, destination SIGKILLed, flipped payload byte:
  the migration fails, the source's guest runs, the destination is not
  ``completed``;
- postcopy with 2 MiB pages and preempt on: a cut and a black hole on the main
  channel and on the POSTCOPY channel, a flipped payload byte on either: both
  sides pause, the controller recovers (``resume=True``), digests equal;
- a second cut during the recovery (in ``postcopy-recover``), then success;
- a worker SIGKILLed in postcopy: the survivor pauses and says why; the source
  never resumes its copy of the guest;
- the source's verdict lost: the destination stays in ``device`` with "outcome
  unknown", its guest not running, while the source says ``completed``;
- the controller (`ferry migrate`) killed mid-way: the migration goes on and
  ends with one running guest;
- a 2 MiB huge-page pool one page short: the migration fails before the switch.

Black holes fail fast through ``liveness-timeout`` (a few seconds); every wait is
bounded generously and on states, never on wall-clock figures.
"""
from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import subprocess
import sys

import pytest

from ferry_migrate.engine.control.client import ControlClient
from ferry_migrate.engine.control.driver import run_migration
from ferry_migrate.engine.params import CAPABILITIES

from .faultrelay import TO_DST, TO_SRC, FaultRelay, sigkill, wait_state
from .test_control import spawn, wait_final  # noqa: F401 - spawn is a fixture

MiB = 1 << 20
HUGE = 2 * MiB
WAIT = 120  # s: generous bound on any state change (a loaded 2-core machine)
LIVENESS = 3  # s: liveness-timeout on both sides, so black holes fail fast

needs_page_checksums = pytest.mark.skipif(
    "page-checksums" not in CAPABILITIES,
    reason="needs per-page checksums (page-checksums capability)")

PRECOPY_GUEST = ["--size", "32M"]
# 2 MiB pages; the destination's guest faults at random once it runs there, so
# the POSTCOPY channel carries requested pages.
POSTCOPY_GUEST = ["--size", "32M", "--page-size", "2M"]
DEST_WORKLOAD = ["--workload-threads", "1", "--workload-pattern", "random", "--dirty-rate", "4M"]
POSTCOPY_CAPS = {"postcopy-ram": True, "postcopy-preempt": True}
# Switch early, background pages slow: the postcopy phase lasts while the test acts on it.
POSTCOPY_PARAMS = {"postcopy-after-percent": 10, "max-bandwidth": 16 * MiB, "max-postcopy-bandwidth": 2 * MiB,
                   "postcopy-channels": 1, "liveness-timeout": LIVENESS}
FAST = {"max-postcopy-bandwidth": 64 * MiB}  # for the recovery: the rest goes quickly


def _caps_arg(caps: dict) -> dict:
    return {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]}


async def _configure(s: ControlClient, d: ControlClient, caps: dict | None, params: dict) -> None:
    for c in (s, d):
        if caps:
            await c.call("migrate-set-capabilities", _caps_arg(caps))
        await c.call("migrate-set-parameters", params)


async def _incoming(d: ControlClient) -> str:
    return (await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}))["uri"]


async def _both(s: ControlClient, d: ControlClient, status: str, timeout: float = WAIT) -> tuple[dict, dict]:
    sq = await wait_state(s, status, timeout)
    dq = await wait_state(d, status, timeout)
    return sq, dq


async def _final_both(s: ControlClient, d: ControlClient) -> tuple[dict, dict]:
    return await wait_final(s, timeout=WAIT), await wait_final(d, timeout=WAIT)


def _resumed(events: list) -> list:
    """RESUME events: the guest started running on that worker."""
    return [e for e in events if e.get("event") == "RESUME"]


async def _drain(stream, into: list) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        async for ev in stream:
            into.append(ev)


@contextlib.asynccontextmanager
async def _recording(c: ControlClient):
    """Collect the worker's events for the block (a list, filled as they come)."""
    stream = await c.events()
    seen: list = []
    task = asyncio.ensure_future(_drain(stream, seen))
    try:
        yield seen
    finally:
        await asyncio.sleep(0.2)  # the last events on their way
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        stream.close()


async def _source_guest_intact(s: ControlClient, d: ControlClient) -> None:
    """After a failed precopy: the source's guest runs, and migrating it now verifies (equal digests)."""
    st = await s.call("query-status")
    assert st["status"] == "running" and st["running"], st
    await s.call("migrate-set-parameters", {"max-bandwidth": 256 * MiB})
    out = await run_migration(s, d, timeout=WAIT)
    assert out.verified, (out.source.get("error-desc"), out.destination.get("error-desc"))


# --- (a) precopy faults ---------------------------------------------------------------------

PRECOPY_PARAMS = {"max-bandwidth": 6 * MiB, "liveness-timeout": LIVENESS}


@pytest.mark.parametrize("fault", ["cut", "blackhole", "kill-destination",
                                   pytest.param("flip", marks=needs_page_checksums)])
async def test_precopy_fault_fails_both_and_the_source_guest_runs_intact(spawn, fault):  # noqa: F811
    src, dst = spawn("source", PRECOPY_GUEST), spawn("destination", PRECOPY_GUEST)
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        await _configure(s, d, None, PRECOPY_PARAMS)
        inc = await _incoming(d)
        async with _recording(s) as s_events:
            with FaultRelay(inc) as relay:
                if fault == "cut":
                    relay.cut(0, rst=True, at=4 * MiB)
                elif fault == "blackhole":
                    relay.blackhole(0, TO_DST, at=4 * MiB)
                elif fault == "flip":
                    relay.flip(0, TO_DST, 4 * MiB + 1000)  # inside a page's payload
                await s.call("migrate", {"uri": relay.uri})
                if fault == "kill-destination":
                    relay.wait_bytes(0, TO_DST, 4 * MiB, timeout=WAIT)
                    sigkill(dst)
                sq = await wait_final(s, timeout=WAIT)
                dq = None if fault == "kill-destination" else await wait_final(d, timeout=WAIT)
        assert sq["status"] == "failed" and sq["error-desc"], sq
        if dq is not None:
            assert dq["status"] == "failed" and dq["error-desc"], dq
            assert (await d.call("query-status"))["status"] != "running"
        else:
            assert not dst.alive()
        assert not any(e.get("event") == "STOP" and "migrated" in str(e.get("data")) for e in s_events)
        if fault == "kill-destination":
            dst = spawn("destination", PRECOPY_GUEST)
            async with ControlClient(dst.control) as d2:
                await _source_guest_intact(s, d2)
        else:
            await _source_guest_intact(s, d)


# --- (b) postcopy faults, then recovery -------------------------------------------------------

async def _start_postcopy(s: ControlClient, d: ControlClient, relay_for) -> tuple:
    """Configure, listen, migrate through a relay made by ``relay_for(uri)``; returns (relay, driver task)."""
    await _configure(s, d, POSTCOPY_CAPS, POSTCOPY_PARAMS)
    inc = await _incoming(d)
    relay = relay_for(inc)
    await s.call("migrate", {"uri": relay.uri})
    relay.wait_connections(2, timeout=WAIT)  # main channel + POSTCOPY channel
    await _both(s, d, "postcopy-active")
    return relay


async def _paused_and_waiting(s: ControlClient, d: ControlClient) -> tuple[dict, dict]:
    """Both postcopy-paused; the destination's guest waits for pages; the source's stays stopped."""
    sq, dq = await _both(s, d, "postcopy-paused")
    assert sq["error-desc"] and dq["error-desc"], (sq, dq)
    ss, ds = await s.call("query-status"), await d.call("query-status")
    assert ss["status"] == "postmigrate" and not ss["running"], ss
    assert ds["status"] == "paused" and "waiting for pages" in ds["reason"], ds
    return sq, dq


async def _recover(s: ControlClient, d: ControlClient, recoveries: int = 1):
    """Resume through the controller (new connections straight to the destination) until verified."""
    await s.call("migrate-set-parameters", FAST)
    out = await run_migration(s, d, resume=True, timeout=WAIT)
    assert out.verified, (out.source.get("status"), out.source.get("error-desc"),
                          out.destination.get("status"), out.destination.get("error-desc"))
    assert out.source["postcopy-recoveries"] == out.destination["postcopy-recoveries"] == recoveries
    ss, ds = await s.call("query-status"), await d.call("query-status")
    assert ds["status"] == "running" and not ss["running"], (ss, ds)
    return out


@pytest.mark.parametrize("channel", [0, 1], ids=["main", "postcopy"])
@pytest.mark.parametrize("fault", ["cut", "blackhole", pytest.param("flip", marks=needs_page_checksums)])
async def test_postcopy_fault_pauses_both_then_recovery_verifies(spawn, fault, channel):  # noqa: F811
    src = spawn("source", POSTCOPY_GUEST)
    dst = spawn("destination", [*POSTCOPY_GUEST, *DEST_WORKLOAD])
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        async with _recording(s) as s_events:
            relay = await _start_postcopy(s, d, FaultRelay)
            with relay:
                if fault == "cut":
                    relay.cut(channel, rst=True)
                elif fault == "blackhole":
                    relay.blackhole(channel, TO_DST)
                    if channel == 0:
                        relay.blackhole(channel, TO_SRC)
                else:
                    # A little ahead of what went through: inside a 2 MiB page's payload
                    # (the record headers are a few bytes per 2 MiB).
                    relay.flip(channel, TO_DST, relay.received(channel, TO_DST) + (256 << 10) + 123)
                await _paused_and_waiting(s, d)
            await _recover(s, d)
        assert not _resumed(s_events), s_events  # the source's copy never ran again


# --- (c) a second cut during the recovery --------------------------------------------------

async def test_cut_during_recovery_pauses_again_then_the_next_recovery_verifies(spawn):  # noqa: F811
    src = spawn("source", POSTCOPY_GUEST)
    dst = spawn("destination", [*POSTCOPY_GUEST, *DEST_WORKLOAD])
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        async with _recording(s) as s_events, _recording(d) as d_events:
            with await _start_postcopy(s, d, FaultRelay) as relay:
                relay.cut(0, rst=True)
                await _paused_and_waiting(s, d)
            # The recovery goes through a second relay that cuts the return path
            # in the middle of the destination's RECV_BITMAP answer.
            listening = (await d.call("migrate-recover", {"uri": "tcp:127.0.0.1:0"}))["uri"]
            with FaultRelay(listening) as relay2:
                relay2.cut(0, rst=True, at=24, direction=TO_SRC)
                await s.call("migrate", {"uri": relay2.uri, "resume": True})
                relay2.wait_fired("cut", 0, timeout=WAIT)
                await _paused_and_waiting(s, d)
            await _recover(s, d, recoveries=1)  # counts the recoveries that went through
        for events in (s_events, d_events):
            seen = [e["data"]["status"] for e in events if e.get("event") == "MIGRATION"]
            i = seen.index("postcopy-recover")
            assert seen[i + 1] == "postcopy-paused", seen  # the second cut hit the recovery itself
        assert not _resumed(s_events)


# --- (c2) the link dies at the point of no return -------------------------------------------

async def test_link_dies_as_the_switch_starts_the_destination_proves_it_never_ran(spawn):  # noqa: F811
    """The source enters postcopy-active, and everything it sends from then on is lost: the
    destination fails before RUN (liveness), the source pauses (the package may have left).
    A resume reaches the failed destination, which proves its guest never ran: both end
    failed and the guest runs on the source again, whole (a new migration of it verifies)."""
    guest = ["--size", "64M", "--page-size", "2M"]
    src, dst = spawn("source", guest), spawn("destination", [*guest, *DEST_WORKLOAD])
    params = {"max-bandwidth": 8 * MiB, "postcopy-channels": 1, "liveness-timeout": LIVENESS,
              "migration-secret": "5e" * 32}
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        await _configure(s, d, POSTCOPY_CAPS, params)
        inc = await _incoming(d)
        async with _recording(s) as s_events:
            with FaultRelay(inc) as relay:
                await s.call("migrate", {"uri": relay.uri})
                relay.wait_bytes(0, TO_DST, 4 * MiB, timeout=WAIT)
                relay.blackhole(0, TO_DST)  # from here on nothing of the main stream arrives
                await s.call("migrate-start-postcopy")
                sq = await wait_state(s, "postcopy-paused", WAIT)
                dq = await wait_final(d, timeout=WAIT)
            assert dq["status"] == "failed" and dq.get("never-ran") is True, dq
            assert "postcopy-active" in [e["data"]["status"] for e in s_events if e.get("event") == "MIGRATION"]
            assert not (await s.call("query-status"))["running"] and not (await d.call("query-status"))["running"]
            out = await run_migration(s, d, resume=True, timeout=WAIT)
        assert out.source["status"] == "failed" and "never processed POSTCOPY_RUN" in out.source["error-desc"], \
            out.source
        assert out.destination["status"] == "failed" and out.destination.get("never-ran-told") == 1, out.destination
        assert _resumed(s_events), "the source's guest runs again"
        assert not (await d.call("query-status"))["running"]
        await _source_guest_intact(s, d)


# --- (d) a worker SIGKILLed in postcopy ------------------------------------------------------

@pytest.mark.parametrize("victim", ["destination", "source"])
async def test_worker_killed_in_postcopy_survivor_pauses_and_says_why(spawn, victim):  # noqa: F811
    src = spawn("source", POSTCOPY_GUEST)
    dst = spawn("destination", [*POSTCOPY_GUEST, *DEST_WORKLOAD])
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        async with _recording(s) as s_events:
            with await _start_postcopy(s, d, FaultRelay):
                sigkill(dst if victim == "destination" else src)
                survivor = s if victim == "destination" else d
                q = await wait_state(survivor, "postcopy-paused", WAIT)
                assert q["error-desc"], q
                if victim == "destination":
                    # It stays paused: the guest ran on the destination; nothing resumes this copy.
                    await asyncio.sleep(2 * LIVENESS)
                    st = await s.call("query-status")
                    assert st["migration"] == "postcopy-paused", st
                    assert st["status"] == "postmigrate" and not st["running"], st
                    assert (await s.call("query-migrate"))["status"] == "postcopy-paused"
                else:
                    st = await d.call("query-status")
                    assert st["status"] == "paused" and not st["running"], st
                    assert "waiting for pages" in st["reason"] and q["error-desc"] in st["reason"], st
        assert not _resumed(s_events), s_events


# --- (e) the verdict lost ----------------------------------------------------------------

async def _precopy_through(s, d, relay_setup) -> tuple[dict, dict, dict]:
    """A precopy migration through a relay prepared by ``relay_setup``; (source, destination, counters)."""
    await _configure(s, d, None, {"max-bandwidth": 64 * MiB, "liveness-timeout": LIVENESS})
    inc = await _incoming(d)
    with FaultRelay(inc) as relay:
        relay_setup(relay)
        await s.call("migrate", {"uri": relay.uri})
        sq = await wait_final(s, timeout=WAIT)
        if sq["status"] == "completed":
            dq = await wait_state(d, lambda q: q["status"] in ("completed", "device") and
                                  (q["status"] == "completed" or "outcome unknown" in (q.get("error-desc") or "")),
                                  WAIT)
        else:
            dq = await d.call("query-migrate")
        counters = relay.counters()
    return sq, dq, counters


async def test_verdict_lost_destination_waits_in_device_guest_not_running(spawn):  # noqa: F811
    # The guest writes nothing, so two migrations of it put the same bytes on the return path.
    guest = [*PRECOPY_GUEST, "--workload-threads", "0"]
    src, dst = spawn("source", guest), spawn("destination", guest)
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        sq, dq, counters = await _precopy_through(s, d, lambda r: None)
        assert sq["status"] == dq["status"] == "completed"
        rp = counters[0][TO_SRC]["forwarded"]  # the destination's whole return path: ... SHUT, digests
    src, dst = spawn("source", guest), spawn("destination", guest)
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        # The link dies right after the destination's confirmation went through:
        # the source reads it and decides, its verdict never arrives.
        sq, dq, _ = await _precopy_through(s, d, lambda r: r.cut(0, at=rp, direction=TO_SRC))
        assert sq["status"] == "completed", sq
        assert dq["status"] == "device" and "outcome unknown" in dq["error-desc"], dq
        ds, ss = await d.call("query-status"), await s.call("query-status")
        assert not ds["running"] and ds["status"] != "running", ds
        assert not ss["running"], ss
        # Still so a while later: nobody guesses.
        await asyncio.sleep(2 * LIVENESS)
        assert (await d.call("query-migrate"))["status"] == "device"
        assert not (await d.call("query-status"))["running"]


# --- (f) the controller killed mid-way -----------------------------------------------------

@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
async def test_controller_killed_midway_the_migration_ends_with_one_running_guest(spawn, mode):  # noqa: F811
    guest = POSTCOPY_GUEST if mode == "postcopy" else PRECOPY_GUEST
    src, dst = spawn("source", guest), spawn("destination", [*guest, *DEST_WORKLOAD])
    args = [sys.executable, "-m", "ferry_migrate.engine.cli", "migrate", "--source", src.control, "--destination", dst.control,
            "--param", "max-bandwidth=8M", "--param", f"liveness-timeout={LIVENESS}"]
    if mode == "postcopy":
        args += ["--cap", "postcopy-ram", "--cap", "postcopy-preempt", "--param", "postcopy-after-percent=20",
                 "--param", "max-postcopy-bandwidth=4M"]
    ctl = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
            want = "postcopy-active" if mode == "postcopy" else "active"
            await wait_state(s, lambda q: q["status"] == want and q["ram"]["transferred"] > 2 * MiB, WAIT)
            ctl.kill()
            ctl.wait(10)
            sq, dq = await _final_both(s, d)
            assert sq["status"] == dq["status"] == "completed", (sq.get("error-desc"), dq.get("error-desc"))
            assert sq["digests"] == dq["digests"]
            ss, ds = await s.call("query-status"), await d.call("query-status")
            assert ds["running"] and not ss["running"], (ss, ds)
    finally:
        if ctl.poll() is None:
            ctl.kill()
            ctl.wait(10)


# --- (g) admission: a huge-page pool one page short ---------------------------------------

NR_2M = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"


@contextlib.contextmanager
def _huge_pool_with_free(n: int):
    """Leave exactly ``n`` free 2 MiB huge pages for the block, relative to what the host has.

    Grows the pool by what is missing (given back afterwards), or holds the
    surplus in a hugetlb mapping of this process (released afterwards). Skips
    when the kernel cannot reserve 2 MiB pages.
    """
    from ferry_migrate.engine.ram import hugepage_status

    free, _ = hugepage_status(HUGE)
    added, held = 0, None
    try:
        if free < n:
            try:
                with open(NR_2M) as f:
                    total = int(f.read())
                with open(NR_2M, "w") as f:
                    f.write(str(total + n - free))
                with open(NR_2M) as f:
                    added = int(f.read()) - total
            except OSError as e:
                pytest.skip(f"cannot reserve 2 MiB huge pages ({e.strerror})")
            if hugepage_status(HUGE)[0] < n:
                pytest.skip(f"the kernel reserved {hugepage_status(HUGE)[0]} of the {n} 2 MiB huge pages needed")
        elif free > n:
            fd = os.memfd_create("ferry-test-hold", os.MFD_HUGETLB | (21 << 26))  # MFD_HUGE_2MB
            os.ftruncate(fd, (free - n) * HUGE)
            held = (fd, mmap.mmap(fd, (free - n) * HUGE, flags=mmap.MAP_SHARED))
            for off in range(0, (free - n) * HUGE, HUGE):
                held[1][off] = 1  # faulted in: no longer free (a reservation alone still counts as free)
        yield hugepage_status(HUGE)[0]
    finally:
        if held is not None:
            held[1].close()
            os.close(held[0])
        if added:
            with open(NR_2M) as f:
                total = int(f.read())
            with open(NR_2M, "w") as f:
                f.write(str(max(0, total - added)))


async def test_huge_page_pool_one_page_short_fails_the_migration_before_the_switch(spawn):  # noqa: F811
    if not os.path.exists(NR_2M):
        pytest.skip("this kernel has no 2 MiB huge pages")
    size = 16 * MiB
    need = size // HUGE
    src = spawn("source", ["--size", "16M", "--page-size", "2M"])
    # No fixed guest: it backs the source's blocks with hugetlb pages when MEM_SIZE arrives.
    dst = spawn("destination", ["--ram-layout", "source", "--backing", "hugetlb", "--page-size", "2M",
                                 "--workload-threads", "0"])
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        await _configure(s, d, POSTCOPY_CAPS, {"max-bandwidth": 8 * MiB, "liveness-timeout": LIVENESS,
                                               "postcopy-after-percent": 10})
        async with _recording(s) as s_events, _recording(d) as d_events:
            with _huge_pool_with_free(need - 1) as free:
                assert free == need - 1, f"another user of the pool changed it: {free} free, {need - 1} wanted"
                inc = await _incoming(d)
                await s.call("migrate", {"uri": inc})
                sq, dq = await _final_both(s, d)
        assert sq["status"] == "failed" and dq["status"] == "failed", (sq, dq)
        assert "huge" in dq["error-desc"].lower(), dq["error-desc"]
        for events in (s_events, d_events):  # never switched: the failure came in precopy
            seen = [e["data"]["status"] for e in events if e.get("event") == "MIGRATION"]
            assert seen[-1] == "failed" and "postcopy-active" not in seen, seen
        ss = await s.call("query-status")
        assert ss["status"] == "running" and ss["running"], ss
        assert (await d.call("query-status"))["status"] != "running"
