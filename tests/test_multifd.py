"""Multifd between real `ferry worker` processes (loopback), with the fault relay between them.

- precopy with multifd-channels 1, 2, 4 and with postcopy + preempt: 2 MiB host
  pages, a guest that keeps rewriting the same (hot) pages, and multifd
  channel 1 stalled again and again by the relay, so that its packets of one
  pass arrive while the other channels already sent the next pass: without
  the sync point an old copy would overwrite a newer one and the digests
  would differ. Every channel carries pages; digests equal.
- with postcopy: no multifd page is placed after POSTCOPY_LISTEN (the
  destination's per-channel last placement is before LISTEN, every channel
  ended with FIN); a cut of the main channel in postcopy pauses both and the
  recovery (which opens no multifd channel) verifies.
- bad input on a multifd channel (page count beyond the packet size, offset
  outside the block, a packet for a pass already synced: bytes flipped by the
  relay) and a multifd channel cut in precopy: the migration fails on both
  sides with the named error, the source's guest runs on, and a later
  migration of it verifies.
"""
from __future__ import annotations


import pytest

from ferry_migrate.channels import constants as C
from ferry_migrate.engine.control.client import ControlClient
from ferry_migrate.engine.control.driver import run_migration

from .faultrelay import TO_DST, FaultRelay, wait_state
from .test_control import spawn, wait_final  # noqa: F401 - spawn is a fixture

MiB = 1 << 20
WAIT = 120  # s: a generous bound on any state change, never the thing under test
# 2 MiB host pages; the guest rewrites a hot set of its pages all the time.
GUEST = ["--size", "32M", "--page-size", "2M", "--workload-threads", "1", "--workload-pattern", "hotset", "--dirty-rate", "16M",
         "--workload-hot-fraction", "0.25"]
DEST_WORKLOAD = ["--workload-threads", "1", "--workload-pattern", "random", "--dirty-rate", "4M"]
# Throttled so that there are several passes while channel 1 is being stalled.
PRECOPY_PARAMS = {"max-bandwidth": 24 * MiB, "downtime-limit": 300}
STALLS = (1 * MiB, 2 * MiB, 3 * MiB, 5 * MiB, 8 * MiB)  # offsets of channel 1 where it stalls
STALL = 0.3  # s each


def _caps(caps: dict) -> dict:
    return {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]}


async def _configure(s: ControlClient, d: ControlClient, caps: dict, params: dict) -> str:
    for c in (s, d):
        await c.call("migrate-set-capabilities", _caps(caps))
        await c.call("migrate-set-parameters", params)
    return (await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}))["uri"]


def _stall_channel(relay: FaultRelay, conn: int) -> None:
    for at in STALLS:
        relay.stall(conn, TO_DST, STALL, at=at)


def _check_multifd(sq: dict, dq: dict, n: int) -> None:
    assert sq["status"] == "completed", (sq.get("error-desc"), dq.get("error-desc"))
    assert dq["status"] == "completed", dq.get("error-desc")
    assert sq["digests"] and sq["digests"] == dq["digests"]
    for i in range(1, n + 1):
        name = f"multifd-{i}"
        assert sq["channels"][name]["bytes"] > 0 and sq["channels"][name]["normal"] > 0, sq["channels"]
        assert dq["channels"][name]["bytes"] == sq["channels"][name]["bytes"], (sq["channels"], dq["channels"])
        assert dq["channels"][name]["done"], dq["channels"]  # ended with FIN


@pytest.mark.parametrize("n", [1, 2, 4])
async def test_precopy_multifd_with_a_delayed_channel(spawn, n):  # noqa: F811
    src, dst = spawn("source", GUEST), spawn("destination", GUEST)
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        inc = await _configure(s, d, {"multifd": True}, {**PRECOPY_PARAMS, "multifd-channels": n})
        with FaultRelay(inc) as relay:
            _stall_channel(relay, 1)  # connection 0 is the main channel, 1..n the multifd channels
            await s.call("migrate", {"uri": relay.uri})
            sq, dq = await wait_final(s, timeout=WAIT), await wait_final(d, timeout=WAIT)
            assert any(f.kind == "stall" and f.conn == 1 for f in relay.fired), relay.fired
        _check_multifd(sq, dq, n)
        assert sq["ram"]["dirty-sync-count"] >= 2
        # The main channel carried no page: every page went on the multifd channels.
        assert sq["channels"]["precopy"]["normal"] == 0
        assert dq["ram"]["normal"] == sq["ram"]["normal"] and dq["ram"]["duplicate"] == sq["ram"]["duplicate"]


