"""The QMP listener of a worker, driven by QEMU's own Python QMP library (``qemu.qmp``).

Real worker processes with ``--qmp unix:PATH`` and ``--qmp tcp:127.0.0.1:0``; a
whole migration runs over QMP alone (migrate-incoming, migrate, MIGRATION
events), and the protocol's rules (greeting, negotiation, ids, errors, split
and merged messages) are checked on a raw socket. The stream splitter is
checked with hypothesis.
"""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry_migrate.engine.control.qmp import JSONStream, QMPAddressError, parse_qmp_address
from ferry_migrate.engine.control.spawn import spawn_worker

qmp = pytest.importorskip("qemu.qmp")
from qemu.qmp import ExecuteError, QMPClient  # noqa: E402


@pytest.fixture
def qmp_workers(tmp_path):
    ws = []

    def start(role, qmp_args):
        opts = ["--size", "8M", "--workload-threads", "0"]
        for a in qmp_args:
            opts += ["--qmp", a]
        w = spawn_worker(role, f"ipc://{tmp_path}/{role}.ctl", opts, log_path=str(tmp_path / f"{role}.log"),
                         new_session=True)
        ws.append(w)
        w.wait_ready(30)
        return w

    yield start
    for w in ws:
        w.kill()


async def _until_event(client: QMPClient, name: str, status: str, timeout: float = 60.0) -> dict:
    async def wait():
        async for ev in client.events:
            if ev["event"] == name and ev["data"].get("status") == status:
                return ev
    return await asyncio.wait_for(wait(), timeout)


async def test_a_migration_driven_over_qmp_with_the_qemu_library(qmp_workers, tmp_path):
    src = qmp_workers("source", [f"unix:{tmp_path}/src.qmp", "tcp:127.0.0.1:0"])
    dst = qmp_workers("destination", ["tcp:127.0.0.1:0"])
    assert src.ready["qmp"][0] == f"unix:{tmp_path}/src.qmp"
    tcp = src.ready["qmp"][1]
    assert tcp.startswith("tcp:127.0.0.1:") and not tcp.endswith(":0")

    s, d, s2 = QMPClient("src"), QMPClient("dst"), QMPClient("src-tcp")
    await s.connect(f"{tmp_path}/src.qmp")
    host, port = dst.ready["qmp"][0][4:].rsplit(":", 1)
    await d.connect((host, int(port)))
    host2, port2 = tcp[4:].rsplit(":", 1)
    await s2.connect((host2, int(port2)))
    try:
        assert s.greeting.QMP.version["qemu"]["major"] == 7
        assert "ferry" in s.greeting.QMP.version["package"]
        status = await s.execute("query-status")
        assert status["role"] == "source" and status["qmp"] == src.ready["qmp"]
        assert {"name": "migrate"} in await s.execute("query-commands")
        await s.execute("migrate-set-parameters", {"downtime-limit": 150})
        assert (await s2.execute("query-migrate-parameters"))["downtime-limit"] == 150  # same worker, other socket

        with pytest.raises(ExecuteError) as e:
            await s.execute("no-such-verb")
        assert e.value.error_class == "CommandNotFound"
        with pytest.raises(ExecuteError) as e:
            await s.execute("migrate", {"uri": 5})
        assert e.value.error_class == "GenericError" and "uri" in e.value.error.error.desc
        with pytest.raises(ExecuteError) as e:
            await d.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
        assert "destination" in e.value.error.error.desc

        src_done = asyncio.ensure_future(_until_event(s, "MIGRATION", "completed"))
        dst_done = asyncio.ensure_future(_until_event(d, "MIGRATION", "completed"))
        uri = (await d.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}))["uri"]
        await s.execute("migrate", {"uri": uri})
        ev = await src_done
        await dst_done
        assert set(ev["timestamp"]) == {"seconds", "microseconds"}
        sq, dq = await s.execute("query-migrate"), await d.execute("query-migrate")
        assert sq["status"] == dq["status"] == "completed"
        assert sq["digests"] == dq["digests"]
    finally:
        for c in (s, d, s2):
            await c.disconnect()


async def test_quit_over_qmp_sends_shutdown(qmp_workers, tmp_path):
    w = qmp_workers("source", [f"unix:{tmp_path}/w.qmp"])
    c = QMPClient("w")
    await c.connect(f"{tmp_path}/w.qmp")
    try:
        await c.execute("quit")

        async def shutdown():
            async for ev in c.events:  # every event since connect is buffered here
                if ev["event"] == "SHUTDOWN":
                    return ev
        ev = await asyncio.wait_for(shutdown(), 30)
        assert ev["data"]["reason"] == "host-qmp-quit"
    finally:
        await c.disconnect()
    assert w.proc.wait(30) == 0


