"""`ferry ... | head`: a reader that goes away early gives no traceback."""
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
