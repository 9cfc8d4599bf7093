"""The postcopy phase split (engine/phasesplit.py): both sides' stamps joined into phases,
and a real postcopy migration (vanilla and preempt) that reports every stamp in order."""
import pytest

from ferry_migrate.engine.local import GuestConfig, run_local_migration
from ferry_migrate.engine.phasesplit import DEST_STAMPS, GIB, MIB, SOURCE_STAMPS, PhaseStamps, merge_splits, split


def test_split_joins_both_sides_into_phases():
    src = {"start": [10.0, 1.0, 0], "stop": [12.0, 2.0, GIB // 2], "package-sent": [12.1, 2.05, GIB // 2],
           "first-background": [12.2, 2.1, GIB // 2], "background-done": [13.2, 2.6, GIB // 2 + 512 * MIB],
           "confirmed": [13.5, 2.6, 0], "end": [13.6, 2.6, 0]}
    dst = {"package-read": [12.15, 0, 0], "listen": [12.17, 0, 0], "run": [12.18, 0, 0]}
    s = split(src, dst)
    assert s["precopy-ms"] == 2000.0 and s["switch-ms"] == 180.0
    assert s["switch"] == {"source-ms": 100.0, "wire-ms": 50.0, "destination-ms": 30.0}
    assert s["start-ms"] == 20.0 and s["steady-ms"] == 1000.0
    assert s["steady-MiBps"] == 512.0 and s["steady-cpu-s-per-GiB"] == 1.0
    assert s["precopy-cpu-s-per-GiB"] == 2.0
    assert s["tail-ms"] == 300.0 and s["verdict-ms"] == 100.0 and s["total-ms"] == 3600.0


def test_split_with_stamps_missing_gives_none():
    s = split({"start": [1.0, 0.0, 0]}, None)
    assert s["switch-ms"] is None and s["steady-MiBps"] is None and s["total-ms"] is None
    m = merge_splits([s, None])
    assert m["switch-ms"] is None and m["switch-ms-spread"] is None


def test_merge_gives_median_and_spread():
    runs = [split({"start": [0, 0, 0], "stop": [t, 0, 0]}, None) for t in (1.0, 3.0, 2.0)]
    m = merge_splits(runs)
    assert m["precopy-ms"] == 2000.0 and m["precopy-ms-spread"] == [1000.0, 3000.0]


def test_first_stamp_of_a_name_is_kept():
    p = PhaseStamps()
    p.mark("stop", 5, at=1.0)
    p.mark("stop", 9, at=2.0)
    assert p.to_dict()["stop"][0] == 1.0 and p.to_dict()["stop"][2] == 5


@pytest.mark.parametrize("caps", [{"postcopy-ram": True}, {"postcopy-ram": True, "postcopy-preempt": True}],
                         ids=["vanilla", "preempt"])
def test_a_postcopy_migration_reports_every_stamp_in_order(caps):
    guest = GuestConfig(size=64 << 20, page_size=2 << 20, fill="pattern", workload=None)
    src, dst = run_local_migration("tcp:127.0.0.1:0", guest, caps=caps,
                                   params={"postcopy-after-percent": 5}, timeout=120)
    assert src["status"] == "completed" and dst["status"] == "completed", src.get("error-desc")
    s, d = src["postcopy-phase-stamps"], dst["postcopy-phase-stamps"]
    assert set(SOURCE_STAMPS) <= set(s) and set(DEST_STAMPS) <= set(d)
    order = [s["start"], s["stop"], s["package-sent"], s["first-background"], s["background-done"],
             s["confirmed"], s["end"]]
    assert [x[0] for x in order] == sorted(x[0] for x in order)
    assert d["package-read"][0] <= d["listen"][0] <= d["run"][0]
    assert s["stop"][0] <= d["package-read"][0]  # one clock on one host
    ph = split(s, d)
    assert ph["switch-ms"] > 0 and ph["steady-MiBps"] > 0 and ph["steady-cpu-s-per-GiB"] >= 0
