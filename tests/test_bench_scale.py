"""tools/bench_scale.py for real at its smallest: two sizes between spawned processes, and
one postcopy migration between two `ferry worker` processes (`--via demo`).

No performance asserts: figures depend on the machine. What is checked: the JSON
shape, digests equal, and that the RSS sampler found both workers (each holds at
least the guest, which both fill: random contents on the source, preallocated on the
destination). The exit code is 0 or 1 (1: a worker over the RSS limit, which at
these tiny sizes is mostly the interpreter's own memory).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "bench_scale.py")
MIB = 1 << 20


def _run(*args: str, timeout: float = 240) -> dict:
    r = subprocess.run([sys.executable, TOOL, *args, "--repeat", "1", "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode in (0, 1), r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _check(row: dict, size: int) -> None:
    assert row["size"] == size and row["digests-equal"]
    (run,) = row["runs"]
    assert set(run["rss-peak"]) == {"source", "destination"}
    assert all(v >= size for v in run["rss-peak"].values()), run["rss-peak"]
    assert run["rss-limit"] == int(0.03 * size) + 64 * MIB
    assert run["transferred"] >= size and run["mibps"] > 0
    assert row["s-per-gib-spread"][0] <= row["s-per-gib"] <= row["s-per-gib-spread"][1]


def test_bench_scale_sizes_local():
    d = _run("--sizes", "32M,64M")
    assert d["mode"] == "precopy" and d["page-size"] == 4096 and d["prealloc"]
    assert [r["size"] for r in d["sizes"]] == [32 * MIB, 64 * MIB]
    for r in d["sizes"]:
        _check(r, r["size"])


def test_bench_scale_postcopy_between_workers():
    d = _run("--sizes", "64M", "--via", "demo", "--mode", "postcopy")
    (row,) = d["sizes"]
    _check(row, 64 * MIB)
    assert row["runs"][0]["postcopy-bytes"] > 0  # it did switch to postcopy