async def test_precopy_multifd_on_hugetlb_pages(spawn, hugepages):  # noqa: F811
    hugepages(32)  # 2 x 32 MiB of 2 MiB huge pages (source and destination)
    guest = [*GUEST, "--backing", "hugetlb"]
    src, dst = spawn("source", guest), spawn("destination", guest)
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        inc = await _configure(s, d, {"multifd": True}, {**PRECOPY_PARAMS, "multifd-channels": 2})
        with FaultRelay(inc) as relay:
            _stall_channel(relay, 1)
            await s.call("migrate", {"uri": relay.uri})
            sq, dq = await wait_final(s, timeout=WAIT), await wait_final(d, timeout=WAIT)
        _check_multifd(sq, dq, 2)
        assert (await s.call("query-status"))["guest"]["blocks"][0]["backing"] == "hugetlb"


PC_CAPS = {"multifd": True, "postcopy-ram": True, "postcopy-preempt": True}
PC_PARAMS = {"postcopy-after-passes": 3, "downtime-limit": 1, "max-bandwidth": 24 * MiB, "max-postcopy-bandwidth": 8 * MiB,
             "postcopy-channels": 1}


@pytest.mark.parametrize("n", [1, 2, 4])
async def test_postcopy_preempt_multifd_no_page_after_listen(spawn, n):  # noqa: F811
    src, dst = spawn("source", GUEST), spawn("destination", [*GUEST, *DEST_WORKLOAD])
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        inc = await _configure(s, d, PC_CAPS, {**PC_PARAMS, "multifd-channels": n})
        with FaultRelay(inc) as relay:
            # 0 main, 1 the POSTCOPY channel (opened at setup), 2..n+1 the multifd channels
            _stall_channel(relay, 2)
            await s.call("migrate", {"uri": relay.uri})
            sq, dq = await wait_final(s, timeout=WAIT), await wait_final(d, timeout=WAIT)
        _check_multifd(sq, dq, n)
        assert sq.get("postcopy-bytes", 0) > 0, (sq["passes"], sq["ram"], sq.get("downtime"))  # it switched
        listen = dq["multifd"]["listen-ms"]
        assert listen is not None
        for i in range(1, n + 1):
            placed = dq["channels"][f"multifd-{i}"]["last-placed-ms"]
            assert placed is not None and placed < listen, (i, placed, listen)


async def test_multifd_then_postcopy_cut_pauses_and_recovers(spawn):  # noqa: F811
    src, dst = spawn("source", GUEST), spawn("destination", [*GUEST, *DEST_WORKLOAD])
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        params = {**PC_PARAMS, "multifd-channels": 2, "max-postcopy-bandwidth": 1 * MiB, "liveness-timeout": 3}
        inc = await _configure(s, d, PC_CAPS, params)
        with FaultRelay(inc) as relay:
            await s.call("migrate", {"uri": relay.uri})
            await wait_state(s, "postcopy-active", WAIT)
            await wait_state(d, "postcopy-active", WAIT)
            relay.cut(0, rst=True)
            sq = await wait_state(s, "postcopy-paused", WAIT)
            dq = await wait_state(d, "postcopy-paused", WAIT)
            assert sq["error-desc"] and dq["error-desc"]
        await s.call("migrate-set-parameters", {"max-postcopy-bandwidth": 64 * MiB})
        out = await run_migration(s, d, resume=True, timeout=WAIT)
        assert out.verified, (out.source.get("error-desc"), out.destination.get("error-desc"))
        assert out.source["postcopy-recoveries"] == 1
        listen = out.destination["multifd"]["listen-ms"]
        for i in (1, 2):
            assert out.destination["channels"][f"multifd-{i}"]["last-placed-ms"] < listen


