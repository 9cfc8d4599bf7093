"""The control plane end to end: real `ferry worker` processes, real ZeroMQ sockets.

Every worker runs in its own process group; the ``spawn`` fixture's finalizer
kills each group and checks that nothing of it is left, whatever the test did.
Only ipc:// and 127.0.0.1 endpoints are used.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import zmq
import zmq.asyncio

from ferry_migrate.engine.control import protocol as P
from ferry_migrate.engine.control.auth import create_keys
from ferry_migrate.engine.control.client import CommandFailed, ControlClient, ControlError
from ferry_migrate.engine.control.driver import run_migration
from ferry_migrate.engine.control.spawn import spawn_worker
from ferry_migrate.engine.params import CAPABILITIES
from .conftest import group_gone

GUEST = ["--size", "16M", "--dirty-rate", "8M"]
# 1 MiB/s against a guest dirtying 8 MiB/s: precopy never converges, so the migration stays
# active until the test acts on it (however slow a loaded machine makes the test).
SLOW = {"max-bandwidth": 1 << 20}
UNIMPLEMENTED_CAP = next((n for n, (_, impl, _) in CAPABILITIES.items() if not impl), None)


@pytest.fixture
def spawn(tmp_path):
    """spawn(role, options=..., control=...) -> a ready WorkerProcess in its own process group."""
    started = []

    def _spawn(role, options=(), control=None, ready=True):
        n = len(started)
        control = control or f"ipc://{tmp_path}/{role[0]}{n}.ctl"
        w = spawn_worker(role, control, [*GUEST, *options], log_path=str(tmp_path / f"{role}{n}.log"),
                         new_session=True)
        started.append(w)
        if ready:
            w.wait_ready(30)
        return w

    yield _spawn
    for w in started:
        if w.alive():
            w.kill()
        else:
            w.stop()
        # The worker led its group: nothing it started may be left either.
        deadline = time.monotonic() + 5
        while not group_gone(w.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not group_gone(w.pid):
            os.killpg(w.pid, signal.SIGKILL)
            pytest.fail(f"{w.role} worker group {w.pid} still had processes")


async def wait_final(c: ControlClient, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        q = await c.call("query-migrate")
        if q["status"] in ("completed", "failed", "cancelled"):
            return q
        assert time.monotonic() < deadline, f"still {q['status']}"
        await asyncio.sleep(0.05)


async def wait_status(c: ControlClient, want: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        q = await c.call("query-migrate")
        if q["status"] == want:
            return q
        assert q["status"] not in ("completed", "failed", "cancelled"), q
        assert time.monotonic() < deadline, f"never reached {want}: {q['status']}"
        await asyncio.sleep(0.02)


async def collect_until_final(stream, timeout: float = 60) -> list[dict]:
    out = []
    deadline = time.monotonic() + timeout
    while True:
        ev = await stream.next(max(0.1, deadline - time.monotonic()))
        assert ev is not None, f"no final event; got {out}"
        out.append(ev)
        if ev["event"] == "MIGRATION" and ev["data"]["status"] in ("completed", "failed", "cancelled"):
            return out


def states(events):
    return [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]


# --- a full migration ---------------------------------------------------------------

async def test_migration_through_the_control_plane(spawn):
    src, dst = spawn("source"), spawn("destination")
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        s_events, d_events = await s.events(), await d.events()
        inc = await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        assert inc["uri"].startswith("tcp:127.0.0.1:") and not inc["uri"].endswith(":0")
        assert await s.call("migrate", {"uri": inc["uri"]}) == {}
        s_ev, d_ev = await asyncio.gather(collect_until_final(s_events), collect_until_final(d_events))
        sq, dq = await wait_final(s), await wait_final(d)

    assert states(s_ev) in (["setup", "active", "device", "completed"], ["setup", "active", "completed"])
    # device: loaded and verified, waiting for the source's verdict before the guest may run here.
    assert states(d_ev) == ["setup", "active", "device", "completed"]
    passes = [e["data"]["pass"] for e in s_ev if e["event"] == "MIGRATION_PASS"]
    assert passes == list(range(1, len(passes) + 1)) and passes
    assert passes[-1] == sq["ram"]["dirty-sync-count"]
    # Events carry QMP timestamps, in publication order.
    times = [P.event_time(e) for e in s_ev]
    assert times == sorted(times)
    assert all(set(e["timestamp"]) == {"seconds", "microseconds"} for e in s_ev + d_ev)
    # The source only completes once the destination's digests matched; the controller checks again.
    assert sq["status"] == dq["status"] == "completed"
    assert sq["digests"] and sq["digests"] == dq["digests"]
    assert len(sq["passes"]) == sq["ram"]["dirty-sync-count"]
    for q, role in ((sq, "source"), (dq, "destination")):
        assert q["role"] == role
        w = q["worker"]
        assert w["rss"] > 16 << 20 and w["threads"] >= 2 and w["cpu-user"] + w["cpu-system"] > 0


async def test_driver_over_unix_stream_with_caps_and_params(spawn, tmp_path):
    src, dst = spawn("source"), spawn("destination")
    seen = []
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        out = await run_migration(s, d, uri=f"unix:{tmp_path}/m.sock", caps={"return-path": True},
                                  params={"downtime-limit": 250, "max-bandwidth": 512 << 20},
                                  on_progress=lambda sq, dq: seen.append(sq["status"]))
        params = await s.call("query-migrate-parameters")
        caps = {c["capability"]: c["state"] for c in await d.call("query-migrate-capabilities")}
    assert out.verified, out.to_dict()
    assert out.uri == f"unix:{tmp_path}/m.sock"
    assert params["downtime-limit"] == 250 and params["max-bandwidth"] == 512 << 20
    assert caps["return-path"] is True
    assert seen and seen[-1] == "completed"
    assert out.states("destination")[-1] == "completed"
    assert not os.path.exists(tmp_path / "m.sock")


async def test_several_clients_and_replies_by_id(spawn):
    src = spawn("source")
    async with ControlClient(src.control) as a, ControlClient(src.control) as b:
        verbs = ["query-status", "query-migrate", "query-migrate-parameters", "query-migrate-capabilities",
                 "query-commands"] * 6
        replies = await asyncio.gather(*[(a if i % 2 else b).request(v) for i, v in enumerate(verbs)])
    ids = {}
    for v, r in zip(verbs, replies):
        ret = r["return"]
        # Each reply is the one for its own request: its shape fits the verb.
        if v == "query-status":
            assert ret["role"] == "source"
        elif v == "query-migrate":
            assert ret["status"] == "none"
        elif v == "query-migrate-parameters":
            assert "downtime-limit" in ret
        elif v == "query-migrate-capabilities":
            assert {"capability": "return-path", "state": True} in ret
        else:
            assert {"name": "migrate"} in ret and {"name": "migrate-incoming"} not in ret
        ids.setdefault(r["id"], 0)
        ids[r["id"]] += 1
    assert all(n <= 2 for n in ids.values())  # ids are per client


# --- bad input -------------------------------------------------------------------------

async def test_bad_input_gets_errors_and_the_worker_keeps_serving(spawn):
    src, dst = spawn("source"), spawn("destination")
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        async def raw(frames, klass, *words, client=s):
            r = await client.send_raw(frames)
            assert set(r) == {"id", "error"}, r
            assert r["error"]["class"] == klass, r
            for w in words:
                assert w in r["error"]["desc"], (w, r)
            return r

        await raw([b"\xc1\x00garbage"], "GenericError", "not valid msgpack")
        await raw([msgpack.packb([1, "migrate"])], "GenericError", "must be a map")
        await raw([msgpack.packb({"execute": "frobnicate", "id": 1 << 40})], "CommandNotFound", "frobnicate")
        await raw([msgpack.packb({"execute": "migrate"})], "GenericError", "'uri' is missing")
        await raw([msgpack.packb({"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:1", "x": 1}})],
                  "GenericError", "'x' is unexpected")
        await raw([msgpack.packb({"execute": "migrate", "arguments": {"uri": 4444}})],
                  "GenericError", "'uri'", "string")
        await raw([b"a", b"b", b"c"], "GenericError", "one msgpack frame")
        await raw([b""], "GenericError", "not valid msgpack")
        await raw([b"\x00" * (P.MAX_REQUEST_BYTES + 10)], "GenericError", "larger than")
        r = await raw([msgpack.packb({"execute": "quit", "id": "q1", "bogus": 1})], "GenericError", "'bogus'")
        assert r["id"] == "q1"

        async def err(client, verb, args, *words):
            with pytest.raises(CommandFailed) as ei:
                await client.call(verb, args)
            assert ei.value.klass == "GenericError"
            for w in words:
                assert w in ei.value.desc, (w, ei.value.desc)

        # Parameters: engine.params names the field, the value and the range.
        await err(s, "migrate-set-parameters", {"downtime-limit": 2_000_001},
                  "'downtime-limit'", "0 to 2000000", "2000001")
        await err(s, "migrate-set-parameters", {"max-bandwidth": -1}, "'max-bandwidth'", "-1")
        await err(s, "migrate-set-parameters", {"downtime-limit": "soon"}, "'downtime-limit'", "soon")
        await err(s, "migrate-set-parameters", {"downtime-limit": True}, "'downtime-limit'")
        await err(s, "migrate-set-parameters", {"no-such-param": 1}, "'no-such-param'", "unknown")
        # All or nothing: a good value next to a bad one is not applied.
        await err(s, "migrate-set-parameters", {"downtime-limit": 50, "max-bandwidth": -5}, "max-bandwidth")
        assert (await s.call("query-migrate-parameters"))["downtime-limit"] == 300
        if UNIMPLEMENTED_CAP:
            await err(s, "migrate-set-capabilities",
                      {"capabilities": [{"capability": UNIMPLEMENTED_CAP, "state": True}]},
                      UNIMPLEMENTED_CAP, "not implemented")
        await err(s, "migrate-set-capabilities", {"capabilities": [{"capability": "warp-drive", "state": True}]},
                  "'warp-drive'", "unknown")
        await err(s, "migrate-start-postcopy", None, "postcopy-ram")
        await err(s, "migrate-pause", None, "no migration")
        await err(d, "migrate-recover", {"uri": "tcp:127.0.0.1:0"}, "postcopy-paused", "none")
        await err(s, "migrate", {"uri": "tcp:127.0.0.1:1", "resume": True}, "postcopy-paused", "none")
        await err(s, "migrate-incoming", {"uri": "tcp:127.0.0.1:0"}, "destination", "source")
        await err(d, "migrate", {"uri": "tcp:127.0.0.1:1"}, "source", "destination")
        await err(d, "migrate-start-postcopy", None, "source")
        await err(s, "migrate", {"uri": "carrier-pigeon:far"}, "unknown scheme")
        await err(d, "migrate-incoming", {"uri": "tcp:127.0.0.1:99999"}, "port")
        await err(d, "migrate-incoming", {"uri": "tcp:203.0.113.1:0"}, "cannot listen")

        # Still serving, state untouched.
        st = await s.call("query-status")
        assert st["status"] == "running" and st["migration"] == "none"
        assert (await d.call("query-migrate"))["status"] == "none"
    assert src.alive() and dst.alive()


async def test_requests_in_the_wrong_state(spawn):
    src, dst = spawn("source"), spawn("destination")
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        await s.call("migrate-set-parameters", SLOW)
        inc = await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        with pytest.raises(CommandFailed, match="already been started"):
            await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        await s.call("migrate", {"uri": inc["uri"]})
        await wait_status(s, "active")
        with pytest.raises(CommandFailed, match="in progress"):
            await s.call("migrate", {"uri": inc["uri"]})
        # As in QEMU, some parameters take effect on a running migration; the others are refused.
        with pytest.raises(CommandFailed, match="postcopy-channels cannot change during a migration"):
            await s.call("migrate-set-parameters", {"postcopy-channels": 2, "downtime-limit": 10})
        await s.call("migrate-set-parameters", {"downtime-limit": 10})
        assert (await s.call("query-migrate-parameters"))["downtime-limit"] == 10
        with pytest.raises(CommandFailed, match="in progress"):
            await d.call("migrate-set-capabilities", {"capabilities": [{"capability": "return-path", "state": True}]})
        with pytest.raises(CommandFailed, match="postcopy-ram"):
            await s.call("migrate-start-postcopy")

        # Cancel: the source's guest goes on running; the destination gives up on the stream.
        await s.call("migrate-cancel")
        assert (await wait_final(s))["status"] == "cancelled"
        assert (await wait_final(d))["status"] in ("failed", "cancelled")
        assert (await s.call("query-status"))["status"] == "running"

        # Both may start over, and this time it completes.
        await s.call("migrate-set-parameters", {"max-bandwidth": 0})
        inc = await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        await s.call("migrate", {"uri": inc["uri"]})
        sq, dq = await wait_final(s), await wait_final(d)
        assert sq["status"] == dq["status"] == "completed" and sq["digests"] == dq["digests"]
        with pytest.raises(CommandFailed, match="already migrated"):
            await s.call("migrate", {"uri": inc["uri"]})
        with pytest.raises(CommandFailed, match="the guest arrived here"):
            await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        assert (await s.call("query-status"))["status"] == "postmigrate"
        # The roles swap with the guest: it can go back the way it came.
        assert (await d.call("query-status"))["role"] == "source"
        back = await s.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        await d.call("migrate", {"uri": back["uri"]})
        bq, bs = await wait_final(d), await wait_final(s)
        assert bq["status"] == bs["status"] == "completed" and bq["digests"] == bs["digests"]
        assert (await s.call("query-status"))["status"] == "running"  # autostart
        assert (await d.call("query-status"))["status"] == "postmigrate"


async def test_failed_connection_is_reported(spawn, tmp_path):
    src = spawn("source")
    async with ControlClient(src.control) as s:
        events = await s.events()
        await s.call("migrate", {"uri": f"unix:{tmp_path}/nobody-listens.sock"})
        ev = await collect_until_final(events)
        q = await wait_final(s)
    assert states(ev)[-1] == "failed" and q["status"] == "failed"
    assert "cannot connect" in q["error-desc"]


# --- the controller may go away --------------------------------------------------------

async def test_controller_disappearing_does_not_stop_the_migration(spawn):
    src, dst = spawn("source"), spawn("destination")
    ctl = subprocess.Popen([sys.executable, "-m", "ferry_migrate.engine.cli", "migrate", "--source", src.control,
                            "--destination", dst.control, "--param", "max-bandwidth=1M", "--json"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
            await wait_status(s, "active")
            os.killpg(ctl.pid, signal.SIGKILL)
            ctl.wait(10)
            assert (await s.call("query-migrate"))["status"] == "active"
            # 1 MiB/s never converges: lift the limit, and it completes without the controller.
            await s.call("migrate-set-parameters", {"max-bandwidth": 0})
            sq, dq = await wait_final(s), await wait_final(d)
    finally:
        if ctl.poll() is None:
            os.killpg(ctl.pid, signal.SIGKILL)
            ctl.wait(10)
    assert sq["status"] == dq["status"] == "completed"
    assert sq["digests"] == dq["digests"]


# --- CURVE -----------------------------------------------------------------------------

async def test_curve_refuses_clients_without_the_keys(spawn, tmp_path):
    keys, other = tmp_path / "keys", tmp_path / "other"
    create_keys(keys)
    create_keys(other)
    w = spawn("source", ["--curve-dir", str(keys)], control="tcp://127.0.0.1:0")
    assert w.ready["curve"] is True

    async with ControlClient(w.control, curve_dir=str(keys)) as c:
        st = await c.call("query-status")
        assert st["curve"] is True
        events = await c.events()  # the event stream is CURVE too

    for client_keys in (None, str(other)):
        async with ControlClient(w.control, curve_dir=client_keys, timeout=2) as c:
            with pytest.raises(ControlError):
                await c.call("query-status")

    # A plain ZeroMQ client, not ours: its request is never answered.
    ctx = zmq.asyncio.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(w.control)
        await sock.send(P.encode_request("query-status", None, 1))
        assert await sock.poll(1500) == 0
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.subscribe(b"")
        sub.connect(w.events)
        # An event is published (the worker's own client asks for a hello), the intruder gets nothing.
        async with ControlClient(w.control, curve_dir=str(keys)) as c:
            await c.events()
        assert await sub.poll(500) == 0
    finally:
        ctx.destroy(0)
    del events
    assert w.alive()


def test_worker_refuses_non_loopback_without_curve(tmp_path):
    # Refused before anything is bound: the check runs first.
    r = subprocess.run([sys.executable, "-m", "ferry_migrate.engine.cli", "worker", "--role", "source",
                        "--control", "tcp://0.0.0.0:0", "--size", "4M"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "CURVE" in r.stderr and "ferry keys" in r.stderr


# --- clean exits ----------------------------------------------------------------------

async def test_quit_exits_cleanly_and_removes_ipc_files(spawn, tmp_path):
    w = spawn("destination")
    path = w.control[len("ipc://"):]
    assert os.path.exists(path) and os.path.exists(path + ".events")
    async with ControlClient(w.control) as c:
        events = await c.events()
        assert await c.call("quit") == {}
        ev = await events.next(5)
    assert ev["event"] == "SHUTDOWN" and ev["data"]["reason"] == "host-qmp-quit"
    assert w.proc.wait(10) == 0
    assert not os.path.exists(path) and not os.path.exists(path + ".events")


async def test_sigterm_mid_migration_cancels_and_exits_cleanly(spawn):
    src, dst = spawn("source"), spawn("destination")
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        await s.call("migrate-set-parameters", SLOW)
        inc = await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        events = await s.events()
        await s.call("migrate", {"uri": inc["uri"]})
        await wait_status(s, "active")
        src.proc.send_signal(signal.SIGTERM)
        ev = await collect_until_final(events, timeout=20)
        assert states(ev)[-2:] == ["cancelling", "cancelled"]
        assert src.proc.wait(15) == 0
        assert (await wait_final(d))["status"] in ("failed", "cancelled")
        dst.proc.send_signal(signal.SIGTERM)
        assert dst.proc.wait(15) == 0
    for w in (src, dst):
        assert not os.path.exists(w.control[len("ipc://"):])


async def test_second_worker_cannot_steal_a_live_ipc_endpoint(spawn):
    w = spawn("source")
    w2 = spawn("source", control=w.control, ready=False)
    assert w2.proc.wait(60) == 2
    assert "in use" in w2.log_tail()
    async with ControlClient(w.control) as c:
        assert (await c.call("query-status"))["worker"]["pid"] == w.pid


async def test_ready_line_names_live_endpoints(spawn):
    """The ready line (JSON) names endpoints that work: the control endpoint answers as
    this worker, and the events endpoint publishes this worker's events."""
    w = spawn("destination", ["--events", "tcp://127.0.0.1:0"])
    assert w.ready["role"] == "destination" and w.ready["pid"] == w.pid
    assert w.ready["events"].startswith("tcp://127.0.0.1:") and not w.ready["events"].endswith(":0")
    async with ControlClient(w.ready["control"]) as c:
        st = await c.call("query-status")
        assert st["worker"]["pid"] == w.pid and st["events"] == w.ready["events"]
        assert (await c.call("query-migrate"))["status"] == "none"
        await c.events(timeout=30)  # returns once a subscription to that endpoint is live


