"""Postcopy faults between real worker processes, through the control plane: pause and
recover with the controller (`run_migration(..., resume=True)`, `ferry migrate --resume`),
a destination killed after the switch (the source pauses and never resumes its guest),
and no new migration from a paused state."""
from __future__ import annotations

import asyncio
import os
import signal
import time

from ferry_migrate.engine.control.client import CommandFailed, ControlClient
from ferry_migrate.engine.control.driver import run_migration

from .test_control import spawn, wait_status  # noqa: F401 - spawn is a fixture

CAPS = {"postcopy-ram": True, "postcopy-preempt": True}
# Switch with most pages still on the source, and background pages slow enough that
# the postcopy phase lasts while the test cuts it (tens of seconds, not a bound).
PARAMS = {"postcopy-after-percent": 10, "max-bandwidth": 32 << 20, "max-postcopy-bandwidth": 1 << 20}
DEST = ["--workload-threads", "1", "--workload-pattern", "random", "--dirty-rate", "2M"]


async def _until(c: ControlClient, want: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        q = await c.call("query-migrate")
        if q["status"] == want:
            return q
        assert time.monotonic() < deadline, f"never reached {want}: {q['status']}"
        await asyncio.sleep(0.05)


async def test_pause_then_resume_through_the_controller(spawn):
    src, dst = spawn("source"), spawn("destination", DEST)
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        first = asyncio.ensure_future(run_migration(s, d, caps=CAPS, params=PARAMS, timeout=120))
        await _until(s, "postcopy-active")
        await _until(d, "postcopy-active")
        assert await s.call("migrate-pause") == {}
        out = await first
        assert out.paused and not out.completed
        st = await d.call("query-status")
        assert st["status"] == "paused" and "waiting for pages" in st["reason"]
        assert (await s.call("query-status"))["status"] == "postmigrate"
        # A paused migration is resumed, never restarted or cancelled.
        for verb, args, words in (("migrate", {"uri": "tcp:127.0.0.1:1"}, "only resuming"),
                                  ("migrate-cancel", None, "refused")):
            try:
                await s.call(verb, args)
                raise AssertionError(f"{verb} accepted in postcopy-paused")
            except CommandFailed as e:
                assert words in str(e), e
        try:
            await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            raise AssertionError("migrate-incoming accepted in postcopy-paused")
        except CommandFailed as e:
            assert "migrate-recover" in str(e)
        out = await run_migration(s, d, resume=True, timeout=120)
        assert out.verified, (out.source.get("error-desc"), out.destination.get("error-desc"))
        assert out.source["postcopy-recoveries"] == out.destination["postcopy-recoveries"] == 1
        assert (await d.call("query-status"))["status"] == "running"


async def test_destination_killed_after_the_switch_source_pauses_and_never_resumes(spawn):
    src, dst = spawn("source"), spawn("destination", DEST)
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        task = asyncio.ensure_future(run_migration(s, d, caps=CAPS, params=PARAMS, timeout=120))
        await _until(s, "postcopy-active")
        os.killpg(dst.pid, signal.SIGKILL)  # its own process group
        q = await _until(s, "postcopy-paused")
        assert q["error-desc"]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # It stays paused: the guest may have run on the destination; nothing brings it back here.
        await asyncio.sleep(1.0)
        st = await s.call("query-status")
        assert st["migration"] == "postcopy-paused" and st["status"] == "postmigrate" and not st["running"]
        try:
            await s.call("migrate", {"uri": "tcp:127.0.0.1:1"})
            raise AssertionError("a new migration was accepted from a forked state")
        except CommandFailed as e:
            assert "only resuming" in str(e)
