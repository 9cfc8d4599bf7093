"""The QEMU 8.0+ preempt dialect: POSTCOPY channels opened at the switch, never ended with EOS.

A Ferry source set to it (``preempt-dialect=qemu-8.0``) feeds a Ferry destination,
which must finish once every page is placed instead of waiting for an EOS.
"""
from ferry_migrate.engine.local import GuestConfig, run_local_migration
from ferry_migrate.engine.workload import WorkloadConfig

PREEMPT = {"postcopy-ram": True, "postcopy-preempt": True}
SLOW = {"postcopy-after-percent": 5, "max-postcopy-bandwidth": 48 << 20}


def guest():
    return GuestConfig(size=64 << 20, page_size=2 << 20, fill="pattern",
                       workload=WorkloadConfig(dirty_rate=16 << 20),
                       dest_workload=WorkloadConfig(threads=2, pattern="random", dirty_rate=4 << 20, batch=1))


def test_qemu80_dialect_requests_served_and_no_eos_awaited():
    src, dst = run_local_migration("tcp:127.0.0.1:0", guest(), caps=PREEMPT,
                                   params={**SLOW, "preempt-dialect": "qemu-8.0"}, timeout=120)
    assert src["status"] == "completed", src.get("error-desc")
    assert dst["status"] == "completed", dst.get("error-desc")
    assert src["digests"] == dst["digests"]
    assert dst["channels"]["postcopy-1"]["host-pages-placed"] >= 1
    # Pages only: no EOS record (8 bytes) after them on the POSTCOPY channel.
    pc = src["channels"]["postcopy-1"]
    assert pc["normal"] > 0
    assert dst["channels"]["postcopy-1"]["bytes"] == pc["bytes"]


def test_qemu80_dialect_without_switch_opens_no_channel():
    g = GuestConfig(size=32 << 20, fill="pattern", workload=None)
    src, dst = run_local_migration("tcp:127.0.0.1:0", g, caps=PREEMPT,
                                   params={"preempt-dialect": "qemu-8.0"}, timeout=120)
    assert src["status"] == "completed", src.get("error-desc")
    assert dst["status"] == "completed", dst.get("error-desc")
    assert "postcopy-1" not in src["channels"]
