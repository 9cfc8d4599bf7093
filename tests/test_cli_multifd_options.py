"""`ferry demo` and `ferry migrate` refuse multifd options that cannot take effect, before
any worker starts: multifd with a file: uri (no live destination to open channels to),
and the demo's multifd-channels without the multifd capability (its fresh workers have
multifd off, so the parameter alone would change nothing while the report showed it).

The real `ferry` command; refused at once means exit status 2, one error line naming the
value, and nothing on stdout.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

FERRY = [sys.executable, "-m", "ferry_migrate.engine.cli"]


def _ferry(*args):
    return subprocess.run([*FERRY, *args], capture_output=True, text=True, timeout=90)


@pytest.mark.parametrize("args, words", [
    (["demo", "--precopy", "--size", "32M", "--param", "multifd-channels=4"],
     ["'multifd-channels' 4", "--cap multifd"]),
    (["demo", "--precopy", "--size", "32M", "--cap", "multifd=off", "--param", "multifd-channels=4"],
     ["'multifd-channels' 4", "--cap multifd"]),
    (["demo", "--precopy", "--size", "32M", "--cap", "multifd", "--uri", "file:/nonexistent/guest.mig"],
     ["file:/nonexistent/guest.mig", "multifd needs a live destination"]),
    (["migrate", "--source", "tcp://127.0.0.1:1", "--destination", "tcp://127.0.0.1:2", "--cap", "multifd",
      "--uri", "file:/nonexistent/guest.mig"],
     ["file:/nonexistent/guest.mig", "multifd needs a live destination"]),
])
def test_multifd_options_that_cannot_take_effect_are_refused_before_starting(args, words):
    r = _ferry(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ferry: error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert r.stdout == ""
