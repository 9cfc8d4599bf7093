"""Postcopy preemption end to end: POSTCOPY channels, huge pages interrupted and restored,
N urgent channels, urgent pages sent from the return-path thread, and the bad input of
channels (extra connections refused, preempt on one side only)."""
import socket

import pytest

from ferry_migrate.engine.destination import MigrationDestination
from ferry_migrate.engine.local import GuestConfig, run_local_migration
from ferry_migrate.engine.params import MigrationConfig
from ferry_migrate.engine.ram import GuestRAM
from ferry_migrate.engine.source import MigrationSource
from ferry_migrate.engine.workload import WorkloadConfig

from .conftest import wait_until

PREEMPT = {"postcopy-ram": True, "postcopy-preempt": True}


def huge_guest(**kw):
    return GuestConfig(size=128 << 20, page_size=2 << 20, fill="pattern",
                       workload=WorkloadConfig(dirty_rate=16 << 20),
                       dest_workload=WorkloadConfig(threads=2, pattern="random", dirty_rate=4 << 20, batch=1), **kw)


# Background pages slowed down, so that requests land while a huge page is half sent.
SLOW = {"postcopy-after-percent": 5, "max-postcopy-bandwidth": 48 << 20}


def check(src, dst):
    assert src["status"] == "completed", src.get("error-desc")
    assert dst["status"] == "completed", dst.get("error-desc")
    assert src["digests"] == dst["digests"]


def test_preempt_huge_pages_interrupted_and_restored():
    src, dst = run_local_migration("tcp:127.0.0.1:0", huge_guest(), caps=PREEMPT, params=SLOW, timeout=120)
    check(src, dst)
    # Requests cut into huge pages: at a record boundary (preempted, restored later) or
    # served while a record was half written (send_loop's write breaks).
    assert src["preemptions"] + src["requests-served-mid-record"] >= 1
    assert src["restores"] == src["preemptions"]
    assert dst["channels"]["postcopy-1"]["host-pages-placed"] >= 1
    assert src["channels"]["postcopy-1"]["normal"] > 0
    assert "postcopy-1" in dst["postcopy-latency-by-channel"]


def test_preempt_break_huge_off_never_interrupts():
    src, dst = run_local_migration("tcp:127.0.0.1:0", huge_guest(), caps=PREEMPT,
                                   params={**SLOW, "preempt-break-huge": False}, timeout=120)
    check(src, dst)
    assert src["preemptions"] == 0 and src["restores"] == 0


def test_three_postcopy_channels_share_the_requests(tmp_path):
    src, dst = run_local_migration(f"unix:{tmp_path}/m.sock", huge_guest(), caps=PREEMPT,
                                   params={**SLOW, "postcopy-channels": 3}, timeout=120)
    check(src, dst)
    used = [c for c in ("postcopy-1", "postcopy-2", "postcopy-3") if dst["channels"][c]["host-pages-placed"] > 0]
    assert len(used) >= 2


@pytest.mark.parametrize("page_size", [4096, 2 << 20])
def test_urgent_pages_from_return_path_thread(page_size):
    g = huge_guest()
    g.page_size = page_size
    src, dst = run_local_migration("tcp:127.0.0.1:0", g, caps=PREEMPT,
                                   params={**SLOW, "urgent-pages-from": "return-path"}, timeout=120)
    check(src, dst)
    assert src["preemptions"] == 0  # the migration thread is never interrupted in this mode
    assert src["channels"]["postcopy-1"]["normal"] + src["channels"]["postcopy-1"]["duplicate"] > 0


def test_connection_beyond_expected_channels_is_refused():
    cfg = MigrationConfig()
    cfg.set_capabilities(PREEMPT)
    d = MigrationDestination(GuestRAM.create(8 << 20, 2 << 20), cfg)
    host, port = d.listen("tcp:127.0.0.1:0")[4:].rsplit(":", 1)
    d.start()
    main = socket.create_connection((host, int(port)))
    chan = socket.create_connection((host, int(port)))
    wait_until(lambda: d.listener is None, what="both expected connections accepted")
    assert d.listener is None  # all expected channels accepted: nothing listens any more
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=5)
    main.close()
    chan.close()
    assert d.wait(10) == "failed"


def test_preempt_on_the_source_only_gives_a_clear_error():
    s_ram = GuestRAM.create(8 << 20, 2 << 20)
    s_ram.fill("pattern")
    before = s_ram.digests()
    d_cfg = MigrationConfig()
    d_cfg.set_capabilities({"postcopy-ram": True})
    d = MigrationDestination(GuestRAM.create(8 << 20, 2 << 20), d_cfg)
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    s_cfg = MigrationConfig()
    s_cfg.set_capabilities(PREEMPT)
    s = MigrationSource(s_ram, None, s_cfg)
    s.start(uri)
    assert s.wait(30) == "failed"
    assert "POSTCOPY channel 1 of 1" in s.stats.error and "postcopy-preempt" in s.stats.error
    assert s_ram.digests() == before
    d.cancel()
    d.wait(10)


def test_preempt_needs_postcopy_ram():
    cfg = MigrationConfig()
    cfg.set_capabilities({"postcopy-preempt": True})
    s = MigrationSource(GuestRAM.create(4 << 20), None, cfg)
    with pytest.raises(ValueError, match="postcopy-ram"):
        s.start("tcp:127.0.0.1:1")


def test_preempt_on_real_huge_pages(tmp_path, hugepages):
    """hugetlb-backed 2 MiB pages on both sides (memfd with MFD_HUGETLB)."""
    hugepages(2 * 64)
    g = huge_guest(backing="hugetlb")
    g.size = 64 << 20
    src, dst = run_local_migration(f"unix:{tmp_path}/h.sock", g, caps=PREEMPT, params=SLOW, timeout=120)
    check(src, dst)
    assert dst["postcopy-requests"] > 0


def test_preempt_enabled_but_completed_in_precopy():
    """The POSTCOPY channels were opened at setup; they end with EOS even if never used."""
    src, dst = run_local_migration("tcp:127.0.0.1:0", GuestConfig(size=8 << 20, workload=None), caps=PREEMPT,
                                   timeout=60)
    check(src, dst)
    # Completed in precopy: no postcopy phase ("postcopy-bytes" is set only at its end),
    # no request, nothing on the POSTCOPY channel, and the source's guest untouched.
    assert src["status"] == "completed" and "postcopy-bytes" not in src
    assert dst.get("postcopy-requests", 0) == 0
    assert src["channels"]["postcopy-1"]["normal"] == src["channels"]["postcopy-1"]["duplicate"] == 0
    assert src["guest-unchanged"] is True