@pytest.mark.skipif(not CAPABILITIES["postcopy-ram"][1], reason="postcopy-ram not implemented by the engine")
async def test_start_postcopy_through_the_control_plane(spawn):
    src, dst = spawn("source"), spawn("destination", ["--workload-threads", "1"])
    caps = {"capabilities": [{"capability": "postcopy-ram", "state": True}]}
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        await s.call("migrate-set-capabilities", caps)
        with pytest.raises(CommandFailed, match="no migration"):
            await s.call("migrate-start-postcopy")
        await d.call("migrate-set-capabilities", caps)
        await s.call("migrate-set-parameters", SLOW)
        events = await s.events()
        inc = await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        await s.call("migrate", {"uri": inc["uri"]})
        await wait_status(s, "active")
        assert await s.call("migrate-start-postcopy") == {}
        ev = await collect_until_final(events)
        sq, dq = await wait_final(s), await wait_final(d)
        assert (await d.call("query-status"))["status"] == "running"  # the guest runs on the destination now
    assert states(ev)[-2:] == ["postcopy-active", "completed"]
    assert sq["status"] == dq["status"] == "completed" and sq["digests"] == dq["digests"]


async def test_cancel_refused_in_postcopy_and_postcopy_bandwidth_set_live(spawn):
    """The user guide: migrate-cancel is refused in postcopy; max-postcopy-bandwidth changes
    on a running migration. Held at 1 MiB/s, postcopy waits for the test to act."""
    src, dst = spawn("source"), spawn("destination", ["--workload-threads", "1"])
    caps = {"capabilities": [{"capability": "postcopy-ram", "state": True}]}
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        await s.call("migrate-set-capabilities", caps)
        await d.call("migrate-set-capabilities", caps)
        await s.call("migrate-set-parameters", {**SLOW, "max-postcopy-bandwidth": 1 << 20})
        inc = await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        await s.call("migrate", {"uri": inc["uri"]})
        await wait_status(s, "active")
        await s.call("migrate-start-postcopy")
        await wait_status(s, "postcopy-active")
        with pytest.raises(CommandFailed, match="refused in postcopy"):
            await s.call("migrate-cancel")
        assert (await s.call("query-migrate"))["status"] == "postcopy-active"
        await s.call("migrate-set-parameters", {"max-postcopy-bandwidth": 0})
        assert (await s.call("query-migrate-parameters"))["max-postcopy-bandwidth"] == 0
        sq, dq = await wait_final(s), await wait_final(d)
    assert sq["status"] == dq["status"] == "completed" and sq["digests"] == dq["digests"]
