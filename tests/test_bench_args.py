"""The benchmark tools refuse bad arguments before any run: one error line, the option and
the value, exit status 2, no traceback (tools/bench_args.py).

Each case runs the tool for real as a user would; a bad value that got past the parser
would start a migration (or print a traceback) instead of failing at once. Also: the
summary lines of bench_precopy name the whole case they compare.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")

CASES = [
    (["--size", "12Q"], "--size: size '12Q'"),
    (["--size", "0"], "--size: '0'"),
    (["--dirty-rate", "fast"], "--dirty-rate: size 'fast'"),
    (["--page-sizes", "3K"], "--page-sizes: '3K' is not a host page size"),
    (["--page-sizes", ","], "--page-sizes: ','"),
    (["--timeout", "-1"], "--timeout -1: expected more than 0 seconds"),
    (["--timeout", "0"], "--timeout 0: expected more than 0 seconds"),
]
EXTRA = {
    "bench_postcopy.py": [(["--burst", "y"], "argument --burst: size 'y'")],
    "bench_preempt.py": [(["--sndbuf", "x"], "argument --sndbuf: size 'x'"),
                         (["--rcvbuf", "-1"], "argument --rcvbuf: size '-1'")],
}


def _cases():
    for tool in ("bench_precopy.py", "bench_postcopy.py", "bench_preempt.py"):
        for args, want in CASES + EXTRA.get(tool, []):
            yield pytest.param(tool, args, want, id=f"{tool}{' '.join(args)}")


@pytest.mark.parametrize("tool,args,want", list(_cases()))
def test_a_bad_argument_is_one_error_line_naming_it(tool, args, want):
    r = subprocess.run([sys.executable, os.path.join(TOOLS, tool), "--quick", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert last.startswith(f"{tool}: error: ") and want in last, last
    assert r.stdout == ""  # refused before anything ran


def test_bench_precopy_names_each_multifd_comparison_by_its_whole_case(capsys):
    """The multifd/single-channel lines say which case they compare: paused and dirtying
    guests (and TLS) of one transport and page size each get their own, distinct line."""
    sys.path.insert(0, TOOLS)
    try:
        import bench_precopy
    finally:
        sys.path.remove(TOOLS)
    args = bench_precopy.parse_args(["--quick"])

    def case(workload, multifd, mibps, tls=False):
        return {"transport": "tcp", "page-size": 4096, "workload": workload, "page-checksums": True,
                "tls": tls, "multifd": multifd, "mibps": mibps, "mibps-worst": mibps, "mibps-best": mibps,
                "ceiling-mibps": 2000.0, "ratio": 0.5, "target": 0.4, "pass": True, "downtime-ms": 10,
                "passes": 3, "transferred": 256 << 20, "foreign-cpu-pct": 0.0}
    cases = [case(w, m, 100.0 * (1 + m) + (50 if w else 0), tls) for tls in (False, True)
             for w in (False, True) for m in (0, 2)]
    bench_precopy.print_table(cases, args)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("multifd 2/single channel")]
    assert len(lines) == 4 and len({ln.split(":")[0] for ln in lines}) == 4, lines
    assert any("tcp 4 KiB paused" in ln for ln in lines) and any("tcp+tls 4 KiB dirtying" in ln for ln in lines), lines
