"""Migration statistics shaped like QEMU's query-migrate."""
from __future__ import annotations

import time

from ferry_migrate.channels import constants as C

# Migration states: QEMU's MigrationStatus names, defined with their table in engine/states.py.
from .states import (ACTIVE, CANCELLED, CANCELLING, COMPLETED, DEVICE, FAILED, FINAL_STATES,  # noqa: E402,F401
                     IN_PROGRESS, NONE, POSTCOPY_ACTIVE, POSTCOPY_PAUSED, POSTCOPY_RECOVER, SETUP)


class RamCounters:
    """Page and byte counters of one side."""

    def __init__(self):
        self.normal = 0
        self.duplicate = 0  # zero pages (QEMU's name)
        self.precopy_bytes = 0
        self.downtime_bytes = 0
        self.dirty_sync_count = 0
        self.dirty_pages_rate = 0
        self.pages_per_second = 0.0
        self.mbps = 0.0  # megabits per second, as QEMU reports it


class MigrationStats:
    """Timestamps and counters for one migration; ``to_dict`` gives query-migrate."""

    def __init__(self):
        self.status = NONE
        self.error: str | None = None
        self.start_time: float | None = None  # monotonic
        self.setup_done: float | None = None
        self.end_time: float | None = None
        self.downtime_start: float | None = None
        self.downtime_end: float | None = None
        self.expected_downtime_ms = 0
        self.ram = RamCounters()
        self.total = 0
        self.remaining = 0
        self.transferred = 0
        self.channels: dict[str, dict] = {}
        self.digests: dict[str, str] = {}
        self.extra: dict = {}

    @staticmethod
    def _ms(a, b) -> int:
        if a is None:
            return 0
        return int(((b if b is not None else time.monotonic()) - a) * 1000)

    def to_dict(self) -> dict:
        r = self.ram
        d = {"status": self.status}
        if self.start_time is not None:
            d["total-time"] = self._ms(self.start_time, self.end_time)
            d["setup-time"] = self._ms(self.start_time, self.setup_done)
        if self.downtime_start is not None:
            d["downtime"] = self._ms(self.downtime_start, self.downtime_end)
            if self.expected_downtime_ms:
                d["expected-downtime"] = self.expected_downtime_ms  # the estimate when the guest stopped
        elif self.status in (ACTIVE, SETUP):
            d["expected-downtime"] = self.expected_downtime_ms
        # Before the guest stops, everything moved so far moved in precopy.
        precopy_bytes = self.transferred if self.status in (SETUP, ACTIVE) else r.precopy_bytes
        d["ram"] = {
            "transferred": self.transferred,
            "remaining": 0 if self.status == COMPLETED else self.remaining,
            "total": self.total,
            "duplicate": r.duplicate,
            "normal": r.normal,
            "normal-bytes": r.normal * C.TARGET_PAGE_SIZE,
            "dirty-pages-rate": r.dirty_pages_rate,
            "mbps": round(r.mbps, 3),
            "pages-per-second": round(r.pages_per_second, 1),
            "dirty-sync-count": r.dirty_sync_count,
            "precopy-bytes": precopy_bytes,
            "downtime-bytes": r.downtime_bytes,
            "page-size": C.TARGET_PAGE_SIZE,
        }
        if self.channels:
            d["channels"] = self.channels
        if self.digests:
            d["digests"] = self.digests
        if self.error:
            d["error-desc"] = self.error
        d.update(self.extra)
        return d


def check_downtime(q: dict, limit_ms: int, postcopy: bool) -> dict:
    """Add ``downtime-limit`` and ``downtime-exceeded`` to a finished precopy's query-migrate ``q``.

    downtime-limit bounds the stop-and-copy of precopy (QEMU's meaning); the
    switch to postcopy is not governed by it, so a postcopy migration gets
    neither field. ``downtime-exceeded`` is the downtime over the limit, in
    milliseconds (0 when within it). Returns ``q``.
    """
    if "downtime" in q and not postcopy and q.get("status") == COMPLETED:
        q["downtime-limit"] = limit_ms
        q["downtime-exceeded"] = max(0, q["downtime"] - limit_ms)
    return q
