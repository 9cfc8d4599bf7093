"""engine/testbed.py: network namespaces joined by a tbf-limited veth, a migration across
them (run_local_migration(netns=...)), teardown, and bench_preempt.py --quick.

Skipped, with the reason, where namespaces cannot be created (not root, no iproute2).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys

import pytest

from ferry_migrate.engine import testbed
from ferry_migrate.engine.local import GuestConfig, run_local_migration
from ferry_migrate.engine.testbed import LinkShape, Testbed, TestbedUnavailable
from ferry_migrate.engine.workload import WorkloadConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_REASON: list = []


def _unavailable() -> str | None:
    """Why namespaces cannot be used here (tried once per session), or None."""
    if not _REASON:
        _REASON.append(testbed.unavailable_reason(shaping=True))
    return _REASON[0]


@pytest.fixture
def bed():
    """Two hosts, a and b, one veth link with tbf at 1 Gbit/s each way."""
    if (why := _unavailable()) is not None:
        pytest.skip(f"network namespaces unavailable: {why}")
    with Testbed(shape=LinkShape("1gbit")) as tb:
        yield tb


def _ours() -> list[str]:
    return [n for n in testbed.list_namespaces() if n.startswith(f"ferry-{os.getpid()}-")]


# --- processes inside the namespaces ---------------------------------------------------

def _server(conn, ns: str, host: str) -> None:
    try:
        testbed.enter_netns(ns)
        srv = socket.socket()
        srv.bind((host, 0))
        srv.listen(1)
        srv.settimeout(20)
        conn.send(("port", srv.getsockname()[1]))
        s, peer = srv.accept()
        data = s.recv(64)
        s.sendall(b"pong:" + data)
        s.close()
        conn.send(("peer", peer[0]))
    except Exception as e:  # noqa: BLE001
        conn.send(("error", repr(e)))


def _client(conn, ns: str, host: str, port: int) -> None:
    try:
        testbed.enter_netns(ns)
        s = socket.create_connection((host, port), timeout=20)
        s.sendall(b"ping")
        conn.send(("reply", s.recv(64)))
        s.close()
    except Exception as e:  # noqa: BLE001
        conn.send(("error", repr(e)))


def _get(conn, what):
    assert conn.poll(30), f"no answer from the {what} process"
    kind, val = conn.recv()
    assert kind != "error", f"{what}: {val}"
    return val


def test_veth_addresses_reach_each_other(bed, no_child_processes):
    a, b = bed.address("a"), bed.address("b")
    assert (a, b) == ("10.231.1.1", "10.231.1.2")
    ctx = mp.get_context("spawn")
    sp, sc = ctx.Pipe()
    cp, cc = ctx.Pipe()
    server = ctx.Process(target=_server, args=(sc, bed.ns["b"], b), daemon=True)
    server.start()
    client = None
    try:
        port = _get(sp, "server")
        client = ctx.Process(target=_client, args=(cc, bed.ns["a"], b, port), daemon=True)
        client.start()
        assert _get(cp, "client") == b"pong:ping"
        assert _get(sp, "server") == a  # the connection came from a's veth address
    finally:
        for p in (client, server):
            if p is not None:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join(5)


def test_addresses_exist_only_inside_the_namespaces(bed):
    root = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    assert "10.231.1." not in root
    assert "10.231.1.2/24" in bed.exec("b", "ip", "-o", "-4", "addr").stdout
    assert testbed.namespace_address(bed.ns["b"]) == "10.231.1.2"


def test_tbf_limits_the_rate(bed, no_child_processes):
    for host in ("a", "b"):
        q = bed.qdisc_stats(host, "b" if host == "a" else "a")
        assert "tbf" in q and "rate 1Gbit" in q
    r = testbed.probe_link(bed.ns["a"], bed.ns["b"], bed.address("b"), pings=200, seconds=0.5)
    assert r["rtt-us"]["count"] == 200 and r["rtt-us"]["p50"] > 0
    # Shaped: never faster than the tbf rate (goodput is below it: headers count too).
    assert 0 < r["rate-Bps"] * 8 < 1.05e9, r  # (how far below depends on the load: no lower bound)


def test_postcopy_preempt_migration_across_namespaces(bed, no_child_processes):
    guest = GuestConfig(size=32 << 20, page_size=2 << 20, fill="pattern", workload=None,
                        dest_workload=WorkloadConfig(threads=1, pattern="random", batch=1, dirty_rate=8 << 20))
    src, dst = run_local_migration(guest=guest, caps={"postcopy-ram": True, "postcopy-preempt": True},
                                   params={"postcopy-after-percent": 5}, timeout=60,
                                   netns=(bed.ns["a"], bed.ns["b"]))
    assert src["status"] == "completed", src.get("error-desc")
    assert dst["status"] == "completed", dst.get("error-desc")
    assert src["digests"] == dst["digests"]
    assert src["guest-unchanged"] is True  # no workload on the source: its RAM must be as it was
    assert "postcopy-1" in src["channels"]
    # The bytes went through the shaped veth, not loopback.
    sent = int(bed.qdisc_stats("a", "b").split("Sent ")[1].split()[0])
    assert sent >= 32 << 20


def test_per_flow_shaping_holds_each_connection_and_multifd_crosses_it(no_child_processes):
    if (why := _unavailable()) is not None:
        pytest.skip(f"network namespaces unavailable: {why}")
    with Testbed(shape=LinkShape("400mbit", per_flow=True)) as bed:
        q = bed.qdisc_stats("a", "b")
        assert "htb" in q and "tbf" not in q
        classes = bed.exec("a", "tc", "class", "show", "dev", bed.link("a", "b").ifname).stdout
        assert classes.count("rate 400Mbit") == 256
        r = testbed.probe_link(bed.ns["a"], bed.ns["b"], bed.address("b"), pings=50, seconds=0.5)
        assert 0 < r["rate-Bps"] * 8 < 1.05 * 400e6, r  # one flow: never above its own rate
        guest = GuestConfig(size=32 << 20, fill="random", workload=None)
        src, dst = run_local_migration(guest=guest, caps={"multifd": True}, params={"multifd-channels": 3},
                                       timeout=120, netns=(bed.ns["a"], bed.ns["b"]))
        assert src["status"] == "completed", src.get("error-desc")
        assert src["digests"] == dst["digests"]
        assert all(src["channels"][f"multifd-{i}"]["bytes"] > 8 << 20 for i in (1, 2, 3))


def test_teardown_removes_everything():
    if (why := _unavailable()) is not None:
        pytest.skip(f"network namespaces unavailable: {why}")
    tb = Testbed(hosts=("x", "y", "z"), links=[("x", "y"), ("y", "z")], shape=LinkShape("100mbit"))
    with pytest.raises(RuntimeError, match="boom"):
        with tb:
            names = tb.namespaces()
            assert len(names) == 3 and all(n in testbed.list_namespaces() for n in names)
            assert tb.address("y", "z") == "10.231.2.1"
            raise RuntimeError("boom")
    assert not set(names) & set(testbed.list_namespaces())
    assert tb.ns == {}
    assert not _ours()


def test_cleanup_stale_removes_only_dead_runs():
    if (why := _unavailable()) is not None:
        pytest.skip(f"network namespaces unavailable: {why}")
    p = subprocess.Popen(["true"])
    p.wait()  # a pid that no longer runs
    dead = f"ferry-{p.pid}-0-stale"
    live = f"ferry-{os.getpid()}-999-live"
    try:
        for n in (dead, live):
            subprocess.run(["ip", "netns", "add", n], check=True)
        gone = testbed.cleanup_stale()
        assert dead in gone and live not in gone
        assert live in testbed.list_namespaces()
    finally:
        for n in (dead, live):
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def test_unavailable_reasons(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(TestbedUnavailable, match="root"):
        testbed.check_available()
    with pytest.raises(TestbedUnavailable, match="root"):
        Testbed().setup()


def test_enter_missing_namespace_fails_cleanly():
    with pytest.raises(FileNotFoundError):
        testbed.enter_netns("ferry-does-not-exist")
    testbed.enter_netns(None)  # no namespace: nothing happens


def test_parse_rate_and_shape():
    assert testbed.parse_rate("1gbit") == 10**9
    assert testbed.parse_rate("125mbps") == 10**9
    assert testbed.parse_rate(5_000_000) == 5_000_000
    with pytest.raises(ValueError, match="rate"):
        testbed.parse_rate("fast")
    s = LinkShape("1gbit", latency=0.01)
    assert s.burst_bytes == 62500 and s.queue_bytes == 1_250_000 + 62500
    assert s.tc_args()[:3] == ["tbf", "rate", "1000000000bit"]


def test_bench_preempt_quick_json():
    if (why := _unavailable()) is not None:
        pytest.skip(f"network namespaces unavailable: {why}")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_preempt.py"), "--quick", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["all-ok"] and not out["skipped-links"]
    names = {(c["link"], c["page-size"], c["case"]) for c in out["cases"]}
    for link in ("loopback", "netns"):
        for ps in (4096, 2 << 20):
            assert {(link, ps, "vanilla"), (link, ps, "preempt")} <= names
    assert out["floors-us"]["netns/2M"] > out["floors-us"]["netns/4K"] > 0
    assert set(out["targets"]["preempt"]) == {"p99<=2x-floor-4K", "vanilla/p99>=20x-4K", "p99<=2x-floor-2M"}
    left = set(out["links"]["netns"]["netns"]) & set(testbed.list_namespaces())
    assert not left, f"bench_preempt left namespaces behind: {left}"
