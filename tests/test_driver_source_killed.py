"""`ferry migrate` (run_migration) returns when the source dies after the switch to postcopy.

Real workers (postcopy with preemption and multifd, 2 MiB pages, a destination guest
faulting at random), the source SIGKILLed once it is postcopy-active. The destination
pauses and waits for pages only a source with the same memory could send; nothing changes
by waiting, so the controller reports it (source unreachable, destination
postcopy-paused) instead of following it until its timeout, and then on for good (a
postcopy migration is never cancelled).
"""
from __future__ import annotations

import asyncio

from ferry_migrate.engine.control.client import ControlClient
from ferry_migrate.engine.control.driver import run_migration

from .faultrelay import sigkill, wait_state
from .test_control import spawn  # noqa: F401 - a fixture
from .test_fault_matrix import DEST_WORKLOAD, POSTCOPY_CAPS, POSTCOPY_GUEST, POSTCOPY_PARAMS, WAIT


async def test_run_migration_returns_when_the_source_dies_in_postcopy(spawn):  # noqa: F811
    src = spawn("source", POSTCOPY_GUEST)
    dst = spawn("destination", [*POSTCOPY_GUEST, *DEST_WORKLOAD])
    caps = {**POSTCOPY_CAPS, "multifd": True}
    params = {**POSTCOPY_PARAMS, "multifd-channels": 2}
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        run = asyncio.ensure_future(run_migration(s, d, caps=caps, params=params, timeout=10 * WAIT))
        try:
            await wait_state(s, "postcopy-active", WAIT)
            sigkill(src)
            out = await asyncio.wait_for(asyncio.shield(run), WAIT)
        finally:
            if not run.done():
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
        assert not out.verified
        assert out.source["status"] == "failed" and out.source.get("unreachable"), out.source
        assert src.control in out.unreachable
        assert out.destination["status"] == "postcopy-paused", out.destination
        assert out.destination.get("error-desc"), out.destination