def test_the_legacy_sync_client_and_qmp_shell(qmp_workers, tmp_path):
    from qemu.qmp.legacy import QEMUMonitorProtocol

    qmp_workers("destination", [f"unix:{tmp_path}/d.qmp"])
    m = QEMUMonitorProtocol(f"{tmp_path}/d.qmp")
    greeting = m.connect(negotiate=True)
    assert greeting["QMP"]["capabilities"] == []
    assert m.cmd("query-status")["role"] == "destination"
    assert m.cmd_obj({"execute": "no-such-verb"})["error"]["class"] == "CommandNotFound"
    m.close()
    r = subprocess.run([sys.executable, "-m", "qemu.qmp.qmp_shell", f"{tmp_path}/d.qmp"],
                       input="query-status\nquery-migrate\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"role": "destination"' in r.stdout and '"status": "none"' in r.stdout


def _raw(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(path)
    f = s.makefile("rb")
    return s, f


def _read(f) -> dict:
    line = f.readline()
    assert line.endswith(b"\r\n"), line
    return json.loads(line)


def test_protocol_rules_on_a_raw_socket(qmp_workers, tmp_path):
    qmp_workers("source", [f"unix:{tmp_path}/r.qmp"])
    s, f = _raw(f"{tmp_path}/r.qmp")
    try:
        assert "QMP" in _read(f)
        s.sendall(b'{"execute": "query-status", "id": "a"}')
        r = _read(f)
        assert r["error"]["class"] == "CommandNotFound" and "qmp_capabilities" in r["error"]["desc"] and r["id"] == "a"
        s.sendall(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
        assert "not available" in _read(f)["error"]["desc"]
        s.sendall(b'{"execute": "qmp_capabilities"}')
        assert _read(f) == {"return": {}}
        # Split anywhere and run together: a streaming parser, as QEMU's.
        s.sendall(b'{"execute": "query-st')
        s.sendall(b'atus", "id": {"any": ["json", 1]}}{"execute": "query-migrate", "id": 2}')
        r1, r2 = _read(f), _read(f)
        assert r1["id"] == {"any": ["json", 1]} and r1["return"]["role"] == "source"
        assert r2["id"] == 2 and r2["return"]["status"] == "none"
        s.sendall(b'{"execute" nonsense}')
        assert _read(f)["error"]["class"] == "GenericError"
        s.sendall(b'[1, 2]')
        assert "JSON object" in _read(f)["error"]["desc"]
        s.sendall(b'{"execute": "query-status", "bogus": 1}')
        assert "bogus" in _read(f)["error"]["desc"]
        s.sendall(b'{"execute": "qmp_capabilities"}')
        assert _read(f)["error"]["class"] == "CommandNotFound"
        s.sendall(b'{"execute": "query-status"}')
        assert "id" not in (r := _read(f)) and r["return"]["role"] == "source"  # still serving
    finally:
        f.close()
        s.close()


@pytest.mark.parametrize("text, words", [
    ("tcp:10.1.2.3:4444", "loopback"), ("tcp:0.0.0.0:4444", "loopback"), ("tcp:127.0.0.1", "HOST:PORT"),
    ("tcp:127.0.0.1:70000", "0..65535"), ("unix:", "empty"), ("4444", "unix:PATH"),
    ("unix:/tmp/x,wait=on", "wait=on"),
])
def test_bad_qmp_addresses(text, words):
    with pytest.raises(QMPAddressError, match=words):
        parse_qmp_address(text)


def test_qmp_address_options_as_qemu_writes_them():
    assert str(parse_qmp_address("unix:/tmp/q.sock,server=on,wait=off")) == "unix:/tmp/q.sock"
    assert str(parse_qmp_address("tcp:localhost:4444,server,nowait")) == "tcp:localhost:4444"


def test_worker_refuses_a_non_loopback_qmp_address_at_once(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ferry_migrate.engine.cli", "worker", "--role", "source", "--control",
                        f"ipc://{tmp_path}/w.ctl", "--qmp", "tcp:0.0.0.0:4444"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "loopback" in r.stderr and "Traceback" not in r.stderr


_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                       max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=6), _values, min_size=1, max_size=4), min_size=1, max_size=4),
       st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8), st.sampled_from(["", " ", "\r\n"]))
def test_stream_splitter_any_chunking(msgs, cuts, sep):
    data = sep.join(json.dumps(m, ensure_ascii=False) for m in msgs).encode()
    js, out, pos, i = JSONStream(), [], 0, 0
    while pos < len(data):
        n = cuts[i % len(cuts)]
        out += js.feed(data[pos:pos + n])
        pos, i = pos + n, i + 1
    assert out == msgs


def test_stream_splitter_recovers_after_garbage():
    js = JSONStream()
    out = js.feed(b'{"a": tru}')
    assert len(out) == 1 and isinstance(out[0], ValueError)
    assert js.feed(b'{"b": 1}') == [{"b": 1}]
    out = js.feed(b"\xff\xfe{}")
    assert isinstance(out[0], ValueError)
    assert js.feed(b'{"c": 2}') == [{"c": 2}]
