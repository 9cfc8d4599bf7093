"""Faults injected between real `ferry worker` processes: liveness in precopy, and memory after aborts.

The relay of tests/faultrelay.py sits between source and destination; workers
are stopped with SIGSTOP at a chosen phase. Assertions are on both workers'
states, the source guest, and the destination's RSS (psutil).
"""
from __future__ import annotations

import signal

import psutil

from ferry_migrate.channels.constants import FERRY_VERDICT_SIZE
from ferry_migrate.engine.control.client import ControlClient

from .faultrelay import (TO_DST, TO_SRC, FaultRelay, sigcont, signal_when, sigstop, stop_for, wait_event_state,
                         wait_state)
from .test_control import spawn, wait_final  # noqa: F401 - spawn is a fixture

MiB = 1 << 20


async def _incoming(s, d, params: dict) -> str:
    await s.call("migrate-set-parameters", params)
    await d.call("migrate-set-parameters", {k: v for k, v in params.items() if k == "liveness-timeout"})
    return (await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}))["uri"]


async def test_black_holed_main_stream_fails_both_sides_and_the_source_guest_runs(spawn):  # noqa: F811
    src, dst = spawn("source"), spawn("destination")
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        inc = await _incoming(s, d, {"liveness-timeout": 2})
        with FaultRelay(inc) as relay:
            relay.blackhole(0, TO_DST, at=2 * MiB)
            await s.call("migrate", {"uri": relay.uri})
            dq = await wait_final(d, timeout=120)
            sq = await wait_final(s, timeout=120)
        assert relay.fired[0].kind == "blackhole"
        assert dq["status"] == "failed" and "recv timed out" in dq["error-desc"], dq
        assert "liveness-timeout" in dq["error-desc"]
        assert sq["status"] == "failed", sq
        st = await s.call("query-status")
        assert st["status"] == "running"  # precopy: the guest never left the source


async def test_black_holed_return_path_fails_the_source_within_the_liveness_timeout(spawn):  # noqa: F811
    # The destination sends a keepalive on the return path every liveness-timeout/3 s, so
    # the source notices a return path that went silent (one direction black-holed, the
    # main stream still flowing) in about the timeout, not at the end of the migration.
    opts = ["--size", "64M"]
    src, dst = spawn("source", opts), spawn("destination", opts)
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        inc = await _incoming(s, d, {"liveness-timeout": 2, "max-bandwidth": 4 * MiB})
        with FaultRelay(inc) as relay:
            await s.call("migrate", {"uri": relay.uri})
            await wait_state(s, lambda q: q["status"] == "active" and q["ram"]["transferred"] > 2 * MiB)
            relay.blackhole(0, TO_SRC)
            sq = await wait_final(s, timeout=120)
        assert sq["status"] == "failed", sq
        assert "return-path" in sq["error-desc"] and "liveness-timeout" in sq["error-desc"], sq["error-desc"]
        assert sq["ram"]["transferred"] < 60 * MiB  # well before the end of the stream
        assert (await s.call("query-status"))["status"] == "running"


async def test_destination_stopped_shorter_than_the_timeout_still_completes(spawn):  # noqa: F811
    opts = ["--size", "32M"]
    src, dst = spawn("source", opts), spawn("destination", opts)
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        inc = await _incoming(s, d, {"liveness-timeout": 10, "max-bandwidth": 12 * MiB})
        await s.call("migrate", {"uri": inc})
        await wait_state(s, lambda q: q["status"] == "active" and q["ram"]["transferred"] > 2 * MiB)
        stop_for(dst, 1.5)
        sq, dq = await wait_final(s, timeout=120), await wait_final(d, timeout=120)
    assert sq["status"] == dq["status"] == "completed", (sq.get("error-desc"), dq.get("error-desc"))
    assert sq["digests"] == dq["digests"]


async def test_destination_stopped_longer_fails_the_source_with_peer_timeout(spawn):  # noqa: F811
    opts = ["--size", "64M"]
    src, dst = spawn("source", opts), spawn("destination", opts)
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        inc = await _incoming(s, d, {"liveness-timeout": 2, "max-bandwidth": 16 * MiB})
        await s.call("migrate", {"uri": inc})
        await wait_state(s, lambda q: q["status"] == "active" and q["ram"]["transferred"] > 2 * MiB)
        sigstop(dst)
        try:
            sq = await wait_final(s, timeout=120)
        finally:
            sigcont(dst)
        # The source's send bound, or the kernel's TCP_USER_TIMEOUT seen by whichever thread reads first.
        assert sq["status"] == "failed" and "timed out" in sq["error-desc"], sq
        assert "liveness-timeout" in sq["error-desc"]
        assert (await s.call("query-status"))["status"] == "running"
        dq = await wait_final(d, timeout=120)
        assert dq["status"] != "completed"


# --- memory after aborted migrations -----------------------------------------------------

ABORTS = 20
WARMUP = 2  # aborts before the baseline: first-use allocations (imports, caches) are not a leak
RSS_GROWTH_BOUND = 16 * MiB  # before the fix: about 4 MiB per abort, 40-66 MiB over 20


