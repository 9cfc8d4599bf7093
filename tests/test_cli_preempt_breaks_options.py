"""`ferry demo` refuses preempt-write-breaks where it cannot take effect (plain precopy, or
postcopy without postcopy-preempt), as it refuses multifd-channels without multifd: one
error line naming the value, exit status 2, no worker started. The real `ferry` command."""
from __future__ import annotations

import subprocess
import sys

import pytest

FERRY = [sys.executable, "-m", "ferry_migrate.engine.cli"]


@pytest.mark.parametrize("args, hint", [
    (["--precopy", "--param", "preempt-write-breaks=socket"], "drop --precopy"),
    (["--cap", "postcopy-preempt=off", "--param", "preempt-write-breaks=socket"], "leave postcopy-ram"),
    (["--cap", "postcopy-ram=off", "--param", "preempt-write-breaks=socket"], "leave postcopy-ram"),
])
def test_preempt_write_breaks_without_preempt_is_refused(args, hint):
    r = subprocess.run([*FERRY, "demo", "--size", "32M", *args], capture_output=True, text=True, timeout=90)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ferry: error: "), r.stderr
    assert "'preempt-write-breaks' socket" in lines[0] and hint in lines[0], lines[0]
    assert r.stdout == ""


def test_bad_value_is_named_before_the_capability_check():
    r = subprocess.run([*FERRY, "demo", "--size", "32M", "--precopy", "--param", "preempt-write-breaks=fast"],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 2 and "'fast'" in r.stderr and "step, floor, idle, socket" in r.stderr, r.stderr
