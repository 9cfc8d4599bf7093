"""What a user of the `ferry` command line meets when things go wrong, or go through a file.

Real programs: `ferry` runs as a subprocess (in its own process group, see
test_cli.py's fixtures) against real worker processes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from .test_cli import FERRY, ferry, workers  # noqa: F401 - fixtures

BAD_ENDPOINTS = ["127.0.0.1:5555", "tcp://127.0.0.1", "tcp://127.0.0.1:99999", "tcp://:5555", "ipc://"]


def _query(ferry, ep) -> dict:
    r = ferry("query", ep, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["migrate"]


def test_migrate_through_a_file(ferry, workers, tmp_path):
    """file: streams are written by the source first and loaded by the destination after."""
    src, dst = workers("source"), workers("destination")
    path = tmp_path / "guest.mig"
    r = ferry("migrate", "--source", src.control, "--destination", dst.control, "--uri", f"file:{path}", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    assert res["verified"] and res["uri"] == f"file:{path}"
    assert res["states"]["source"][-1] == "completed" and res["states"]["destination"][-1] == "completed"
    assert path.stat().st_size > 0


def test_demo_precopy_through_a_file(ferry, tmp_path):
    path = tmp_path / "demo.mig"
    r = ferry("demo", "--precopy", "--size", "16M", "--uri", f"file:{path}", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verified"] is True


def test_demo_postcopy_through_a_file_is_refused_up_front(ferry, tmp_path):
    r = ferry("demo", "--size", "16M", "--uri", f"file:{tmp_path}/x.mig")
    assert r.returncode == 2 and "--precopy" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("endpoint", BAD_ENDPOINTS)
@pytest.mark.parametrize("command", [["query"], ["events"], ["call", "{ep}", "query-status"],
                                     ["migrate", "--source", "{ep}", "--destination", "ipc:///nonexistent/d"],
                                     ["migrate", "--source", "ipc:///nonexistent/s", "--destination", "{ep}"]])
def test_malformed_endpoints_give_one_clean_line(ferry, command, endpoint):
    if "{ep}" in command:
        args = [a.replace("{ep}", endpoint) for a in command]
    else:
        args = [*command, endpoint]
    r = ferry(*args, "--timeout", "1")
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ferry: error:") and repr(endpoint) in lines[0], r.stderr
    assert "Migrating" not in r.stdout  # nothing started before the check


def test_destination_dying_mid_migration_shows_the_source_cause(ferry, workers):
    """The source's own error (its return path closed) is what the user reads; exit 1 (failed)."""
    src = workers("source", ["--size", "32M", "--workload-threads", "0"])
    dst = workers("destination", ["--size", "32M", "--workload-threads", "0"])
    p = subprocess.Popen([*FERRY, "migrate", "--source", src.control, "--destination", dst.control,
                          "--param", "max-bandwidth=2M", "--timeout", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while _query(ferry, src.control)["status"] != "active":
            assert time.monotonic() < deadline, "the migration never became active"
            time.sleep(0.1)
        dst.kill()
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 1, out + err
    assert "Traceback" not in err and "no reply to query-migrate" not in err
    assert "Result: FAILED" in out
    src_q = _query(ferry, src.control)
    assert src_q["status"] == "failed" and src_q["error-desc"]
    assert src_q["error-desc"] in out  # the real cause, from the source
    assert "stopped answering" in out  # and what happened to the destination


def test_worker_refuses_a_secret_key_others_can_read(ferry, tmp_path):
    keys = tmp_path / "k"
    assert ferry("keys", str(keys)).returncode == 0
    secret = keys / "server.key_secret"
    os.chmod(secret, 0o644)
    r = ferry("worker", "--role", "source", "--control", "tcp://127.0.0.1:0", "--curve-dir", str(keys),
              "--size", "4M", timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(secret) in r.stderr and "0644" in r.stderr and "chmod 600" in r.stderr
    # A controller's secret key too.
    os.chmod(secret, 0o600)
    os.chmod(keys / "client.key_secret", 0o640)
    r = ferry("query", "tcp://127.0.0.1:1", "--curve-dir", str(keys), "--timeout", "1")
    assert r.returncode == 2 and "client.key_secret" in r.stderr and "0640" in r.stderr


def test_keys_are_owner_only_whatever_the_umask(tmp_path):
    keys = tmp_path / "k"
    r = subprocess.run(["sh", "-c", 'umask 000 && exec "$@"', "sh", *FERRY, "keys", str(keys)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for name in ("server.key_secret", "client.key_secret"):
        assert os.stat(keys / name).st_mode & 0o777 == 0o600, name
