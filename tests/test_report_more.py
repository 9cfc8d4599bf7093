"""The report's "more" lines (engine/control/report.py) leave out figures that were not
measured: a source killed before its first multifd sync round has multifd-sync-ms null."""
from __future__ import annotations

from ferry_migrate.engine.control.report import more_lines


def test_unmeasured_figures_are_left_out():
    src = {"status": "active", "multifd-sync-ms": None, "multifd-finish-ms": None, "multifd-sync-rounds": 0,
           "multifd-stop-cost-ms": 0.0, "precopy-pacing-rate": 0}
    lines = more_lines(src, {"status": "failed"}, 12)
    assert len(lines) == 1
    assert "None" not in lines[0]
    assert "multifd-sync-rounds 0" in lines[0] and "multifd-stop-cost-ms 0.0" in lines[0]
    assert "precopy-pacing-rate 0 (none)" in lines[0]


def test_a_side_with_nothing_measured_has_no_line():
    assert more_lines({"multifd-sync-ms": None}, {}, 12) == []
