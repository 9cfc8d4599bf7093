"""The live progress display: remaining bytes, dirty rate, expected downtime, ETA (as
`virsh domjobinfo` shows them), within 80 columns; and really drawn on a terminal."""
from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
from rich.console import Console

from ferry_migrate.engine.control.progress import ProgressView, progress_figures, progress_lines

MiB = 1 << 20


def q(status="active", total=256 * MiB, remaining=97 * MiB, mbps=6815.0, dirty_pages=8166, dt=25, passes=3):
    out = {"status": status, "ram": {"total": total, "remaining": remaining, "mbps": mbps,
                                      "dirty-pages-rate": dirty_pages, "transferred": 158 * MiB,
                                      "dirty-sync-count": passes, "page-size": 4096}}
    if dt is not None:
        out["expected-downtime"] = dt
    return out


def test_figures_in_bytes_and_seconds():
    f = progress_figures(q())
    assert f["remaining"] == 97 * MiB and f["done"] == 159 * MiB
    assert f["dirty-rate"] == 8166 * 4096
    assert f["rate"] == pytest.approx(6815e6 / 8)
    assert f["eta"] == pytest.approx(97 * MiB / (6815e6 / 8 - 8166 * 4096))
    assert f["expected-downtime"] == 25


def test_no_eta_while_precopy_does_not_converge():
    assert progress_figures(q(mbps=100.0, dirty_pages=100_000))["eta"] is None
    assert "ETA --:--" in progress_lines(progress_figures(q(mbps=100.0, dirty_pages=100_000)))[1]


def test_postcopy_ignores_the_dirty_rate_and_completed_has_nothing_left():
    assert progress_figures(q(status="postcopy-active"))["dirty-rate"] == 0
    f = progress_figures(q(status="completed", remaining=5))
    assert f["remaining"] == 0 and f["eta"] == 0


@pytest.mark.parametrize("sq", [q(), q(total=1 << 40, remaining=(1 << 40) - 1, mbps=0.5, dirty_pages=0, passes=999),
                                q(status="postcopy-active", dt=None), q(status="setup", mbps=0)])
def test_drawn_within_80_columns(sq):
    console = Console(width=80, force_terminal=True, record=True, color_system=None)
    console.print(ProgressView(console, True).renderable(sq))
    lines = console.export_text().rstrip("\n").splitlines()
    assert len(lines) == 2
    assert all(len(ln.rstrip()) <= 80 for ln in lines), lines
    text = "\n".join(lines)
    for words in ("left", "ETA", "dirty", "MiB/s", "pass"):
        assert words in text, (words, text)
    if sq.get("expected-downtime") is not None:
        assert "expected downtime" in text


def test_ferry_demo_draws_progress_on_a_terminal(tmp_path):
    """A throttled migration on a pseudo-terminal shows the progress lines while it runs."""
    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="80", LINES="40", TERM="xterm")
    p = subprocess.Popen([sys.executable, "-m", "ferry_migrate.engine.cli", "demo", "--precopy", "--size", "32M",
                          "--param", "max-bandwidth=12M"], stdin=slave, stdout=slave, stderr=slave, env=env,
                         start_new_session=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 1.0)
            if r:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            elif p.poll() is not None:
                break
        assert p.wait(30) == 0, out[-2000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait()
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    assert re.search(r"MiB left, ETA \d+:\d\d", text), text[-3000:]
    assert re.search(r"dirty [\d.]+ MiB/s", text)
    assert "Result: VERIFIED" in text