# --- bad input and faults on a multifd channel -------------------------------------------------

# Byte offsets on multifd channel 1: its init record is 16 bytes, then the first
# packet's header (be32 magic, be16 flags, be16 idstr length, be32 normal, be32 zero,
# be64 number, be32 pass, be32 0), the idstr "pc.ram", then the offsets.
FIRST = C.FERRY_MULTIFD_INIT_SIZE
BAD_INPUT = {
    "page-count": (FIRST + 8, 0x01, "MultifdPacketTooLarge", "beyond the packet size"),
    "offset": (FIRST + C.FERRY_MULTIFD_HEADER_SIZE + len("pc.ram"), 0x01, "MultifdOffsetOutside",
               "outside block 'pc.ram'"),
    "pass": (FIRST + 27, 0x01, "MultifdPassSynced", "packet for pass 0, already synced"),
}


async def _source_guest_intact(s: ControlClient, d: ControlClient) -> None:
    st = await s.call("query-status")
    assert st["status"] == "running" and st["running"], st
    await s.call("migrate-set-parameters", {"max-bandwidth": 256 * MiB})
    await d.call("migrate-set-capabilities", _caps({"multifd": True}))
    out = await run_migration(s, d, timeout=WAIT)
    assert out.verified, (out.source.get("error-desc"), out.destination.get("error-desc"))


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
async def test_bad_multifd_packet_fails_both_named(spawn, case):  # noqa: F811
    src, dst = spawn("source", GUEST), spawn("destination", GUEST)
    offset, mask, name, words = BAD_INPUT[case]
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        inc = await _configure(s, d, {"multifd": True}, {**PRECOPY_PARAMS, "multifd-channels": 2})
        with FaultRelay(inc) as relay:
            relay.flip(1, TO_DST, offset, mask)
            await s.call("migrate", {"uri": relay.uri})
            sq, dq = await wait_final(s, timeout=WAIT), await wait_final(d, timeout=WAIT)
        assert sq["status"] == "failed" and dq["status"] == "failed", (sq, dq)
        assert words in dq["error-desc"] and "multifd-1" in dq["error-desc"], dq["error-desc"]
        assert (await d.call("query-status"))["status"] != "running"
        await _source_guest_intact(s, d)


async def test_multifd_channel_cut_in_precopy_fails_and_the_source_guest_runs(spawn):  # noqa: F811
    src, dst = spawn("source", GUEST), spawn("destination", GUEST)
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        params = {**PRECOPY_PARAMS, "multifd-channels": 2, "liveness-timeout": 3}
        inc = await _configure(s, d, {"multifd": True, "postcopy-ram": True}, params)
        with FaultRelay(inc) as relay:
            relay.cut(2, rst=True, at=2 * MiB)
            await s.call("migrate", {"uri": relay.uri})
            sq, dq = await wait_final(s, timeout=WAIT), await wait_final(d, timeout=WAIT)
        assert sq["status"] == "failed" and dq["status"] == "failed", (sq, dq)
        assert sq["error-desc"] and dq["error-desc"]
        await s.call("migrate-set-capabilities", _caps({"postcopy-ram": False}))
        await d.call("migrate-set-capabilities", _caps({"postcopy-ram": False}))
        await _source_guest_intact(s, d)


async def test_multifd_on_one_side_only_is_refused_before_anything_moves(spawn):  # noqa: F811
    src, dst = spawn("source", GUEST), spawn("destination", GUEST)
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        await s.call("migrate-set-capabilities", _caps({"multifd": True}))
        await s.call("migrate-set-parameters", {"multifd-channels": 2})
        inc = (await d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}))["uri"]
        await s.call("migrate", {"uri": inc})
        sq = await wait_final(s, timeout=WAIT)
        assert sq["status"] == "failed", sq
