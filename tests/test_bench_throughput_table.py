"""The --throughput table of tools/bench_postcopy.py keeps its columns aligned whatever the
width of a case name (``preempt-socket``) or of a spread (``[858-1242]``)."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import bench_postcopy  # noqa: E402

MIB2 = 2 << 20


def case(name, phase, spread, ok=True):
    return {"link": "loopback", "page-size": MIB2, "size": 256 << 20, "case": name, "ok": ok,
            "phase-MiBps": phase, "phase-MiBps-spread": spread, "overall-MiBps": phase,
            "overall-MiBps-spread": spread, "ratio-to-precopy": 1.0, "total-time-ms": 240.0,
            "error": None if ok else "boom"}


def test_columns_line_up_for_long_case_names_and_wide_spreads():
    cases = [case("precopy", 1241.6, [1241.6, 1242.0]), case("preempt", 514.2, [5.0, 9.0]),
             case("preempt-socket-2ch", 858.5, [858.0, 12345.0])]
    lines = bench_postcopy.throughput_table(cases, 256 << 20)
    head, rule, rows = lines[0], lines[1], lines[2:]
    assert len(rule) == len(head)
    assert {len(r) for r in rows} == {len(head)}
    # Right-aligned figure columns: the first spread ends in the same column on every row,
    # and the case name column is as wide as its longest name.
    assert len({r.index("]") for r in rows}) == 1
    assert all(r.split()[3] == c["case"] for r, c in zip(rows, cases))
    assert head.index("phase MiB/s") > rows[2].index("preempt-socket-2ch") + len("preempt-socket-2ch") - 1


def test_a_failed_case_keeps_its_row_and_error():
    cases = [case("precopy", 1241.6, [1241.6, 1242.0]),
             {"link": "loopback", "page-size": MIB2, "case": "preempt", "phase-MiBps": None, "error": "boom"}]
    lines = bench_postcopy.throughput_table(cases, 256 << 20)
    assert lines[-1].split()[3] == "preempt" and lines[-1].endswith("ERROR boom")


def test_a_bad_breaks_mode_is_refused_before_any_run():
    import subprocess
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_postcopy.py"), "--quick", "--throughput",
                        "--breaks", "socket,nope"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    assert "... loopback" not in r.stderr  # no case started
    last = r.stderr.strip().splitlines()[-1]
    assert "--breaks 'nope'" in last and "step, floor, idle, socket" in last, last
