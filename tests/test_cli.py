"""The `ferry` command line, run as a real program.

Commands run in their own process group, so a check that nothing is left of
it (no worker outliving `ferry demo`) is exact, and a finalizer kills the group
whatever happens.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ferry_migrate.engine.control.spawn import spawn_worker
from .conftest import group_gone

FERRY = [sys.executable, "-m", "ferry_migrate.engine.cli"]


@pytest.fixture
def ferry():
    """ferry(*args, timeout=) -> CompletedProcess; asserts the command's process group is gone after."""
    groups = []

    def run(*args, timeout=90):
        p = subprocess.Popen([*FERRY, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        groups.append(p.pid)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            pytest.fail(f"ferry {' '.join(args)} timed out\n{out}\n{err}")
        deadline = time.monotonic() + 5
        while not group_gone(p.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group_gone(p.pid), f"ferry {args[0]} left processes behind"
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    yield run
    for g in groups:
        if not group_gone(g):
            os.killpg(g, signal.SIGKILL)


@pytest.fixture
def workers(tmp_path):
    ws = []

    def start(role, options=()):
        w = spawn_worker(role, f"ipc://{tmp_path}/{role}.ctl", ["--size", "8M", *options],
                         log_path=str(tmp_path / f"{role}.log"), new_session=True)
        ws.append(w)
        w.wait_ready(30)
        return w

    yield start
    for w in ws:
        w.kill()
        assert group_gone(w.pid)


def test_demo_runs_to_a_verified_migration(ferry):
    r = ferry("demo", "--size", "32M")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "Result: VERIFIED" in out
    for words in ("source worker", "destination worker", "How it works", "states", "setup -> active",
                  "passes", "downtime", "throughput", "channel precopy", "RSS", "CPU"):
        assert words in out, words


def test_demo_precopy_only(ferry):
    r = ferry("demo", "--json", "--size", "16M", "--precopy")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["verified"] is True
    assert res["states"]["source"] == ["setup", "active", "device", "completed"]


def test_demo_report_shows_postcopy_figures(ferry):
    r = ferry("demo", "--size", "32M")
    assert r.returncode == 0, r.stdout + r.stderr
    for words in ("postcopy-active", "pages requested by the destination's guest", "blocktime", "preemptions",
                  "channel postcopy"):
        assert words in r.stdout, words


def test_demo_json_with_guest_and_migration_options(ferry):
    r = ferry("demo", "--json", "--size", "16M", "--page-size", "2M", "--blocks", "2", "--workload-threads", "2",
              "--workload-pattern", "random", "--dirty-rate", "16M", "--stream", "unix",
              "--param", "downtime-limit=200", "--cap", "return-path=on")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["verified"] is True and res["result"] == "verified"
    assert res["uri"].startswith("unix:")
    assert res["parameters"]["downtime-limit"] == 200
    # The demo switches to postcopy with preemption by default.
    assert res["states"]["destination"] == ["setup", "active", "postcopy-active", "completed"]
    assert {"postcopy-ram", "postcopy-preempt"} <= {c["capability"] for c in res["capabilities"] if c["state"]}
    assert res["states"]["source"][-1] == "completed"
    src, dst = res["source"], res["destination"]
    assert src["digests"] == dst["digests"] and len(src["digests"]) == 2
    assert [b["page-size"] for b in res["status-before"]["source"]["guest"]["blocks"]] == [2 << 20] * 2
    assert res["status-before"]["source"]["guest"]["workload"]["threads"] == 2


@pytest.mark.parametrize("args, words", [
    (["--param", "downtime-limit=9999999"], ["downtime-limit", "0 to 2000000", "9999999"]),
    (["--param", "max-bandwidth=fast"], ["max-bandwidth", "fast"]),
    (["--cap", "no-such-cap"], ["no-such-cap", "unknown"]),
    (["--size", "lots"], ["size"]),
    (["--page-size", "3K"], ["page size", "3K"]),
    (["--size", "10M", "--page-size", "2M", "--blocks", "2"], ["10M", "2 block"]),
])
def test_demo_rejects_bad_options_before_starting(ferry, args, words):
    r = ferry("demo", *args)
    assert r.returncode == 2
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_query_call_migrate_and_events_json(ferry, workers, tmp_path):
    src, dst = workers("source"), workers("destination")
    q = json.loads(ferry("query", src.control, "--json").stdout)
    assert q["status"]["role"] == "source" and q["migrate"]["status"] == "none"

    r = ferry("call", src.control, "migrate-set-parameters", '{"downtime-limit": 120}', "--json")
    assert json.loads(r.stdout) == {"id": 1, "return": {}}
    r = ferry("call", src.control, "migrate-set-parameters", '{"downtime-limit": -1}', "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["class"] == "GenericError"
    r = ferry("call", src.control, "no-such-verb")
    assert r.returncode == 1 and "CommandNotFound" in r.stderr

    events = subprocess.Popen([*FERRY, "events", dst.control, "--json", "--until-final"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # `ferry events` says so on stderr once its subscription is live.
        assert "subscribed" in events.stderr.readline()
        r = ferry("migrate", "--source", src.control, "--destination", dst.control, "--json")
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["verified"] and res["parameters"]["downtime-limit"] == 120
        lines, _ = events.communicate(timeout=30)
    finally:
        if events.poll() is None:
            os.killpg(events.pid, signal.SIGKILL)
            events.wait()
    evs = [json.loads(line) for line in lines.splitlines()]
    assert [e["data"]["status"] for e in evs if e["event"] == "MIGRATION"][-1] == "completed"

    r = ferry("query", dst.control)
    assert r.returncode == 0 and "migration completed" in r.stdout


def test_query_unreachable_worker_fails_fast(ferry, tmp_path):
    r = ferry("query", f"ipc://{tmp_path}/nobody.ctl", "--timeout", "1")
    assert r.returncode == 3 and "no reply" in r.stderr


def test_keys_refuses_to_overwrite(ferry, tmp_path):
    d = str(tmp_path / "k")
    assert ferry("keys", d).returncode == 0
    r = ferry("keys", d)
    assert r.returncode == 2 and "--force" in r.stderr
    r = ferry("keys", d, "--force", "--json")
    assert r.returncode == 0 and set(json.loads(r.stdout)) >= {"server-secret", "client-secret"}
    assert oct(os.stat(os.path.join(d, "server.key_secret")).st_mode & 0o777) == "0o600"


def test_user_guide_tables_are_current():
    from pathlib import Path

    from ferry_migrate.engine.cli import embed_reference

    guide = Path(__file__).resolve().parent.parent / "docs" / "user-guide.md"
    text = guide.read_text()
    assert embed_reference(text) == text, (
        "docs/user-guide.md's verb/capability/parameter tables are out of date with engine/params.py or "
        "engine/control/protocol.py: run `ferry reference --write-doc docs/user-guide.md`")
