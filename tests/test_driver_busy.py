"""run_migration (`ferry migrate`) refuses a worker that already has a migration under way,
before it changes any setting on either worker (real workers)."""
from __future__ import annotations

import pytest

from ferry_migrate.engine.control.client import ControlClient
from ferry_migrate.engine.control.driver import DriverError, run_migration

from .test_control import spawn, wait_status  # noqa: F401 - spawn is a fixture


async def test_a_destination_already_in_setup_is_named_and_nothing_changes(spawn):  # noqa: F811
    src, dst = spawn("source"), spawn("destination")
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        before = (await s.call("query-migrate-parameters"))["downtime-limit"]
        with pytest.raises(DriverError) as e:
            await run_migration(s, d, params={"downtime-limit": before + 1}, timeout=60)
        assert "destination" in str(e.value) and "setup" in str(e.value) and "migrate-cancel" in str(e.value)
        assert (await s.call("query-migrate-parameters"))["downtime-limit"] == before
        await d.call("migrate-cancel")
        await wait_status(d, "cancelled")
        out = await run_migration(s, d, timeout=120)
        assert out.verified, (out.source.get("error-desc"), out.destination.get("error-desc"))
