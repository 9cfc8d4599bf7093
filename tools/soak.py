#!/usr/bin/env python3
"""Soak: many migrations back and forth between two real workers, with random faults.

    python3 tools/soak.py --migrations 50 --seed 1 [--size 16M] [--json]

Two `ferry worker` processes (loopback, ipc control) migrate one guest back
and forth: after each completed migration the roles swap with the guest (the
destination becomes the source). Each migration runs in precopy or in
postcopy with preemption (2 MiB pages, one POSTCOPY channel) at random, through
the fault relay of tests/faultrelay.py, and gets a random fault:

- ``cut``: the link is cut (RST or FIN) on the main channel or, in postcopy,
  the POSTCOPY channel;
- ``stall-short`` / ``stall-long``: the relay stops forwarding for 0.4x / 2.5x
  the liveness timeout, sockets open;
- ``blackhole``: every further byte dropped, sockets open;
- ``flip``: one byte of the stream flipped (only when the engine has the
  page-checksums capability: without per-page checks a flipped payload byte
  is caught by the digests only at the end);
- ``kill``: a worker SIGKILLed (precopy: the destination; postcopy: either).

Precopy faults happen mid-stream, postcopy faults after the switch. A migration
that pauses is recovered automatically, as many tries as needed, through the
controller (``run_migration(..., resume=True)``); a recovery try may itself get
a fault (``--recovery-faults``: probability per try), injected through a relay
on the recovery's connections, and a precopy migration may get a short stall
early on besides its fault (``--extra-stalls``). A killed worker is replaced: in precopy the
source's guest runs on and only the destination is restarted; in postcopy the
guest is lost (the source holds pages the destination lacks and the other way
round), the survivor is checked (a surviving source must never have resumed its
copy), and a fresh pair of workers starts.

Printed per fault class: faults injected (all of them: the migration's own,
the early short stalls, those of recovery tries), migrations whose own fault it
was, pauses (each time both sides paused after a fault of this class),
recoveries (recoveries that went through, counted for the migration's own
fault), returned (the link died at the switch, before the package with RUN
reached the destination: the destination failed before its guest ran and said
so to the resume, and the guest ran on the source again), and of the migrations
whose own fault it was: completed, failed (the source's guest ran on), guests lost,
and host pages lost or corrupted: the guest is split into one RAM block per
2 MiB host page (``--size`` / 2 MiB blocks, at most 64), so the per-block
digests both sides report at completion compare every host page; a page whose
digests differ counts. With ``--json`` the last line is the whole result as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# The workers run this checkout's engine too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

from ferry_migrate.engine.control.client import ControlClient, ControlError  # noqa: E402
from ferry_migrate.engine.control.driver import run_migration  # noqa: E402
from ferry_migrate.engine.control.spawn import spawn_worker  # noqa: E402
from ferry_migrate.engine.params import CAPABILITIES  # noqa: E402
from ferry_migrate.engine.ram import parse_size  # noqa: E402
from tests.faultrelay import TO_DST, TO_SRC, FaultRelay  # noqa: E402

MiB = 1 << 20
HUGE = 2 * MiB
WAIT = 180.0  # s: bound on any one state change (a loaded machine)
FINAL = ("completed", "failed", "cancelled")
CLASSES = ("cut", "stall-short", "stall-long", "blackhole", "flip", "kill")
MAX_TRIES = 20  # recovery tries per migration before the soak reports it stuck


class Stats:
    """Counters of one fault class."""

    # returned: paused, and the destination proved it never ran the guest (it failed before RUN):
    # the resume gave the guest back to the source (engine/never_ran.py).
    FIELDS = ("injected", "migrations", "pauses", "recoveries", "returned", "completed", "failed", "guests-lost",
              "pages-lost", "source-resumed", "stuck")

    def __init__(self):
        self.c = OrderedDict((f, 0) for f in self.FIELDS)

    def add(self, field: str, n: int = 1) -> None:
        self.c[field] += n


class Pair:
    """Two workers and their control clients; ``src``/``dst`` follow the guest."""

    def __init__(self, args, tmp: str):
        self.args, self.tmp, self.n = args, tmp, 0
        self.src = self.dst = None
        self.s = self.d = None

    def _options(self) -> list[str]:
        a = self.args
        return ["--exit-with-parent", "--size", a.size, "--page-size", "2M", "--blocks", str(a.blocks),
                "--fill", "random", "--workload-threads", "1", "--workload-pattern", "random",
                "--dirty-rate", a.dirty_rate]

    def _spawn(self, role: str):
        self.n += 1
        w = spawn_worker(role, f"ipc://{self.tmp}/w{self.n}.ctl", self._options(),
                         log_path=os.path.join(self.tmp, f"w{self.n}-{role}.log"), new_session=True)
        w.wait_ready(60)
        return w

    async def start(self, which=("source", "destination")) -> None:
        if "source" in which:
            self.src = self._spawn("source")
            self.s = ControlClient(self.src.control)
            await self.s.__aenter__()
        if "destination" in which:
            self.dst = self._spawn("destination")
            self.d = ControlClient(self.dst.control)
            await self.d.__aenter__()

    async def drop(self, which=("source", "destination")) -> None:
        for role in which:
            w, c = (self.src, self.s) if role == "source" else (self.dst, self.d)
            if c is not None:
                with contextlib.suppress(Exception):
                    await c.__aexit__(None, None, None)
            if w is not None:
                with contextlib.suppress(Exception):
                    w.kill() if w.alive() else w.stop()

    def swap(self) -> None:
        self.src, self.dst, self.s, self.d = self.dst, self.src, self.d, self.s


async def _q(c: ControlClient) -> dict | None:
    try:
        return await asyncio.wait_for(c.call("query-migrate"), 10)
    except (ControlError, asyncio.TimeoutError, OSError):
        return None


def _settled(sq: dict | None, dq: dict | None) -> bool:
    s, d = (sq or {}).get("status"), (dq or {}).get("status")
    if s is None and d is None:
        raise RuntimeError("neither worker answers")
    if s == "completed" and d == "device" and "outcome unknown" in ((dq or {}).get("error-desc") or ""):
        return True  # the verdict was lost: the destination waits for the user
    if s in FINAL and (d in FINAL or d is None):
        return True
    if s == "postcopy-paused" and (d == "postcopy-paused" or d is None or (d in FINAL and (dq or {}).get("never-ran"))):
        return True
    return s is None and d in (*FINAL, "postcopy-paused")


async def settle(pair: Pair, dead: set = frozenset()) -> tuple[dict, dict]:
    """Wait until both sides are final, both postcopy-paused, or the living one is (the other dead)."""
    deadline = time.monotonic() + WAIT
    while True:
        sq = None if "source" in dead else await _q(pair.s)
        dq = None if "destination" in dead else await _q(pair.d)
        if _settled(sq, dq):
            return sq or {}, dq or {}
        if time.monotonic() > deadline:
            raise TimeoutError(f"migration stuck: source {(sq or {}).get('status')}, "
                               f"destination {(dq or {}).get('status')}")
        await asyncio.sleep(0.05)


async def drain(stream) -> list:
    """Events already received on ``stream``."""
    out = []
    while True:
        ev = await stream.next(0.05)
        if ev is None:
            return out
        out.append(ev)


def pages_differing(sq: dict, dq: dict, blocks: int, size: int) -> int:
    """Host pages (2 MiB) whose digests differ between the sides, or every page if digests are missing."""
    a, b = sq.get("digests") or {}, dq.get("digests") or {}
    per_block = size // blocks // HUGE
    if not a or not b:
        return size // HUGE
    return sum(per_block for k in set(a) | set(b) if a.get(k) != b.get(k))


def inject(relay: FaultRelay, kind: str, channel: int, liveness: float, rng: random.Random) -> None:
    """Arm ``kind`` on ``channel`` now (the migration is at the chosen phase)."""
    if kind == "cut":
        relay.cut(channel, rst=rng.random() < 0.5)
    elif kind == "stall-short":
        relay.stall(channel, TO_DST, 0.4 * liveness)
    elif kind == "stall-long":
        relay.stall(channel, TO_DST, 2.5 * liveness)
        if channel == 0:
            relay.stall(channel, TO_SRC, 2.5 * liveness)
    elif kind == "blackhole":
        relay.blackhole(channel, TO_DST)
        if channel == 0:
            relay.blackhole(channel, TO_SRC)
    elif kind == "flip":
        relay.flip(channel, TO_DST, relay.received(channel, TO_DST) + rng.randrange(64 << 10, MiB))


async def configure(pair: Pair, postcopy: bool, args) -> None:
    caps = {"capabilities": [{"capability": "postcopy-ram", "state": postcopy},
                             {"capability": "postcopy-preempt", "state": postcopy}]}
    if args.checksums:
        caps["capabilities"].append({"capability": "page-checksums", "state": True})
    params = {"liveness-timeout": args.liveness, "max-bandwidth": args.bandwidth,
              "max-postcopy-bandwidth": args.postcopy_bandwidth, "postcopy-channels": 1,
              "postcopy-after-percent": 20 if postcopy else 0,
              # A fresh secret per migration, as `ferry migrate` sets: channels prove they belong.
              "migration-secret": secrets.token_hex(32)}
    for c in (pair.s, pair.d):
        await c.call("migrate-set-capabilities", caps)
        await c.call("migrate-set-parameters", params)


async def recover(pair: Pair, st: Stats, stats: dict, args, rng: random.Random, log) -> tuple[dict, dict]:
    """Recover a paused migration until it is no longer paused; faults on some tries."""
    for _ in range(MAX_TRIES):
        if rng.random() < args.recovery_faults:
            kind = rng.choice(("cut", "blackhole", "stall-long"))
            stats[kind].add("injected")
            listening = (await pair.d.call("migrate-recover", {"uri": "tcp:127.0.0.1:0"}))["uri"]
            with FaultRelay(listening) as relay:
                # In the middle of the recovery's handshake (the return path's
                # RECV_BITMAP), or of its first pages.
                if kind == "cut":
                    relay.cut(0, rst=True, at=rng.randrange(8, 600), direction=TO_SRC)
                elif kind == "blackhole":
                    relay.blackhole(0, TO_SRC, at=rng.randrange(8, 600))
                    relay.blackhole(0, TO_DST, at=rng.randrange(8, 600))
                else:
                    relay.stall(0, TO_SRC, 2.5 * args.liveness, at=rng.randrange(8, 600))
                events = await pair.s.events()
                try:
                    await pair.s.call("migrate", {"uri": relay.uri, "resume": True})
                    sq, dq = await settle_after_resume(pair, events)
                finally:
                    events.close()
            log(f"    recovery try with {kind}: {sq.get('status')}/{dq.get('status')}")
            if sq.get("status") == "postcopy-paused":
                stats[kind].add("pauses")
                continue
            st.add("returned" if sq.get("status") == "failed" else "recoveries")
            return sq, dq
        out = await asyncio.wait_for(run_migration(pair.s, pair.d, resume=True, timeout=WAIT), 2 * WAIT)
        log(f"    recovery: {out.source.get('status')}/{out.destination.get('status')}")
        if not out.paused:
            st.add("returned" if out.source.get("status") == "failed" else "recoveries")
            return out.source, out.destination
    raise RuntimeError(f"still paused after {MAX_TRIES} recovery tries")


async def settle_after_resume(pair: Pair, events) -> tuple[dict, dict]:
    """After a resume through a faulty relay: wait until the source acted on it (its MIGRATION
    postcopy-recover event on ``events``, a status other than postcopy-paused, or a new error),
    then settle."""
    deadline = time.monotonic() + WAIT
    err0 = (await pair.s.call("query-migrate")).get("error-desc")
    while time.monotonic() < deadline:
        ev = await events.next(0.05)
        if ev is not None and ev.get("event") == "MIGRATION" and ev["data"].get("status") == "postcopy-recover":
            break
        q = await pair.s.call("query-migrate")
        if q["status"] != "postcopy-paused" or q.get("error-desc") != err0:
            break
    return await settle(pair)


async def one(i: int, pair: Pair, stats: dict, totals: dict, args, rng: random.Random, log) -> None:
    """One migration with one fault (and maybe more during its recoveries)."""
    classes = [c for c in CLASSES if c != "flip" or args.checksums]
    kind = rng.choice(classes)
    postcopy = rng.random() < 0.5
    st = stats[kind]
    st.add("injected")
    st.add("migrations")  # migrations whose (first) fault is of this class
    totals["current"] = kind
    await configure(pair, postcopy, args)
    s_events = await pair.s.events()
    inc = (await pair.d.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}))["uri"]
    dead: set = set()
    channel, victim = 0, None
    with FaultRelay(inc) as relay:
        if not postcopy and kind != "stall-short" and rng.random() < args.extra_stalls:
            # A second fault, early: a short stall the migration must ride out.
            relay.stall(0, TO_DST, 0.4 * args.liveness, at=rng.randrange(256 << 10, 768 << 10))
            stats["stall-short"].add("injected")
        await pair.s.call("migrate", {"uri": relay.uri})
        # The phase: postcopy after the switch, precopy somewhere mid-stream.
        try:
            if postcopy:
                deadline = time.monotonic() + WAIT
                while time.monotonic() < deadline:
                    q = await pair.s.call("query-migrate")
                    if q["status"] == "postcopy-active" or q["status"] in FINAL:
                        break
                    await asyncio.sleep(0.02)
                channel = rng.choice((0, 1))
            else:
                at = rng.randrange(1 * MiB, max(2 * MiB, args.size_bytes // 2))
                await asyncio.to_thread(relay.wait_bytes, 0, TO_DST, at, WAIT)
        except Exception as e:  # noqa: BLE001 - the migration ended before the phase: report it
            log(f"  {i}: phase not reached: {e}")
        if kind == "kill":
            victim = rng.choice(("source", "destination")) if postcopy else "destination"
            w = pair.src if victim == "source" else pair.dst
            os.killpg(w.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                w.proc.wait(10)
            dead.add(victim)
        elif channel < len(relay.connections):
            inject(relay, kind, channel, args.liveness, rng)
        sq, dq = await settle(pair, dead)
    mode = "postcopy" if postcopy else "precopy"
    log(f"  {i}: {mode} {kind} on {'main' if channel == 0 else 'postcopy'} channel"
        f"{' (' + victim + ' killed)' if victim else ''}: {sq.get('status')}/{dq.get('status')}")
    if victim is not None:
        await killed(pair, st, totals, victim, postcopy, sq, dq, s_events, log)
        return
    if sq.get("status") == "postcopy-paused":
        st.add("pauses")
        sq, dq = await recover(pair, st, stats, args, rng, log)
    s_events.close()
    if sq.get("status") == "completed" and dq.get("status") == "completed":
        st.add("completed")
        st.add("pages-lost", pages_differing(sq, dq, args.blocks, args.size_bytes))
        totals["completed"] += 1
        pair.swap()
    elif sq.get("status") == "completed":
        # The verdict was lost: the destination waits in device, its guest not
        # started; the source decided completed, so the guest is the destination's
        # (``cont`` there is the user's call). Counted, then a fresh pair.
        st.add("completed")
        st.add("pages-lost", pages_differing(sq, dq, args.blocks, args.size_bytes))
        totals["completed"] += 1
        totals["verdicts-lost"] += 1
        log(f"    verdict lost: {dq.get('error-desc')}")
        await pair.drop()
        await pair.start()
    else:
        st.add("failed")
        ss = await pair.s.call("query-status")
        if not ss.get("running"):
            raise RuntimeError(f"migration {i}: precopy failed and the source's guest does not run: {ss}")


async def killed(pair: Pair, st: Stats, totals: dict, victim: str, postcopy: bool, sq, dq, s_events, log) -> None:
    """A worker was SIGKILLed: check the survivor, replace what must be replaced."""
    if not postcopy or (victim == "destination" and sq.get("status") == "failed"):
        # Killed before the switch: the source's guest runs on.
        st.add("failed")
        ss = await pair.s.call("query-status")
        if not ss.get("running"):
            raise RuntimeError(f"destination killed in precopy and the source's guest does not run: {ss}")
        s_events.close()
        await pair.drop(("destination",))
        await pair.start(("destination",))
        return
    st.add("guests-lost")
    st.add("pages-lost", pair.args.size_bytes // HUGE)  # the guest, whole
    st.add("pauses")
    totals["guests-lost"] += 1
    if victim == "destination":
        # The source must stay paused and never run its copy again.
        await asyncio.sleep(2 * pair.args.liveness)
        ss = await pair.s.call("query-status")
        await asyncio.sleep(0.2)
        resumed = [e for e in await drain(s_events) if e.get("event") == "RESUME"]
        if ss.get("running") or ss.get("migration") != "postcopy-paused" or resumed:
            st.add("source-resumed")
            log(f"    SOURCE RESUMED ITS COPY: {ss} {resumed}")
    else:
        ds = await pair.d.call("query-status")
        if ds.get("running"):
            log(f"    destination runs without its source: {ds}")
    s_events.close()
    await pair.drop()
    await pair.start()


async def soak(args) -> dict:
    rng = random.Random(args.seed)
    stats = OrderedDict((c, Stats()) for c in CLASSES if c != "flip" or args.checksums)
    totals = {"migrations": 0, "completed": 0, "guests-lost": 0, "verdicts-lost": 0, "current": CLASSES[0],
              "stuck": []}
    tmp = tempfile.mkdtemp(prefix="ferry-soak-")
    pair = Pair(args, tmp)
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose else (lambda m: None)
    t0 = time.monotonic()
    try:
        await pair.start()
        for i in range(args.migrations):
            totals["migrations"] += 1
            try:
                await one(i, pair, stats, totals, args, rng, log)
            except (TimeoutError, asyncio.TimeoutError, RuntimeError, ControlError) as e:
                # An engine fault the soak is there to find: reported, counted, and
                # the soak goes on with a fresh pair (the guest is counted lost).
                cls = totals["current"]
                stats[cls].add("stuck")
                stats[cls].add("guests-lost")
                stats[cls].add("pages-lost", args.size_bytes // HUGE)
                totals["guests-lost"] += 1
                totals["stuck"].append(f"migration {i} ({cls}): {type(e).__name__}: {e}")
                log(f"  {i}: STUCK: {e}")
                await pair.drop()
                await pair.start()
    finally:
        await pair.drop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()
    return {"seed": args.seed, "migrations": totals["migrations"], "size": args.size,
            "liveness-timeout": args.liveness, "faults": sum(s.c["injected"] for s in stats.values()),
            "completed": totals["completed"], "guests-lost": totals["guests-lost"],
            "verdicts-lost": totals["verdicts-lost"], "stuck": totals["stuck"],
            "wall-time": round(time.monotonic() - t0, 1), "loadavg": [round(x, 2) for x in load],
            "page-checksums": args.checksums,
            "classes": {k: dict(v.c) for k, v in stats.items()}}


def table(result: dict) -> str:
    cols = Stats.FIELDS
    widths = [max(len(c) + 2, 8) for c in cols]
    rows = [f"{'fault':<12}" + "".join(f"{c:>{w}}" for c, w in zip(cols, widths))]
    for k, v in result["classes"].items():
        rows.append(f"{k:<12}" + "".join(f"{v[c]:>{w}}" for c, w in zip(cols, widths)))
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--migrations", type=int, default=50, help="migrations to run (default 50)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--size", default="16M", help="guest RAM, a multiple of 2 MiB (default 16M)")
    p.add_argument("--liveness", type=float, default=2.0, help="liveness-timeout in seconds (default 2)")
    p.add_argument("--bandwidth", default="16M", help="max-bandwidth in bytes/s (default 16M)")
    p.add_argument("--postcopy-bandwidth", default="4M", help="max-postcopy-bandwidth in bytes/s (default 4M)")
    p.add_argument("--dirty-rate", default="4M", help="guest workload's dirty rate (default 4M)")
    p.add_argument("--recovery-faults", type=float, default=0.6,
                   help="probability that a recovery try gets a fault too (default 0.6)")
    p.add_argument("--extra-stalls", type=float, default=0.5,
                   help="probability that a precopy migration also gets a short stall early (default 0.5)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    p.add_argument("--verbose", "-v", action="store_true", help="one line per migration on stderr")
    p.add_argument("--keep", action="store_true", help="keep the worker logs")
    args = p.parse_args(argv)
    args.size_bytes = parse_size(args.size)
    if args.size_bytes <= 0 or args.size_bytes % HUGE:
        p.error(f"--size {args.size}: a positive multiple of 2 MiB")
    args.blocks = min(64, args.size_bytes // HUGE)
    while (args.size_bytes // HUGE) % args.blocks:
        args.blocks -= 1
    args.bandwidth, args.postcopy_bandwidth = parse_size(args.bandwidth), parse_size(args.postcopy_bandwidth)
    args.checksums = "page-checksums" in CAPABILITIES and CAPABILITIES["page-checksums"][1]
    result = asyncio.run(soak(args))
    print(f"soak: {result['migrations']} migrations, {result['faults']} faults, {result['completed']} completed, "
          f"{result['guests-lost']} guests lost, {result['wall-time']} s (load average {result['loadavg']})")
    print(table(result))
    for s in result["stuck"]:
        print(f"stuck: {s}")
    if args.json:
        print(json.dumps(result))
    bad = (sum(v["pages-lost"] for k, v in result["classes"].items() if k != "kill")
           + sum(v["source-resumed"] + v["stuck"] for v in result["classes"].values()))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
