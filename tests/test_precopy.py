"""Real two-process precopy (engine/local.py run_local_migration).

A 256 MiB guest with the workload dirtying memory migrates between two
spawned worker processes over TCP loopback and over a Unix socket, with 4 KiB
and 2 MiB host pages: both sides complete, their digests are equal, the
source synced the dirty log at least twice, query-migrate has QEMU's fields,
and no worker process is left behind.
"""
from __future__ import annotations

import pytest

from ferry_migrate.engine.local import GuestConfig, run_local_migration
from ferry_migrate.engine.workload import WorkloadConfig

from .conftest import wait_until

SIZE = 256 << 20
TOP_FIELDS = ("status", "total-time", "downtime", "setup-time", "ram")
RAM_FIELDS = ("transferred", "remaining", "total", "duplicate", "normal", "normal-bytes", "dirty-pages-rate",
              "mbps", "pages-per-second", "dirty-sync-count", "precopy-bytes", "downtime-bytes")


@pytest.mark.parametrize("transport,page_size", [
    ("tcp", 4 << 10), ("unix", 2 << 20), ("tcp", 2 << 20), ("unix", 4 << 10),
])
def test_two_process_precopy(transport, page_size, tmp_path, no_child_processes):
    uri = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/mig.sock"
    guest = GuestConfig(size=SIZE, page_size=page_size, fill="mixed",
                        workload=WorkloadConfig(threads=1, pattern="hotset", dirty_rate=32 << 20))
    src, dst = run_local_migration(uri, guest, timeout=120, warm=0.2)

    assert src["status"] == "completed", src.get("error-desc")
    assert dst["status"] == "completed", dst.get("error-desc")
    assert src["digests"] and src["digests"] == dst["digests"]
    assert list(src["digests"]) == ["pc.ram"]

    for f in TOP_FIELDS:
        assert f in src, f
    r = src["ram"]
    for f in RAM_FIELDS:
        assert f in r, f
    assert r["dirty-sync-count"] >= 2
    assert len(src["passes"]) == r["dirty-sync-count"]
    assert r["total"] == SIZE and r["remaining"] == 0
    # Every page went out at least once; with the guest writing, some more than once.
    assert r["normal"] + r["duplicate"] >= SIZE // 4096
    assert r["normal-bytes"] == r["normal"] * 4096
    assert r["transferred"] >= r["normal-bytes"]
    assert r["precopy-bytes"] + r["downtime-bytes"] == r["transferred"]
    assert r["downtime-bytes"] > 0
    assert r["mbps"] > 0 and r["pages-per-second"] > 0
    assert 0 <= src["setup-time"] <= src["total-time"]
    assert 0 <= src["downtime"] <= src["total-time"]
    # The destination placed exactly the records the source sent.
    assert (dst["ram"]["normal"], dst["ram"]["duplicate"]) == (r["normal"], r["duplicate"])
    assert dst["ram"]["transferred"] == r["transferred"]
    assert dst["ram"]["remaining"] == 0
    assert 0 <= dst["setup-time"] <= dst["total-time"]


def test_live_parameter_change_lets_a_throttled_migration_finish():
    """max-bandwidth and downtime-limit change while the migration runs, as in QEMU."""
    import time

    from ferry_migrate.engine.destination import MigrationDestination
    from ferry_migrate.engine.params import MigrationConfig
    from ferry_migrate.engine.ram import GuestRAM
    from ferry_migrate.engine.source import MigrationSource

    src, dst = GuestRAM.create(64 << 20), GuestRAM.create(64 << 20)
    src.fill("pattern")
    cfg = MigrationConfig()
    cfg.set_parameters({"max-bandwidth": 1 << 20})  # 64 MiB would take a minute
    d = MigrationDestination(dst)
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    s = MigrationSource(src, None, cfg)
    t0 = time.monotonic()
    s.start(uri)
    wait_until(lambda: s.status == "active" and s.query()["ram"]["transferred"] > 2 << 20,
               what="the throttled migration to be under way")
    sent_slow = s.query()["ram"]["transferred"]
    # Held to 1 MiB/s however long that took: the limiter waits after each write, so one
    # write (up to a 1 MiB flush) may be ahead of the budget.
    assert s.status == "active" and sent_slow <= (1 << 20) * (time.monotonic() - t0) + (3 << 20) // 2
    cfg.set_parameters({"max-bandwidth": 0, "downtime-limit": 1000})
    s.parameters_changed()
    assert s.wait(30) == "completed", s.stats.error
    assert d.wait(10) == "completed"
    assert s.query()["digests"] == d.query()["digests"]
