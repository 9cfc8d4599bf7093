"""`ferry testbed up|down`, run as the real program: namespaces, links, workers inside them.

Skipped, with the reason, where namespaces cannot be created (not root, no
iproute2, no tbf). Each test uses its own state file, so its namespaces
(``ferry-tb<hash of the state file>-h<N>``) are its own.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import psutil
import pytest

from ferry_migrate.engine import testbed
from ferry_migrate.engine.testbed_cli import _tag

FERRY = [sys.executable, "-m", "ferry_migrate.engine.cli"]

_REASON: list = []


def _unavailable() -> str | None:
    if not _REASON:
        _REASON.append(testbed.unavailable_reason(shaping=True))
    return _REASON[0]


@pytest.fixture
def state(tmp_path):
    """A state file path; whatever a test leaves up is taken down afterwards."""
    if (why := _unavailable()) is not None:
        pytest.skip(f"network namespaces unavailable: {why}")
    path = str(tmp_path / "tb.json")
    yield path
    if os.path.exists(path):
        ferry("testbed", "down", "--state", path)
    left = [n for n in testbed.list_namespaces() if n.startswith(f"ferry-tb{_tag(path)}-")]
    for n in left:
        subprocess.run(["ip", "netns", "del", n], check=False)
    assert not left, f"namespaces left behind: {left}"


def ferry(*args, timeout=90, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*FERRY, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def ours(path: str) -> list[str]:
    return [n for n in testbed.list_namespaces() if n.startswith(f"ferry-tb{_tag(path)}-")]


def test_up_migrate_down_leaves_nothing(state):
    r = ferry("testbed", "up", "--rate", "1gbit", "--size", "16M", "--state", state, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc == json.loads(open(state).read())
    assert sorted(doc["namespaces"]) == ["h1", "h2"] and sorted(doc["namespaces"].values()) == sorted(ours(state))
    assert doc["rate-bps"] == 1_000_000_000 and doc["links"][0]["rate-bps"] == 1_000_000_000
    workers = {w["host"]: w for w in doc["workers"]}
    assert workers["h1"]["role"] == "source" and workers["h2"]["role"] == "destination"
    pids = [w["pid"] for w in doc["workers"]]
    assert all(psutil.pid_exists(p) for p in pids)
    # The tbf qdisc is on the veth inside each namespace.
    q = subprocess.run(["tc", "-n", doc["namespaces"]["h1"], "qdisc", "show"], capture_output=True, text=True)
    assert "tbf" in q.stdout
    # Each worker really runs inside its namespace: its net namespace is the recorded one.
    for w in doc["workers"]:
        assert os.stat(f"/proc/{w['pid']}/ns/net").st_ino == os.stat(f"/var/run/netns/{w['namespace']}").st_ino

    # A second `up` on the same state file is refused.
    r = ferry("testbed", "up", "--state", state)
    assert r.returncode == 2 and "already up" in r.stderr

    # Migrate between the testbed's workers over the veth, with the printed address.
    uri = doc["migration"]["h2"]["uri"]
    assert uri == f"tcp:{doc['links'][0]['addresses']['h2']}:0"
    r = ferry("migrate", "--source", workers["h1"]["control"], "--destination", workers["h2"]["control"],
              "--uri", uri, "--param", "plaintext-off-loopback=true", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["verified"] and out["uri"].startswith(uri[:-1])

    r = ferry("testbed", "down", "--state", state, "--json")
    assert r.returncode == 0, r.stderr
    gone = json.loads(r.stdout)
    assert {v["result"] for v in gone["removed"]["workers"].values()} == {"stopped"}
    assert set(gone["removed"]["namespaces"].values()) == {"deleted"}
    assert not ours(state)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert not os.path.exists(state) and not os.path.exists(doc["dir"])
    # Down again: nothing to do.
    r = ferry("testbed", "down", "--state", state)
    assert r.returncode == 0 and "nothing to do" in r.stdout


def test_human_output_and_three_hosts(state):
    r = ferry("testbed", "up", "--hosts", "3", "--size", "8M", "--workload-threads", "0", "--state", state)
    assert r.returncode == 0, r.stderr
    assert "ferry migrate --source ipc://" in r.stdout and "--uri tcp:10.231." in r.stdout
    doc = json.loads(open(state).read())
    assert len(doc["links"]) == 3 and [w["role"] for w in doc["workers"]] == ["source", "destination", "destination"]
    assert sorted(doc["migration"]) == ["h2", "h3"]
    r = ferry("testbed", "down", "--state", state)
    assert r.returncode == 0 and "testbed down: done" in r.stdout
    assert not ours(state)


@pytest.mark.parametrize("args,words", [
    (["--hosts", "1"], "--hosts 1"),
    (["--rate", "fast"], "rate 'fast'"),
    (["--size", "3M", "--page-size", "2M"], "guest size"),
])
def test_up_refuses_bad_options_before_creating_anything(state, args, words):
    r = ferry("testbed", "up", "--state", state, *args)
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert not ours(state) and not os.path.exists(state)


def test_hosts_sweep_uses_the_testbed_workers(state, tmp_path):
    r = ferry("testbed", "up", "--size", "16M", "--state", state, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    w = {x["host"]: x for x in doc["workers"]}
    (tmp_path / "hosts.toml").write_text(f"""
name = "on-testbed"
link = "hosts"
repeat = 2

[hosts]
source = "{w['h1']['control']}"
destination = "{w['h2']['control']}"
uri = "{doc['migration']['h2']['uri']}"

[fixed]
warmup = 0.2
cooldown = 0.0
downtime-limit = 100
""")
    r = ferry("experiment", "run", "hosts.toml", "--out", "out", cwd=tmp_path)
    # A worker migrates one guest: the second run finds the workers used up,
    # is recorded as failed with the reason, and the sweep ends normally.
    assert r.returncode == 1, r.stderr
    first = json.loads((tmp_path / "out" / "runs" / "c000-r0.json").read_text())
    second = json.loads((tmp_path / "out" / "runs" / "c000-r1.json").read_text())
    assert first["status"] == "completed", first["error"]
    assert first["link"]["kind"] == "hosts" and first["uri"].startswith("tcp:10.231.1.2:")
    assert first["source"]["digests"] == first["destination"]["digests"]
    assert first["guest"]["size"] == 16 << 20
    assert second["status"] == "failed" and "not ready for a new migration" in second["error"]
    # The runner started no worker and stopped none: the testbed's are still there.
    assert all(psutil.pid_exists(x["pid"]) for x in doc["workers"])

    async def roles():
        from ferry_migrate.engine.control.client import ControlClient

        out = []
        for x in doc["workers"]:
            async with ControlClient(x["control"]) as c:
                out.append((await c.call("query-status"))["migration"])
        return out
    assert asyncio.run(roles()) == ["completed", "completed"]
    r = ferry("testbed", "down", "--state", state)
    assert r.returncode == 0
