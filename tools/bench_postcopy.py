"""Postcopy request latency, vanilla: the baseline preemption is measured against.

A guest (default 1 GiB, non-zero pages) migrates between two spawned processes
(engine.local.run_local_migration) with postcopy-ram, switching to postcopy right after
the first pass started (postcopy-after-percent, default 1 %). On the destination the
guest touches random pages one at a time (WorkloadConfig(pattern="random", batch=1)),
so it faults pages in while the background stream runs. Per host page size the tool
prints the request latency (request sent -> host page placed, measured by the
destination) p50 / p99 / avg / max, the number of requests, and the total time.

Links: ``loopback`` (TCP on 127.0.0.1) or ``netns`` (two network namespaces joined by
a veth pair with a tbf rate limit per direction, engine/testbed.py; created and removed
here; needs root).

    python tools/bench_postcopy.py                       # 1 GiB, 4K and 2M pages, loopback
    python tools/bench_postcopy.py --link netns --rate 1gbit
    python tools/bench_postcopy.py --quick --json        # 256 MiB, JSON last line
    python tools/bench_postcopy.py --throughput --size 1G --repeat 3   # background MiB/s

--throughput measures how fast background pages move instead: precopy, vanilla postcopy
and postcopy with preemption on the same link and guest (2 MiB pages by default), no
destination workload (--light: a slow one), switching at --after-percent; per case the
rate of its data phase, median of --repeat runs with the spread, and postcopy/precopy.
--breaks floor,idle,socket adds preempt-<mode> cases (preempt-write-breaks), --nolowat a
preempt case with precopy-notsent-lowat 0.

Both modes print the postcopy phase split (engine/phasesplit.py) per case: precopy,
switch, start, steady background (its rate, the migration thread's CPU per GiB, PRECOPY
writes per MiB), tail and verdict, median [min-max]; in the JSON as "phase-split".
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/bench_args.py

from ferry_migrate.engine.local import GuestConfig, run_local_migration  # noqa: E402
from ferry_migrate.engine.phasesplit import merge_splits, split  # noqa: E402
from ferry_migrate.engine.ram import format_size  # noqa: E402
from ferry_migrate.engine.reqtrace import STEPS, join, step_summary  # noqa: E402
from ferry_migrate.engine.send_loop import BREAK_MODES  # noqa: E402
from ferry_migrate.engine.testbed import LinkShape, Testbed, TestbedError, cleanup_stale, parse_rate, probe_link  # noqa: E402
from ferry_migrate.engine.workload import WorkloadConfig  # noqa: E402
from bench_args import page_sizes_arg, positive_arg, size_arg, size_type  # noqa: E402

MIB = 1 << 20
LAT_KEYS = ("count", "avg", "p50", "p90", "p99", "max")
NETNS_SYSCTLS = ("net.ipv4.tcp_congestion_control", "net.ipv4.tcp_wmem", "net.ipv4.tcp_rmem",
                 "net.ipv4.tcp_limit_output_bytes", "net.ipv4.tcp_notsent_lowat")


def page_label(n: int) -> str:
    return format_size(n).replace(" KiB", "K").replace(" MiB", "M").replace(" GiB", "G")


@dataclass
class LinkEnv:
    """Where a migration runs: a uri and the (source, destination) namespaces."""

    name: str  # "loopback" or "netns"
    uri: str
    netns: tuple[str, str] | None = None
    testbed: Testbed | None = None
    shape: LinkShape | None = None

    def describe(self) -> dict:
        d = {"link": self.name, "uri": self.uri}
        if self.shape is not None:
            s = self.shape
            d.update({"rate-bps": s.rate_bps, "burst": s.burst_bytes, "latency-s": s.latency,
                      "queue-bytes": s.queue_bytes})
        if self.testbed is not None:
            d["netns"] = list(self.netns)
            d["sysctl"] = self.testbed.sysctl("src", *NETNS_SYSCTLS)
        return d

    def probe(self, seconds: float = 1.0) -> dict:
        """RTT and goodput of this link, measured now (engine.testbed.probe_link)."""
        if self.netns is None:
            return probe_link(None, None, "127.0.0.1", seconds=seconds)
        return probe_link(self.netns[0], self.netns[1], self.testbed.address("dst"), seconds=seconds)


@contextlib.contextmanager
def open_link(name: str, shape: LinkShape | None = None):
    """A LinkEnv; for ``netns`` the two namespaces exist inside the ``with`` only."""
    if name == "loopback":
        yield LinkEnv("loopback", "tcp:127.0.0.1:0")
        return
    if name != "netns":
        raise ValueError(f"link {name!r}: expected loopback or netns")
    shape = shape or LinkShape()
    with Testbed(hosts=("src", "dst"), links=[("src", "dst")], shape=shape) as tb:
        yield LinkEnv("netns", f"tcp:{tb.address('dst')}:0", (tb.ns["src"], tb.ns["dst"]), tb, shape)


def guest_size(size: int, page_size: int) -> int:
    """The guest size used for ``page_size``: at least two host pages (1 GiB pages: 2 GiB).

    With one host page, precopy sends it whole before the switch (a host page
    never splits there) and postcopy has nothing left to move.
    """
    return max(size, 2 * page_size)


def run_case(link: LinkEnv, size: int, page_size: int, caps: dict, params: dict, args, label: str = "",
             runner=None) -> dict:
    """One postcopy migration; returns its latency figures (or the error).

    ``runner``: run_local_migration's signature (default: run_local_migration itself).
    The guest has ``guest_size(size, page_size)`` bytes.
    """
    size = guest_size(size, page_size)
    wl = WorkloadConfig(threads=args.threads, pattern="random", batch=1, dirty_rate=args.dirty_rate, seed=args.seed)
    guest = GuestConfig(size=size, page_size=page_size, fill="pattern", workload=None, dest_workload=wl)
    params = {"postcopy-after-percent": args.after_percent, **params}
    out = {"case": label, "link": link.name, "page-size": page_size, "size": size, "caps": caps, "params": params}
    t0 = time.monotonic()
    try:
        src, dst = (runner or run_local_migration)(link.uri, guest, caps=caps, params=params,
                                                   timeout=args.timeout, netns=link.netns)
    except RuntimeError as e:
        out.update(ok=False, error=str(e), **{"wall-s": round(time.monotonic() - t0, 2)})
        return out
    ok = (src.get("status") == "completed" and dst.get("status") == "completed"
          and src.get("digests") == dst.get("digests"))
    lat = dst.get("postcopy-latency") or {}
    out.update({
        "ok": ok,
        "wall-s": round(time.monotonic() - t0, 2),
        "latency-us": {k: lat.get(k, 0) for k in LAT_KEYS},
        "latency-histogram": lat.get("histogram"),
        "latency-by-channel": {c: {k: v.get(k, 0) for k in LAT_KEYS}
                               for c, v in (dst.get("postcopy-latency-by-channel") or {}).items()},
        "requests": dst.get("postcopy-requests", 0),
        "faults": dst.get("postcopy-faults", 0),
        "blocktime-ms": dst.get("postcopy-blocktime", 0),
        "total-time-ms": src.get("total-time", 0),
        "transfer-time-ms": src.get("transfer-time", 0),
        "downtime-ms": src.get("downtime", 0),
        "precopy-bytes": src.get("ram", {}).get("precopy-bytes", 0),
        "postcopy-bytes": src.get("postcopy-bytes", 0),
        "transferred": src.get("ram", {}).get("transferred", 0),
        "source-counters": {k: src.get(k) for k in ("postcopy-requests", "requests-already-sent",
                                                    "requests-dropped-in-flight", "preemptions", "restores")
                            if k in src},
        # engine/reqtrace.py: both workers on this host, so their monotonic clocks compare
        "trace-us": step_summary(join(src.get("postcopy-request-trace"), dst.get("postcopy-request-trace"))),
        # engine/phasesplit.py: precopy, switch, start, steady background, tail (same clock caveat)
        "phase-split": split(src.get("postcopy-phase-stamps"), dst.get("postcopy-phase-stamps")),
        "source-send": {k: src.get(k) for k in ("background-held-ms", "background-holds",
                                                "requests-served-mid-record") if k in src},
    })
    if not ok:
        out["error"] = (f"source {src.get('status')} ({src.get('error-desc', '')}), destination "
                        f"{dst.get('status')} ({dst.get('error-desc', '')})"
                        + ("" if src.get("digests") == dst.get("digests") else ", digests differ"))
    return out


def merge_runs(runs: list[dict]) -> dict:
    """Several runs of one case: the median of each figure; all runs kept under 'runs'."""
    good = [r for r in runs if r.get("ok")]
    if len(runs) == 1 or not good:
        return runs[0] if len(runs) == 1 else {**runs[0], "runs": runs}
    med = statistics.median
    out = dict(good[0])
    out["latency-us"] = {k: round(med(r["latency-us"][k] for r in good), 1) for k in LAT_KEYS}
    out["latency-us"]["count"] = sum(r["latency-us"]["count"] for r in good)  # requests in all runs
    for k in ("requests", "faults", "blocktime-ms", "total-time-ms", "transfer-time-ms"):
        out[k] = med(r[k] for r in good)
    out["total-time-ms-spread"] = [min(r["total-time-ms"] for r in good), max(r["total-time-ms"] for r in good)]
    if all(r.get("trace-us") for r in good):
        # Per step: the median over the runs of each run's p50 and p99.
        out["trace-us"] = {}
        for step in STEPS:
            per = [r["trace-us"][step] for r in good if r["trace-us"][step]["count"]]
            out["trace-us"][step] = ({"count": sum(x["count"] for x in per),
                                      "p50": round(med(x["p50"] for x in per), 1),
                                      "p99": round(med(x["p99"] for x in per), 1)}
                                     if per else {"count": 0, "p50": None, "p99": None})
    out["phase-split"] = merge_splits([r.get("phase-split") for r in good])
    out["ok"] = len(good) == len(runs)
    out["runs"] = runs
    return out


THROUGHPUT_CASES = (
    ("precopy", {}),
    ("vanilla", {"postcopy-ram": True}),
    ("preempt", {"postcopy-ram": True, "postcopy-preempt": True}),
)


def mibps(nbytes: int, ms: float) -> float | None:
    return round(nbytes / MIB / (ms / 1000), 1) if ms and ms > 0 else None


def throughput_cases(args) -> list[tuple[str, dict, dict]]:
    """(name, caps, params): precopy, vanilla, and preempt on each of --preempt-channels."""
    cases = [(name, caps, {}) for name, caps in THROUGHPUT_CASES[:2]]
    for n in args.preempt_channels:
        cases.append(("preempt" if n == 1 else f"preempt-{n}ch", THROUGHPUT_CASES[2][1],
                      {} if n == 1 else {"postcopy-channels": n}))
    for mode in args.breaks:  # preempt-write-breaks designs beside the default
        cases.append((f"preempt-{mode}", THROUGHPUT_CASES[2][1], {"preempt-write-breaks": mode}))
    for name, extra in args.knob_cases:
        cases.append((name, THROUGHPUT_CASES[2][1], extra))
    return cases


def run_throughput_case(link: LinkEnv, size: int, page_size: int, caps: dict, args, label: str,
                        extra: dict | None = None) -> dict:
    """One migration for --throughput: how fast background pages move.

    No source workload (one pass is enough for precopy); on the destination
    no workload, or with --light a slow one (64 touches/s). Rates in MiB/s:
    ``phase-MiBps`` is precopy's RAM bytes over its time from setup's end to
    the destination's confirmation, or postcopy's bytes after the switch over
    the postcopy phase (switch end -> confirmation); ``overall-MiBps`` is every
    byte over setup's end -> confirmation, for both.
    """
    wl = (WorkloadConfig(threads=1, pattern="random", batch=1, dirty_rate=64 * 4096, seed=args.seed)
          if args.light else None)
    size = guest_size(size, page_size)
    guest = GuestConfig(size=size, page_size=page_size, fill="pattern", workload=None, dest_workload=wl)
    params = {"postcopy-after-percent": args.after_percent, **(extra or {})} if caps.get("postcopy-ram") else {}
    out = {"case": label, "link": link.name, "page-size": page_size, "size": size, "caps": caps, "params": params}
    t0 = time.monotonic()
    try:
        src, dst = run_local_migration(link.uri, guest, caps=caps, params=params, timeout=args.timeout,
                                       netns=link.netns)
    except RuntimeError as e:
        out.update(ok=False, error=str(e), **{"wall-s": round(time.monotonic() - t0, 2)})
        return out
    ok = (src.get("status") == "completed" and dst.get("status") == "completed"
          and src.get("digests") == dst.get("digests"))
    ram = src.get("ram", {})
    busy_ms = src.get("transfer-time", 0) - src.get("setup-time", 0)
    if caps.get("postcopy-ram"):
        phase_bytes, phase_ms = src.get("postcopy-bytes", 0), src.get("postcopy-time", 0)
    else:
        phase_bytes, phase_ms = ram.get("transferred", 0), busy_ms
    out.update({
        "ok": ok, "wall-s": round(time.monotonic() - t0, 2),
        "total-time-ms": src.get("total-time", 0), "transfer-time-ms": src.get("transfer-time", 0),
        "phase-bytes": phase_bytes, "phase-ms": phase_ms, "phase-MiBps": mibps(phase_bytes, phase_ms),
        "overall-MiBps": mibps(ram.get("transferred", 0), busy_ms),
        "precopy-bytes": ram.get("precopy-bytes", 0), "postcopy-bytes": src.get("postcopy-bytes", 0),
        "requests": dst.get("postcopy-requests", 0),
        "phase-split": split(src.get("postcopy-phase-stamps"), dst.get("postcopy-phase-stamps")),
    })
    if not ok:
        out["error"] = (f"source {src.get('status')} ({src.get('error-desc', '')}), destination "
                        f"{dst.get('status')} ({dst.get('error-desc', '')})")
    return out


def merge_throughput(runs: list[dict]) -> dict:
    """Median (and min-max spread) of each rate over the good runs; all runs under 'runs'."""
    good = [r for r in runs if r.get("ok")]
    out = dict(good[0] if good else runs[0])
    out["ok"] = bool(good) and len(good) == len(runs)
    for k in ("phase-MiBps", "overall-MiBps", "total-time-ms"):
        vals = [r[k] for r in good if r.get(k) is not None]
        if vals:
            out[k] = statistics.median(vals)
            out[k + "-spread"] = [min(vals), max(vals)]
    out["phase-split"] = merge_splits([r.get("phase-split") for r in good])
    out["runs"] = runs
    return out


def throughput_main(args) -> int:
    """--throughput: precopy vs vanilla postcopy vs preempt, background rate, median of --repeat."""
    cases = []
    load0 = load_note()
    try:
        with open_link(args.link, args.shape) as link:
            env = link.describe()
            for ps in args.page_sizes:
                plan = throughput_cases(args)
                runs: dict[str, list] = {name: [] for name, _, _ in plan}
                for _ in range(args.repeat):  # interleaved: a load change hits every case alike
                    for name, caps, extra in plan:
                        print(f"... {args.link} {page_label(ps)} {name}", file=sys.stderr, flush=True)
                        runs[name].append(run_throughput_case(link, args.size, ps, caps, args, name, extra))
                merged = {name: merge_throughput(r) for name, r in runs.items()}
                base = merged["precopy"].get("phase-MiBps")
                for m in merged.values():
                    r = m.get("phase-MiBps")
                    m["ratio-to-precopy"] = round(r / base, 3) if r and base else None
                cases += merged.values()
    except TestbedError as e:
        print(f"bench_postcopy: netns link: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_postcopy: interrupted; processes and namespaces removed", file=sys.stderr)
        return 130
    print(f"Ferry background throughput, {datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.2f} (shared machine: figures under load), guest {format_size(args.size)}, "
          f"destination workload {'light (64 pages/s)' if args.light else 'none'}, switch at "
          f"{args.after_percent} %, median of {args.repeat} [min-max]")
    for line in throughput_table(cases, args.size):
        print(line)
    print("phase = precopy: all bytes over setup end -> confirmation; postcopy: bytes sent after the switch over "
          "switch end -> confirmation. /precopy = phase rate over precopy's.")
    print_split(cases)
    if args.json:
        print(json.dumps({
            "tool": "bench_postcopy", "mode": "throughput", "date": datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "size": args.size, "load-start": load0, "load-end": load_note(),
            "light": args.light, "after-percent": args.after_percent, "env": env, "cases": cases,
            "all-ok": all(c.get("ok") for c in cases),
        }))
    return 0 if all(c.get("ok") for c in cases) else 1


def throughput_table(cases: list[dict], size: int) -> list[str]:
    """The --throughput table as lines: one per case, columns as wide as their longest cell
    (case names such as ``preempt-socket`` and spreads such as ``[1241-1242]`` vary in width)."""
    rows = []
    for c in cases:
        pre = [c["link"], page_label(c["page-size"]), page_label(c.get("size", size)), c["case"]]
        if c.get("phase-MiBps") is None:
            rows.append((pre, None, f"ERROR {c.get('error')}"))
            continue
        sp, so = c.get("phase-MiBps-spread", [0, 0]), c.get("overall-MiBps-spread", [0, 0])
        ratio = c.get("ratio-to-precopy")
        cells = [f"{c['phase-MiBps']:.1f} [{sp[0]:.0f}-{sp[1]:.0f}]", f"{c['overall-MiBps']:.1f} [{so[0]:.0f}-{so[1]:.0f}]",
                 "-" if ratio is None else f"{ratio:.2f}", f"{c['total-time-ms'] / 1000:.2f}s"]
        rows.append((pre, cells, "" if c["ok"] else "  FAILED: " + str(c.get("error"))))
    names = ["link", "page", "guest", "case", "phase MiB/s", "overall MiB/s", "/precopy", "total"]
    left = {0, 3}  # link and case read left-aligned, figures right-aligned
    width = [max([len(n)] + [len((r[0] + (r[1] or []))[i]) for r in rows if i < len(r[0]) + len(r[1] or [])])
             for i, n in enumerate(names)]

    def line(cells):
        return " ".join(f"{v:<{width[i]}}" if i in left else f"{v:>{width[i]}}" for i, v in enumerate(cells))

    head = line(names)
    out = [head, "-" * len(head)]
    for pre, cells, note in rows:
        out.append(line(pre) + " " + note if cells is None else line(pre + cells) + note)
    return out


def install_signal_handlers() -> None:
    """SIGINT (even if inherited as ignored), SIGTERM and SIGHUP unwind like Ctrl-C, so the
    `finally` blocks remove the worker processes and the namespaces."""
    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, stop)


def load_note() -> dict:
    la = os.getloadavg()
    return {"loadavg": [round(x, 2) for x in la], "cpus": os.cpu_count(),
            "under-load": la[0] > 0.5 * (os.cpu_count() or 1)}


def _cell(v, spread=None, fmt="{:.0f}") -> str:
    if v is None:
        return "-"
    return fmt.format(v) + (f" [{fmt.format(spread[0])}-{fmt.format(spread[1])}]" if spread else "")


def print_split(cases: list[dict]) -> None:
    """The postcopy phase split (engine/phasesplit.py) per case: median [min-max] over the runs."""
    rows = [c for c in cases if (c.get("phase-split") or {}).get("switch-ms") is not None]
    if not rows:
        return
    print("postcopy phase split (engine/phasesplit.py), ms unless named, median [min-max]: precopy = start -> "
          "stop; switch = stop -> RUN handled by the destination (src/wire/dst: stop -> package flushed -> "
          "package read -> RUN); start = RUN -> first background order; steady = first background order -> "
          "last background byte flushed (PRECOPY channel MiB/s, all channels' MiB/s, migration-thread CPU s/GiB, PRECOPY write calls/MiB); tail = -> "
          "confirmation; verdict = -> verdict sent")
    cols = (("precopy", "precopy-ms", "{:.0f}"), ("switch", "switch-ms", "{:.0f}"), ("start", "start-ms", "{:.0f}"),
            ("steady", "steady-ms", "{:.0f}"), ("MiB/s", "steady-MiBps", "{:.0f}"), ("all MiB/s", "steady-all-MiBps", "{:.0f}"),
            ("cpu s/GiB", "steady-cpu-s-per-GiB", "{:.2f}"), ("writes/MiB", "steady-writes-per-MiB", "{:.1f}"),
            ("pre cpu/GiB", "precopy-cpu-s-per-GiB", "{:.2f}"),
            ("tail", "tail-ms", "{:.0f}"), ("verdict", "verdict-ms", "{:.0f}"))
    head = f"{'link':<8} {'page':>4} {'case':<22} " + " ".join(f"{n:>17}" for n, _, _ in cols) + "  switch src/wire/dst"
    print(head)
    for c in rows:
        ps = c["phase-split"]
        sw = ps.get("switch") or {}
        cells = " ".join(f"{_cell(ps.get(k), ps.get(k + '-spread'), f):>17}" for _, k, f in cols)
        print(f"{c['link']:<8} {page_label(c['page-size']):>4} {c['case']:<22} {cells}  "
              + "/".join(_cell(sw.get(k), None, "{:.1f}") for k in ("source-ms", "wire-ms", "destination-ms")))


def fmt_us(v) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.2f}ms" if v >= 1000 else f"{v:.0f}us"


def print_table(cases: list[dict], args) -> None:
    print(f"Ferry postcopy latency (vanilla), {datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}, guest {format_size(args.size)}, dest workload random batch=1 "
          f"threads={args.threads} {args.dirty_rate // MIB} MiB/s, switch at {args.after_percent} %")
    head = (f"{'link':<8} {'page':>4} {'count':>6} {'p50':>9} {'p99':>9} {'avg':>9} {'max':>9} "
            f"{'total':>8} {'blocktime':>9}  status")
    print(head)
    print("-" * len(head))
    for c in cases:
        if not c.get("latency-us"):
            print(f"{c['link']:<8} {page_label(c['page-size']):>4}  ERROR {c.get('error')}")
            continue
        lat = c["latency-us"]
        print(f"{c['link']:<8} {page_label(c['page-size']):>4} {lat['count']:>6} {fmt_us(lat['p50']):>9} "
              f"{fmt_us(lat['p99']):>9} {fmt_us(lat['avg']):>9} {fmt_us(lat['max']):>9} "
              f"{c['total-time-ms'] / 1000:>7.2f}s {c['blocktime-ms']:>7}ms  "
              f"{'ok' if c['ok'] else 'FAILED: ' + c.get('error', '')}")
    print("latency = request sent -> host page placed (destination); total = migration start -> "
          "verified completion (source).")
    print_split(cases)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", help="guest RAM (default 1G; smaller with --quick)")
    p.add_argument("--quick", action="store_true", help="small guest, for a fast check")
    p.add_argument("--page-sizes", default="4K,2M", help="comma list of host page sizes (default 4K,2M)")
    p.add_argument("--threads", type=int, default=1, help="destination guest threads faulting pages (default 1)")
    p.add_argument("--dirty-rate", default="32M",
                   help="page touches per second of all destination threads together, as bytes of "
                        "4 KiB pages (default 32M)")
    p.add_argument("--after-percent", type=int, default=1,
                   help="postcopy-after-percent: switch once this share of pages went out (default 1)")
    p.add_argument("--rate", default="1gbit", help="netns link: tbf rate per direction (default 1gbit)")
    p.add_argument("--burst", type=size_type, default=0, help="netns link: tbf burst bytes (default: auto)")
    p.add_argument("--queue-latency", type=float, default=10.0,
                   help="netns link: tbf latency in ms, i.e. how long a packet may queue (default 10)")
    p.add_argument("--repeat", type=int, default=1, help="runs per case; medians reported (default 1)")
    p.add_argument("--timeout", type=float, default=180.0, help="s per migration (default 180)")
    p.add_argument("--seed", type=int, default=1, help="workload seed")
    p.add_argument("--json", action="store_true", help="print all figures as one JSON object, last line")


def finish_args(p: argparse.ArgumentParser, a, quick_size: str) -> None:
    a.size = size_arg(p, "--size", a.size or (quick_size if a.quick else "1G"), positive=True)
    a.dirty_rate = size_arg(p, "--dirty-rate", a.dirty_rate)
    a.page_sizes = page_sizes_arg(p, "--page-sizes", a.page_sizes)
    positive_arg(p, "--timeout", a.timeout)
    if a.repeat < 1:
        p.error("--repeat must be >= 1")
    try:
        parse_rate(a.rate)
    except ValueError as e:
        p.error(str(e))
    a.shape = LinkShape(rate=a.rate, burst=a.burst, latency=a.queue_latency / 1000)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--link", default="loopback", choices=("loopback", "netns"),
                   help="loopback TCP, or two namespaces joined by a tbf-limited veth (default loopback)")
    p.add_argument("--throughput", action="store_true",
                   help="background throughput instead: precopy vs vanilla postcopy vs preempt, no destination "
                        "workload (default 2M pages)")
    p.add_argument("--light", action="store_true", help="--throughput: a light destination workload (64 pages/s)")
    p.add_argument("--preempt-channels", default="1",
                   help="--throughput: comma list of postcopy-channels for the preempt case (default 1; "
                        "'1,2' adds preempt-2ch)")
    p.add_argument("--breaks", default="",
                   help="--throughput: comma list of preempt-write-breaks modes to add as preempt-<mode> cases "
                        "(step, floor, idle, socket; the preempt case uses the default)")
    p.add_argument("--nolowat", action="store_true",
                   help="--throughput: add preempt-nolowat (precopy-notsent-lowat 0)")
    a = p.parse_args(argv)
    a.breaks = [x.strip() for x in a.breaks.split(",") if x.strip()]
    bad = [x for x in a.breaks if x not in BREAK_MODES]
    if bad:  # refused here rather than after the other cases ran
        p.error(f"--breaks {bad[0]!r}: expected a comma list of {', '.join(BREAK_MODES)}")
    a.knob_cases = [("preempt-nolowat", {"precopy-notsent-lowat": 0})] if a.nolowat else []
    try:
        a.preempt_channels = [int(x) for x in a.preempt_channels.split(",") if x.strip()]
    except ValueError:
        p.error(f"--preempt-channels {a.preempt_channels!r}: expected a comma list of integers")
    if not a.preempt_channels or min(a.preempt_channels) < 1:
        p.error("--preempt-channels: at least one count, each >= 1")
    if a.throughput and "--page-sizes" not in " ".join(argv if argv is not None else sys.argv):
        a.page_sizes = "2M"
    finish_args(p, a, "256M")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    if args.link == "netns":
        cleanup_stale()
    if args.throughput:
        return throughput_main(args)
    cases = []
    load0 = load_note()
    try:
        with open_link(args.link, args.shape) as link:
            env = link.describe()
            for ps in args.page_sizes:
                print(f"... {args.link} {page_label(ps)} vanilla postcopy", file=sys.stderr, flush=True)
                runs = [run_case(link, args.size, ps, {"postcopy-ram": True}, {}, args, "vanilla")
                        for _ in range(args.repeat)]
                cases.append(merge_runs(runs))
    except TestbedError as e:
        print(f"bench_postcopy: netns link: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_postcopy: interrupted; processes and namespaces removed", file=sys.stderr)
        return 130
    print_table(cases, args)
    if args.json:
        print(json.dumps({
            "tool": "bench_postcopy", "date": datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "size": args.size, "load-start": load0, "load-end": load_note(),
            "workload": {"pattern": "random", "batch": 1, "threads": args.threads, "dirty-rate": args.dirty_rate},
            "after-percent": args.after_percent, "env": env, "cases": cases,
            "all-ok": all(c.get("ok") for c in cases),
        }))
    return 0 if all(c.get("ok") for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
