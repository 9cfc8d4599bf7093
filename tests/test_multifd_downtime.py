"""Multifd's part of the downtime, a destination refusing multifd over file:, and a
multifd-channels mismatch named on both sides without the channel hello.

- engine/downtime.stop_estimate as a pure function: the fixed part (multifd sync
  rounds) is in the expected downtime and in the stop decision.
- MultifdSender over socket pairs with many channels: every pass end measures a
  sync round, and the stop counts two of them.
- A migration with 32 multifd channels: the expected downtime it reports holds
  the sync rounds it counted.
- migrate-incoming file:... on a real worker with multifd on: refused at once,
  naming the capability and the scheme, as the source's migrate does.
- multifd-channels 4 against 2 and 2 against 4, with and without a
  migration-secret: both sides' errors name the parameter and both values.
"""
from __future__ import annotations

import socket
import threading

import pytest

from ferry_migrate.channels import constants as C
from ferry_migrate.channels import multifd_codec as M
from ferry_migrate.channels.qemufile import QEMUFileWriter
from ferry_migrate.channels.transport import SocketTransport
from ferry_migrate.engine import states as ST
from ferry_migrate.engine.control.client import CommandFailed, ControlClient
from ferry_migrate.engine.downtime import stop_estimate
from ferry_migrate.engine.multifd_send import MultifdSender
from ferry_migrate.engine.ram import GuestRAM

from .test_channel_security import SECRET, _completes, _config, _dest, _source
from .test_control import spawn  # noqa: F401 - a fixture

MiB = 1 << 20
WAIT = 120


# --- the estimate, pure ----------------------------------------------------------------------

def test_the_expected_downtime_holds_the_sync_rounds():
    # 30 MiB left at 100 MiB/s: 0.3 s of bytes; the rounds add 0.05 s.
    exp, fits = stop_estimate(30 * MiB, 100 * MiB, 0.3, 0.0)
    assert exp == pytest.approx(0.3) and fits
    exp, fits = stop_estimate(30 * MiB, 100 * MiB, 0.3, 0.05)
    assert exp == pytest.approx(0.35) and not fits  # the bytes alone fit, with the rounds they do not
    exp, fits = stop_estimate(25 * MiB, 100 * MiB, 0.3, 0.05)
    assert exp == pytest.approx(0.30) and fits


def test_rounds_over_the_limit_never_stop_and_say_by_how_much():
    exp, fits = stop_estimate(0, 100 * MiB, 0.3, 0.5)
    assert not fits and exp == pytest.approx(0.5)
    assert stop_estimate(0, 0.0, 0.3, 0.1) == (0.1, True)  # nothing left, bandwidth unknown: the rounds
    assert stop_estimate(1, 0.0, 0.3, 0.0) == (None, False)
    with pytest.raises(ValueError, match="fixed downtime -1"):
        stop_estimate(0, 1.0, 0.3, -1)


# --- sync rounds measured by the sender -------------------------------------------------------

def _drain(sock: socket.socket, got: list) -> None:
    while True:
        b = sock.recv(1 << 20)
        if not b:
            return
        got.append(len(b))


def test_every_pass_end_measures_a_sync_round_and_the_stop_counts_two():
    n = 32
    ram = GuestRAM.create(4 * MiB, 4096)
    ram.fill("random")
    pairs = [socket.socketpair() for _ in range(n)]
    got = [[] for _ in range(n)]
    readers = [threading.Thread(target=_drain, args=(b, g), daemon=True) for (_, b), g in zip(pairs, got)]
    for t in readers:
        t.start()
    sender = MultifdSender([QEMUFileWriter(SocketTransport(a), name=f"multifd-{i + 1}")
                            for i, (a, _) in enumerate(pairs)])
    try:
        assert sender.sync_round is None and sender.stop_cost(wait=0) == 0.0
        blk = ram.blocks[0]
        for p in range(0, blk.npages, 3):  # scattered single pages, as a final pass sends
            sender.send_range(blk, p, p + 1)
        sender.sync()
        first = sender.stop_cost(wait=WAIT)  # waits for the round of that sync
        assert sender.sync_rounds == 1 and sender.sync_round > 0 and first == 2 * sender.sync_round
        sender.sync()
        sender.finish(WAIT)
        assert sender.sync_rounds == 2
        assert sender.figures()["multifd-sync-rounds"] == 2 and sender.figures()["multifd-sync-ms"] > 0
        assert sender.normal_pages == len(range(0, blk.npages, 3))
        # Short runs share packets: 342 single pages in one packet, not one packet per page
        # (every channel also sent two SYNC packets and a FIN).
        assert sum(ch.packets for ch in sender.channels) - 3 * n == 1
    finally:
        sender.shutdown()
        for a, b in pairs:
            a.close()
        for t in readers:
            t.join(5)
        for _, b in pairs:
            b.close()


