#!/usr/bin/env python3
"""Downtime of a precopy with multifd against downtime-limit, for several multifd-channels.

Each run migrates a small running guest (a hot-set workload keeps dirtying
pages, so the stop-and-copy has work to do) between two local worker
processes over TCP loopback (engine.local.run_local_migration), with the
capability multifd on and ``multifd-channels`` N. Per N it prints the
median of the runs with the [min-max] spread of: the downtime (guest paused
on the source -> destination confirmed), the estimate the stop decision made
(``expected-downtime``), the measured cost of a multifd sync round
(``multifd-sync-ms``, here the last round of the stop), how long closing
the channels took in the stop (``multifd-finish-ms``: the last pages, SYNC
and FIN on every channel, threads joined), and where the downtime went
(``downtime-phases``: pause, sync, send, confirm). The
load average before each run is printed with it: on a shared host the
figures are those of a loaded machine.

    python tools/bench_multifd_downtime.py --channels 1,4,16,64,255 --size 256M --repeat 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from ferry_migrate.engine.local import GuestConfig, run_local_migration
from ferry_migrate.engine.ram import parse_size
from ferry_migrate.engine.workload import WorkloadConfig

MIB = 1 << 20


def _spread(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    return f"{statistics.median(vals):.0f} [{min(vals):.0f}-{max(vals):.0f}]"


def run_one(n: int, args) -> dict:
    """One migration with multifd-channels ``n``; the figures of its final query-migrate."""
    wl = WorkloadConfig(pattern="hotset", dirty_rate=args.dirty_rate, hot_fraction=args.hot_fraction)
    guest = GuestConfig(size=args.size, page_size=4096, fill="pattern", workload=wl, dest_prealloc=True)
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    src, dst = run_local_migration("tcp:127.0.0.1:0", guest, caps={"multifd": True},
                                   params={"multifd-channels": n, "downtime-limit": args.downtime_limit,
                                           **({"migration-secret": "bench"} if args.secret else {})},
                                   timeout=args.timeout, warm=0.5)
    phases = src.get("downtime-phases", {})
    return {"channels": n, "status": src["status"], "dest-status": dst["status"], "load": round(load, 1),
            "downtime-ms": src.get("downtime"), "expected-downtime-ms": src.get("expected-downtime"),
            "multifd-sync-ms": src.get("multifd-sync-ms"), "stop-cost-ms": src.get("multifd-stop-cost-ms"),
            "finish-ms": src.get("multifd-finish-ms"),
            "dest-sync-wait-ms": (dst.get("multifd") or {}).get("sync-wait-ms"), "phases": phases,
            "passes": src["ram"]["dirty-sync-count"], "downtime-bytes": src["ram"]["downtime-bytes"],
            "wall-s": round(time.monotonic() - t0, 1), "error": src.get("error-desc") or dst.get("error-desc")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", default="1,4,16,64,255", help="comma list of multifd-channels")
    p.add_argument("--size", default="256M", help="guest RAM (default 256M)")
    p.add_argument("--repeat", type=int, default=3, help="runs per N (the median is printed)")
    p.add_argument("--dirty-rate", type=parse_size, default=32 * MIB, help="workload bytes/s (default 32M)")
    p.add_argument("--hot-fraction", type=float, default=0.1, help="hot set share of the guest (default 0.1)")
    p.add_argument("--downtime-limit", type=int, default=300, help="ms (default 300, QEMU's default)")
    p.add_argument("--timeout", type=float, default=300.0, help="s per migration")
    p.add_argument("--secret", action="store_true",
                   help="set a migration-secret on both sides (channel hello, as `ferry migrate` does)")
    p.add_argument("--json", action="store_true", help="print every run as JSON, last line")
    args = p.parse_args(argv)
    ns = [int(x) for x in args.channels.split(",")]
    runs = []
    # Interleaved (N1, N2, ..., N1, N2, ...): a change of load hits every N alike.
    for _ in range(args.repeat):
        for n in ns:
            r = run_one(n, args)
            runs.append(r)
            print(f"  N={n:<3} {r['status']:<9} downtime {r['downtime-ms']} ms, expected {r['expected-downtime-ms']} ms, "
                  f"sync round {r['multifd-sync-ms']} ms, stop cost {r['stop-cost-ms']} ms, finish {r['finish-ms']} ms, "
                  f"destination sync waits {r['dest-sync-wait-ms']} ms, phases {r['phases']}, load {r['load']}"
                  + (f", error {r['error']}" if r["error"] else ""), file=sys.stderr, flush=True)
    print(f"multifd downtime, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, guest {args.size} "
          f"hotset {args.dirty_rate // MIB} MiB/s, downtime-limit {args.downtime_limit} ms, median [min-max] "
          f"of {args.repeat}")
    print(f"{'N':>4} {'downtime ms':>16} {'expected ms':>16} {'sync round ms':>14} {'send ms':>14} "
          f"{'finish ms':>14} {'confirm ms':>14} {'load':>10}")
    for n in ns:
        rs = [r for r in runs if r["channels"] == n]
        print(f"{n:>4} {_spread([r['downtime-ms'] for r in rs]):>16} "
              f"{_spread([r['expected-downtime-ms'] for r in rs]):>16} "
              f"{_spread([r['multifd-sync-ms'] for r in rs]):>14} "
              f"{_spread([r['phases'].get('send') for r in rs]):>14} "
              f"{_spread([r['finish-ms'] for r in rs]):>14} "
              f"{_spread([r['phases'].get('confirm') for r in rs]):>14} "
              f"{min(r['load'] for r in rs):>4}-{max(r['load'] for r in rs):<4}")
    if args.json:
        print(json.dumps({"runs": runs, "args": {k: v for k, v in vars(args).items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
