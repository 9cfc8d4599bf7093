"""`ferry` CLI output: a closed stdout pipe gives no traceback; a paused migration names its cause."""
from __future__ import annotations

import os
import subprocess
import sys


def test_closed_stdout_pipe_is_no_traceback():
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write: every write fails with EPIPE
    try:
        p = subprocess.run([sys.executable, "-m", "ferry_migrate.engine.cli", "reference"], stdout=w,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 1, (p.returncode, p.stderr)


def test_a_requested_pause_is_named_not_the_other_sides_closed_stream():
    from types import SimpleNamespace

    from ferry_migrate.engine.cli import _paused_on_request

    closed = "truncated stream on channel precopy: a RAM record needs 8 bytes"
    out = SimpleNamespace(source={"error-desc": "paused by migrate-pause"}, destination={"error-desc": closed})
    assert _paused_on_request(out) == "paused by migrate-pause"
    out = SimpleNamespace(source={"error-desc": closed}, destination={"error-desc": "paused by migrate-pause"})
    assert _paused_on_request(out) == "paused by migrate-pause"
    assert _paused_on_request(SimpleNamespace(source={"error-desc": closed}, destination={})) is None