def test_a_migration_with_many_channels_reports_the_rounds_in_its_expected_downtime():
    cfg = _config()
    cfg.set_capabilities({"multifd": True})
    cfg.set_parameters({"multifd-channels": 32})
    d, uri = _dest(cfg)
    s = _source(cfg, uri)
    try:
        assert s.wait(WAIT) == "completed", (s.stats.error, d.stats.error)
        q = s.query()
        assert q["multifd-sync-rounds"] >= 1 and q["multifd-stop-cost-ms"] > 0, q
        # ms, rounded down (query-migrate leaves out an expected downtime under 1 ms)
        assert q.get("expected-downtime", 0) >= q["multifd-stop-cost-ms"] - 1, q
    finally:
        _completes(s, d)


# --- multifd over file: is refused by the destination too ------------------------------------

async def test_a_destination_refuses_multifd_over_a_file_at_once(spawn, tmp_path):  # noqa: F811
    dst, src = spawn("destination"), spawn("source")
    path = tmp_path / "guest.bin"
    async with ControlClient(dst.control) as d, ControlClient(src.control) as s:
        for c in (d, s):
            await c.call("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
        with pytest.raises(CommandFailed) as dei:
            await d.call("migrate-incoming", {"uri": f"file:{path}"})
        with pytest.raises(CommandFailed) as sei:
            await s.call("migrate", {"uri": f"file:{path}"})
        assert "multifd needs a live source: not possible with a file: uri" in str(dei.value), dei.value
        assert "multifd needs a live destination: not possible with a file: uri" in str(sei.value), sei.value
        assert (await d.call("query-migrate"))["status"] == "none"
        assert not path.exists()
        # Without multifd the same destination takes the file.
        await d.call("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": False}]})
        await d.call("migrate-incoming", {"uri": f"file:{path}"})
        await d.call("migrate-cancel")


# --- multifd-channels differ, with and without the channel hello ------------------------------

@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
@pytest.mark.parametrize("src_n,dst_n", [(4, 2), (2, 4)])
def test_a_channel_count_mismatch_names_the_parameter_and_both_values(src_n, dst_n, secret):
    extra = {"migration-secret": secret} if secret else {}

    def cfg(n):
        c = _config(**extra, **{"liveness-timeout": 10})
        c.set_capabilities({"multifd": True})
        c.set_parameters({"multifd-channels": n})
        return c

    words = f"multifd-channels: source {src_n}, destination {dst_n}"
    d, uri = _dest(cfg(dst_n))
    s = _source(cfg(src_n), uri)
    try:
        assert s.wait(WAIT) == "failed"
        assert words in s.stats.error and "destination refused the migration" in s.stats.error, s.stats.error
        if secret:
            # The hello refused it: nothing reached the destination's state, and its query says why.
            q = d.query()
            assert q["status"] == ST.SETUP and "error-desc" not in q
            assert words in q["incoming-refused"], q.get("incoming-refused")
        else:
            # Without the hello the destination learns it from the init records, fails, and says it too.
            assert d.wait(WAIT) == "failed", d.status
            assert words in d.stats.error and "multifd-" in d.stats.error, d.stats.error
    finally:
        if d.status not in ST.FINAL_STATES:
            d.cancel()
        s.quit()
        d.quit()


def test_an_init_reply_names_both_counts():
    with pytest.raises(M.MultifdChannelsMismatch, match="multifd-channels: source 4, destination 2") as ei:
        M.parse_init_reply(M.encode_init_reply(C.FERRY_MULTIFD_REPLY_CHANNELS, 2), 4)
    assert (ei.value.source, ei.value.destination) == (4, 2)
    M.parse_init_reply(M.encode_init_reply(C.FERRY_MULTIFD_REPLY_OK, 4), 4)
    with pytest.raises(M.MultifdError, match="status 7"):
        M.parse_init_reply(M.encode_init_reply(7, 4), 4)
    with pytest.raises(M.MultifdError, match="init reply magic"):
        M.parse_init_reply(bytes(16), 4)


def test_the_downtime_tool_reports_the_rounds():
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "tools", "bench_multifd_downtime.py"), "--channels", "3",
                        "--size", "32M", "--repeat", "1", "--dirty-rate", "4M", "--json"],
                       cwd=root, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 0, r.stderr
    run = json.loads(r.stdout.strip().splitlines()[-1])["runs"][0]
    assert run["status"] == "completed" and run["channels"] == 3, run
    assert run["multifd-sync-ms"] is not None and run["stop-cost-ms"] is not None and run["phases"]["send"] >= 0
    assert "downtime ms" in r.stdout and "expected ms" in r.stdout
