"""query-status of a worker whose guest process died: it must not say the guest runs."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from ferry_migrate.engine import uffd as U
from ferry_migrate.engine.control.client import ControlClient

from .test_guest_worker import spawn  # noqa: F401 - a fixture

REASON = U.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"userfaultfd unavailable: {REASON}")


async def test_a_dead_guest_process_is_internal_error_not_running(spawn):  # noqa: F811
    src = spawn("source")
    async with ControlClient(src.control) as s:
        st = await s.call("query-status")
        assert st["status"] == "running" and st["running"] and st["guest"]["guest-alive"] is True
        pid = st["guest"]["guest-pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (st := await s.call("query-status"))["guest"]["guest-alive"]:
            assert time.monotonic() < deadline, "the worker never saw its guest process exit"
            await asyncio.sleep(0.05)
        assert st["status"] == "internal-error" and st["running"] is False, st["status"]
        assert st["guest"]["guest-pid"] == pid
