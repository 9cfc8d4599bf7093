"""What `ferry` prints for people: 80 columns, a version, events in time order,
`ferry events` ending with its worker, honest words after Ctrl-C."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
from rich.console import Console

from ferry_migrate.engine import __version__
from ferry_migrate.engine.control.progress import ProgressView

from .test_cli import FERRY, ferry, workers  # noqa: F401 - fixtures

EVENT_LINE = re.compile(r"^  \+\s*(-?[\d.]+) s  (source|destination)")


def _env80():
    return dict(os.environ, COLUMNS="80")


def _run80(*args, timeout=120):
    return subprocess.run([*FERRY, *args], capture_output=True, text=True, timeout=timeout, env=_env80())


@pytest.mark.parametrize("args", [["reference"], ["demo", "--size", "16M"], ["demo", "--size", "16M", "--precopy"]])
def test_human_output_fits_80_columns(args):
    r = _run80(*args)
    assert r.returncode == 0, r.stderr
    long = [ln for ln in r.stdout.splitlines() if len(ln) > 80]
    assert not long, long
    if args == ["reference"]:
        from ferry_migrate.engine.params import PARAMETERS

        names = {ln.strip() for ln in r.stdout.splitlines()}
        assert set(PARAMETERS) <= names  # every name whole, on its own line


def test_demo_events_are_in_time_order_from_zero():
    r = _run80("demo", "--size", "16M")
    assert r.returncode == 0, r.stderr
    times = [float(m[1]) for m in map(EVENT_LINE.match, r.stdout.splitlines()) if m]
    assert len(times) >= 6 and times[0] == 0.0
    assert times == sorted(times), times


def test_events_held_and_sorted_across_the_two_streams():
    console = Console(width=80, record=True, force_terminal=False)
    view = ProgressView(console, True, fmt_event=lambda ev, t0, side: f"{ev['event']} {ev['t'] - t0:+.3f}")

    def ev(name, t):
        return {"event": name, "t": t, "timestamp": {"seconds": int(t), "microseconds": round(t % 1 * 1e6)}}

    with view:
        view.on_event("source", ev("B", 100.05))
        view.on_event("destination", ev("A", 100.00))  # published earlier, arrived later
        view.on_event("source", ev("C", 100.10))
    lines = console.export_text().splitlines()
    assert lines == ["A +0.000", "B +0.050", "C +0.100"]


def test_version():
    r = _run80("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"ferry {__version__}"
    import tomllib
    from pathlib import Path

    py = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert py["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ferry_migrate.engine.__version__"}


def test_events_ends_when_the_worker_shuts_down(ferry, workers):
    src = workers("source")
    p = subprocess.Popen([*FERRY, "events", src.control, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        assert "subscribed" in p.stderr.readline()
        assert ferry("call", src.control, "quit").returncode == 0
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0
    evs = [json.loads(ln) for ln in out.splitlines()]
    assert evs[-1]["event"] == "SHUTDOWN"


def test_ctrl_c_in_the_demo_leaves_no_empty_logs_behind(tmp_path):
    env = dict(_env80(), TMPDIR=str(tmp_path))
    p = subprocess.Popen([*FERRY, "demo", "--precopy", "--size", "32M", "--param", "max-bandwidth=1M"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            line = p.stdout.readline()
            assert line and time.monotonic() < deadline, "the demo never got to its events"
            if EVENT_LINE.match(line):
                break
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C on a terminal does
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, err
    assert "interrupted" in err
    for path in re.findall(r"logs kept: (.*)", err):
        for log in path.split(", "):
            assert os.path.getsize(log) > 0
    if "logs kept" not in err:
        assert not any(tmp_path.glob("ferry-demo-*")), list(tmp_path.iterdir())