async def test_aborted_migrations_do_not_grow_the_destination_rss(spawn):  # noqa: F811
    opts = ["--size", "64M"]
    src, dst = spawn("source", opts), spawn("destination", opts)
    proc = psutil.Process(dst.pid)
    rss = []
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        await s.call("migrate-set-parameters", {"max-bandwidth": 32 * MiB})
        for i in range(ABORTS + WARMUP):
            inc = (await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}))["uri"]
            with FaultRelay(inc) as relay:
                cut = i % 2 == 1
                if cut:
                    relay.cut(0, rst=True, at=8 * MiB)  # the link dies mid-precopy
                await s.call("migrate", {"uri": relay.uri})
                relay.wait_bytes(0, TO_DST, 8 * MiB)
                if not cut:
                    await s.call("migrate-cancel")
                sq, dq = await wait_final(s), await wait_final(d)
            assert sq["status"] in ("cancelled", "failed") and dq["status"] in ("cancelled", "failed"), (sq, dq)
            assert (await s.call("query-status"))["status"] == "running"
            rss.append(proc.memory_info().rss)
        fds, threads = proc.num_fds(), proc.num_threads()
    base = rss[WARMUP - 1]
    growth = max(rss[WARMUP:]) - base
    print(f"destination RSS after each abort (MiB): {[round(r / MiB, 1) for r in rss]}; "
          f"fds {fds}, threads {threads}")
    assert growth < RSS_GROWTH_BOUND, (f"destination RSS grew by {growth / MiB:.1f} MiB over {ABORTS} aborted "
                                       f"migrations: {[round(r / MiB, 1) for r in rss]}")


# --- idle channels are not timed out ----------------------------------------------------

async def test_idle_channels_outlast_the_timeout_in_precopy_and_postcopy_preempt(spawn):  # noqa: F811
    # The source's return path (silent all through precopy) and the destination's
    # two POSTCOPY channels (connected at setup, silent until the switch) stay
    # idle for several liveness timeouts; the migration completes all the same.
    opts = ["--size", "48M"]
    src, dst = spawn("source", opts), spawn("destination", [*opts, "--workload-threads", "1"])
    caps = {"capabilities": [{"capability": c, "state": True} for c in ("postcopy-ram", "postcopy-preempt")]}
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        for c in (s, d):
            await c.call("migrate-set-capabilities", caps)
            await c.call("migrate-set-parameters", {"liveness-timeout": 1, "postcopy-channels": 2})
        await s.call("migrate-set-parameters", {"max-bandwidth": 6 * MiB})
        inc = (await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}))["uri"]
        await s.call("migrate", {"uri": inc})
        await wait_state(s, lambda q: q["status"] == "active" and q["ram"]["transferred"] > 18 * MiB)
        await s.call("migrate-start-postcopy")
        sq, dq = await wait_final(s, timeout=120), await wait_final(d, timeout=120)
    assert sq["status"] == dq["status"] == "completed", (sq.get("error-desc"), dq.get("error-desc"))
    assert sq["digests"] == dq["digests"]
    assert sq["total-time"] > 3000  # ms: the idle channels waited past the 1 s timeout


# --- the relay between real workers -------------------------------------------------------

async def test_postcopy_preempt_through_the_relay_keeps_the_channel_order(spawn):  # noqa: F811
    opts = ["--size", "32M"]
    src, dst = spawn("source", opts), spawn("destination", [*opts, "--workload-threads", "1"])
    caps = {"capabilities": [{"capability": c, "state": True} for c in ("postcopy-ram", "postcopy-preempt")]}
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        for c in (s, d):
            await c.call("migrate-set-capabilities", caps)
            await c.call("migrate-set-parameters", {"postcopy-channels": 2})
        await s.call("migrate-set-parameters", {"max-bandwidth": 16 * MiB})
        inc = (await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}))["uri"]
        events = await d.events()
        with FaultRelay(inc) as relay:
            await s.call("migrate", {"uri": relay.uri})
            relay.wait_connections(3)
            await wait_state(s, lambda q: q["status"] == "active" and q["ram"]["transferred"] > 4 * MiB)
            await s.call("migrate-start-postcopy")
            await wait_event_state(events, "postcopy-active")
            sq, dq = await wait_final(s, timeout=120), await wait_final(d, timeout=120)
            # The stream, then the source's verdict (Ferry's 8 bytes after it, not counted as migration data).
            relay.wait_bytes(0, TO_DST, sq["channels"]["precopy"]["bytes"] + FERRY_VERDICT_SIZE, timeout=60)
            counters = relay.counters()
    assert sq["status"] == dq["status"] == "completed", (sq.get("error-desc"), dq.get("error-desc"))
    assert sq["digests"] == dq["digests"]
    # Every byte each side sent went through its own relayed connection.
    assert counters[0][TO_DST]["forwarded"] == sq["channels"]["precopy"]["bytes"] + FERRY_VERDICT_SIZE
    assert dq["channels"]["precopy"]["bytes"] == sq["channels"]["precopy"]["bytes"]
    for i, name in ((1, "postcopy-1"), (2, "postcopy-2")):
        assert counters[i][TO_DST]["forwarded"] == sq["channels"][name]["bytes"]
        assert counters[i][TO_SRC]["received"] == 0  # POSTCOPY channels are one-way
    assert counters[0][TO_SRC]["forwarded"] > 0  # the return path


async def test_destination_killed_in_precopy_fails_the_source_and_its_guest_runs(spawn):  # noqa: F811
    src, dst = spawn("source"), spawn("destination")
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        inc = await _incoming(s, d, {"max-bandwidth": 6 * MiB})
        await s.call("migrate", {"uri": inc})
        q = await signal_when(s, lambda q: q["status"] == "active" and q["ram"]["transferred"] > MiB,
                              dst, signal.SIGKILL)
        assert q["status"] == "active"
        sq = await wait_final(s, timeout=120)
        assert not dst.alive()
        assert sq["status"] == "failed", sq
        assert (await s.call("query-status"))["status"] == "running"
