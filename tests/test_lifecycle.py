"""The guest's life cycle around a migration: autostart or -S on the destination, QMP
stop/cont with STOP/RESUME events, cont refused where the guest does not belong, and the
roles swapping with the guest."""
from __future__ import annotations

import asyncio

import pytest

from ferry_migrate.engine.control.client import CommandFailed, ControlClient

from .test_control import spawn, wait_final  # noqa: F401 - spawn is a fixture

DEST = ["--workload-threads", "1"]


async def _events_until(stream, name, timeout=30):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = []
    while loop.time() < deadline:
        ev = await stream.next(max(0.1, deadline - loop.time()))
        if ev is None:
            break
        seen.append(ev)
        if ev["event"] == name:
            return ev, seen
    raise AssertionError(f"no {name} event; saw {[e['event'] for e in seen]}")


async def test_autostart_runs_the_guest_after_precopy_and_emits_resume(spawn):
    src, dst = spawn("source"), spawn("destination", DEST)
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        d_events, s_events = await d.events(), await s.events()
        inc = await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        await s.call("migrate", {"uri": inc["uri"]})
        await wait_final(s)
        await wait_final(d)
        ev, _ = await _events_until(d_events, "RESUME")
        assert "autostart" in ev["data"]["reason"]
        await _events_until(s_events, "STOP")
        assert (await d.call("query-status"))["status"] == "running"
        assert (await s.call("query-status"))["status"] == "postmigrate"
        with pytest.raises(CommandFailed, match="cont runs on a source|no guest"):
            await s.call("cont")


async def test_no_autostart_then_stop_and_cont(spawn):
    src, dst = spawn("source"), spawn("destination", [*DEST, "-S"])
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        # Before a migration a destination has no guest to run.
        with pytest.raises(CommandFailed, match="no guest"):
            await d.call("cont")
        inc = await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        await s.call("migrate", {"uri": inc["uri"]})
        await wait_final(s)
        await wait_final(d)
        st = await d.call("query-status")
        assert st["status"] == "paused" and st["role"] == "source"  # -S: it waits for cont
        events = await d.events()
        assert await d.call("cont") == {}
        await _events_until(events, "RESUME")
        assert (await d.call("query-status"))["status"] == "running"
        assert await d.call("stop") == {}
        await _events_until(events, "STOP")
        assert (await d.call("query-status"))["status"] == "paused"
        assert await d.call("cont") == {}
        assert (await d.call("query-status"))["status"] == "running"
