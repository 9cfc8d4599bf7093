"""migrate-recover asked again for the address it listens on keeps that listener, so
`ferry migrate --resume --uri U` works after a `migrate-recover U` (real workers)."""
from __future__ import annotations

import asyncio

from ferry_migrate.engine.control.client import ControlClient
from ferry_migrate.engine.control.driver import run_migration

from .test_control import spawn  # noqa: F401 - a fixture
from .test_recovery_workers import CAPS, DEST, PARAMS, _until


async def test_resume_on_the_uri_migrate_recover_already_listens_on(spawn):  # noqa: F811
    src, dst = spawn("source"), spawn("destination", DEST)
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        first = await _start_and_pause(s, d)
        assert first.paused
        a = (await d.call("migrate-recover", {"uri": "tcp:127.0.0.1:0"}))["uri"]
        b = (await d.call("migrate-recover", {"uri": "tcp:127.0.0.1:0"}))["uri"]
        assert a != b  # a port 0 is a new listener, replacing the first
        assert (await d.call("migrate-recover", {"uri": b}))["uri"] == b  # the same address: kept
        out = await run_migration(s, d, uri=b, resume=True, timeout=120)
        assert out.verified, (out.source.get("error-desc"), out.destination.get("error-desc"))
        assert out.destination["postcopy-recoveries"] == 1


async def _start_and_pause(s, d):
    task = asyncio.ensure_future(run_migration(s, d, caps=CAPS, params=PARAMS, timeout=120))
    await _until(s, "postcopy-active")
    await _until(d, "postcopy-active")
    assert await s.call("migrate-pause") == {}
    return await task
