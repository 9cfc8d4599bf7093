#!/usr/bin/env python3
"""Benchmark: a saved QEMU guest loaded into a real QEMU destination.

One guest (``--size``, default 1 GiB, most of it known random bytes) is saved by
QEMU itself (``migrate exec:cat > FILE``); an indexed image of it is written by
Ferry. Each case loads it into a fresh paused QEMU destination on loopback:

- ``qemu-load``: QEMU's own load of the sequential file (``-incoming`` from
  ``exec:cat FILE``), the anchor;
- ``ferry-precopy-stream`` / ``ferry-precopy-image``: ``ferry snapshot load`` in precopy;
- ``ferry-postcopy-stream`` / ``ferry-postcopy-image``: postcopy with preempt,
  switched once ``--switch-at`` percent of the pages went out.

Times are from the start of the load (the index of a sequential file included) until
the destination guest can run (QEMU: postcopy-active in postcopy, completed
otherwise) and until it is fully loaded. In the postcopy cases ``--requests`` pages
near the end of guest RAM are read through the destination's monitor (HMP ``xp``)
as soon as it runs; each read's round trip is a request latency (it includes the
monitor's own overhead). Median of ``--repeat`` runs; ``--json`` prints one JSON
object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ferry_migrate.engine.ram import format_size, parse_size  # noqa: E402

POLL = 0.002  # s between query-migrate polls on the destination


def _vm_class():
    from tests.qemu_vm import QemuVM

    return QemuVM


def make_guest_files(workdir: str, size: int, random_share: float, seed: int = 11):
    """The saved stream (by QEMU) and the indexed image (by Ferry) of one guest."""
    from ferry_migrate.engine.snapshot import load_stream, write_image
    from tests.qemu_vm import LOAD_ADDR

    QemuVM = _vm_class()
    nbytes = int((size - LOAD_ADDR - (64 << 20)) * random_share) // 4096 * 4096
    blob = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    stream = os.path.join(workdir, "guest.qemu")
    vm = QemuVM(workdir, "saver", load=blob, mem=size)
    try:
        vm.cmd("migrate", uri=f"exec:cat > {stream}")
        vm.wait_migration(timeout=600)
    finally:
        vm.close()
    ram, devices, _ = load_stream(stream)
    image = os.path.join(workdir, "guest.img")
    write_image(image, ram, devices)
    ram.close()
    return stream, image, nbytes


def _dest(workdir: str, size: int, caps: dict):
    QemuVM = _vm_class()
    vm = QemuVM(workdir, "dest", incoming="defer", mem=size)
    if caps:
        vm.caps(**caps)
    return vm


def run_qemu_load(workdir: str, stream: str, size: int) -> dict:
    vm = _dest(workdir, size, {})
    try:
        t0 = time.monotonic()
        vm.cmd("migrate-incoming", uri=f"exec:cat {stream}")
        while vm.cmd("query-migrate").get("status") != "completed":
            time.sleep(POLL)
        t = time.monotonic() - t0
        return {"run": t, "loaded": t}
    finally:
        vm.close()


def run_ferry(workdir: str, path: str, size: int, mode: str, switch_at: int, nreq: int,
              params: dict | None = None) -> dict:
    from ferry_migrate.engine.snapshot_cli import run_load
    from tests.qemu_vm import free_port

    caps = {} if mode == "precopy" else {"postcopy-ram": True, "postcopy-preempt": True}
    vm = _dest(workdir, size, caps)
    port = free_port()
    vm.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    result = {}
    try:
        t0 = time.monotonic()
        th = threading.Thread(target=lambda: result.update(
            run_load(path, f"tcp:127.0.0.1:{port}", mode, switch_at=switch_at, params=params)))
        th.start()
        run_at = None
        lat = []
        while True:
            st = vm.cmd("query-migrate").get("status")
            if st == "failed" or (st is None and not th.is_alive()):
                th.join()
                raise RuntimeError(f"destination failed: {result.get('error')}")
            if run_at is None and st in ("postcopy-active", "completed"):
                run_at = time.monotonic() - t0
                if st == "postcopy-active" and nreq:
                    # The last pages of guest RAM go out last: most of these are still missing.
                    rng = np.random.default_rng(5)
                    top = size - (64 << 20)
                    for a in rng.integers(top // 4096 - 8192, top // 4096, nreq).tolist():
                        t1 = time.monotonic()
                        vm.hmp(f"xp /1wx 0x{a * 4096:x}")
                        lat.append(time.monotonic() - t1)
            if st == "completed":
                loaded = time.monotonic() - t0
                break
            time.sleep(POLL)
        th.join(600)
        if result.get("status") != "completed":
            raise RuntimeError(f"ferry source: {result.get('status')}: {result.get('error')}")
        out = {"run": run_at, "loaded": loaded, "index": result["index-time"],
               "requests-served": result["postcopy-requests"]}
        if lat:
            out["latency-p50-ms"] = float(np.percentile(lat, 50) * 1000)
            out["latency-p99-ms"] = float(np.percentile(lat, 99) * 1000)
        return out
    finally:
        vm.close()


def median_of(runs: list[dict]) -> dict:
    keys = set().union(*runs)
    return {k: round(statistics.median([r[k] for r in runs if k in r]), 4) for k in sorted(keys)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="guest RAM (default 1G)")
    ap.add_argument("--random-share", type=float, default=0.9, help="share of guest RAM filled with random bytes")
    ap.add_argument("--switch-at", type=int, default=1, help="postcopy: switch at this percent of pages sent")
    ap.add_argument("--requests", type=int, default=20, help="postcopy: pages read on the destination")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cases", help="comma-separated subset of the cases (default: all)")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="a migration parameter for the Ferry cases (repeatable)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from ferry_migrate.engine.snapshot_cli import _params

    params = _params(args.param)
    from tests.qemu_vm import QEMU

    if QEMU is None:
        print("bench_snapshot: qemu-system-x86_64 not installed", file=sys.stderr)
        return 2
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="bench-snap-", dir="/tmp") as wd:
        t = time.monotonic()
        stream, image, nrand = make_guest_files(wd, size, args.random_share)
        print(f"guest {format_size(size)}, {format_size(nrand)} random; stream {format_size(os.path.getsize(stream))}"
              f" (saved in {time.monotonic() - t:.1f} s)", file=sys.stderr)
        cases = {
            "qemu-load": lambda: run_qemu_load(wd, stream, size),
            "ferry-precopy-stream": lambda: run_ferry(wd, stream, size, "precopy", 0, 0, params),
            "ferry-precopy-image": lambda: run_ferry(wd, image, size, "precopy", 0, 0, params),
            "ferry-postcopy-stream": lambda: run_ferry(wd, stream, size, "postcopy-preempt", args.switch_at,
                                                       args.requests, params),
            "ferry-postcopy-image": lambda: run_ferry(wd, image, size, "postcopy-preempt", args.switch_at,
                                                      args.requests, params),
        }
        if args.cases:
            keep = ["qemu-load", *args.cases.split(",")]
            unknown = [c for c in keep if c not in cases]
            if unknown:
                print(f"bench_snapshot: unknown cases {unknown}; known: {', '.join(cases)}", file=sys.stderr)
                return 2
            cases = {k: v for k, v in cases.items() if k in keep}
        results = {}
        for name, fn in cases.items():
            runs = [fn() for _ in range(args.repeat)]
            results[name] = median_of(runs)
            r = results[name]
            extra = ""
            if "latency-p50-ms" in r:
                extra = (f"  requests {r['requests-served']:.0f}, latency p50 {r['latency-p50-ms']:.2f} ms "
                         f"p99 {r['latency-p99-ms']:.2f} ms")
            print(f"{name:24} runs after {r['run']:.3f} s, loaded after {r['loaded']:.3f} s{extra}",
                  file=sys.stderr)
    anchor = results["qemu-load"]
    for name, r in results.items():
        if name != "qemu-load":
            r["run-speedup-vs-qemu"] = round(anchor["run"] / r["run"], 2) if r["run"] else None
            r["loaded-ratio-vs-qemu"] = round(r["loaded"] / anchor["loaded"], 2)
    doc = {"size": size, "random-bytes": nrand, "repeat": args.repeat, "switch-at": args.switch_at,
           "results": results}
    if args.json:
        print(json.dumps(doc))
    else:
        print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
