"""Scale benchmark: does precopy's time grow linearly with guest size?

Migrates guests of several sizes (default 1, 2, 4 and 8 GiB) in one run, one
size at a time, between two spawned worker processes
(engine.local.run_local_migration) over TCP loopback: 4 KiB host pages, the
guest paused (no workload), random contents, the destination's RAM backed
before it listens (dest_prealloc, QEMU's -mem-prealloc). Per size it prints
the transfer time (migration start -> the destination's confirmation),
MiB/s, seconds per GiB and that figure's ratio to the smallest size's, and
each worker's peak RSS beyond guest RAM against the limit 3 % of guest RAM +
64 MiB.

Peak RSS: a thread here samples both workers every 100 ms with psutil and also
reads the kernel's high-water mark (VmHWM in /proc/<pid>/status), so a peak
between two samples still counts; the figure is the larger of the two.

``--mode postcopy`` runs postcopy-ram with postcopy-preempt instead, switching
at ``--after-percent`` of the first pass, and checks digests equal.

    python tools/bench_scale.py                       # 1G,2G,4G,8G, median of 3
    python tools/bench_scale.py --sizes 1G,2G --repeat 1 --json
    python tools/bench_scale.py --sizes 8G --mode postcopy --repeat 1
    python tools/bench_scale.py --sizes 8G --via demo --mode postcopy   # `ferry worker` processes

Memory: source and destination each hold the guest, so an 8 GiB case needs
about 16 GiB free; the tool refuses a size when MemAvailable is below twice
the guest plus 1 GiB.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from datetime import datetime, timezone

import psutil

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ferry_migrate.engine.local import GuestConfig, run_local_migration  # noqa: E402
from ferry_migrate.engine.ram import format_size, parse_size  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
NO_THP_ENV = "FERRY_BENCH_NO_THP"

if os.environ.get(NO_THP_ENV):
    # --no-thp, for measurement only: guest RAM on 4 KiB mappings instead of the transparent
    # huge pages RAMBlock asks for. Spawned workers import this module again as __mp_main__,
    # so the patch holds in them too.
    import mmap

    from ferry_migrate.engine.ram import RAMBlock

    def _no_thp(m) -> None:
        m.madvise(mmap.MADV_NOHUGEPAGE)

    RAMBlock._advise_thp = staticmethod(_no_thp)
RSS_SHARE = 0.03  # the RSS limit beyond guest RAM: 3 % of it ...
RSS_FIXED = 64 * MIB  # ... plus 64 MiB, per worker


def _hwm(pid: int) -> int:
    """The kernel's peak RSS of ``pid`` (VmHWM), bytes; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _thp(pid: int) -> float | None:
    """AnonHugePages / Anonymous of ``pid`` (smaps_rollup), or None if unreadable or no anonymous memory."""
    vals = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("Anonymous", "AnonHugePages"):
                    vals[k] = int(v.split()[0])
    except (OSError, ValueError):
        return None
    return vals["AnonHugePages"] / vals["Anonymous"] if vals.get("Anonymous") else None


class PeakRSS(threading.Thread):
    """Peak RSS (bytes) of this process's worker children, by role.

    The destination is spawned first, the source second (run_worker_pair), so
    the children in order of creation are the roles; multiprocessing's
    resource tracker, if any, is skipped.
    """

    def __init__(self, interval: float = 0.1, root: int | None = None):
        super().__init__(daemon=True)
        self.root = root  # None: this process's children; else `ferry worker` descendants of this pid
        self.interval = interval
        self.peak: dict[str, int] = {}
        self.thp: dict[str, float] = {}
        self._halt = threading.Event()
        self._me = psutil.Process(root) if root else psutil.Process()

    def _find(self) -> list[tuple[str, psutil.Process]]:
        if self.root:
            found = []
            try:
                for p in self._me.children(recursive=True):
                    try:
                        cmd = p.cmdline()
                    except psutil.Error:
                        continue
                    if "worker" in cmd and "--role" in cmd:
                        found.append((cmd[cmd.index("--role") + 1], p))
            except psutil.Error:
                pass
            return sorted(found, key=lambda rp: rp[0])
        kids = []
        for p in self._me.children():
            try:
                if "resource_tracker" in " ".join(p.cmdline()):
                    continue
                kids.append((p.create_time(), p.pid, p))
            except psutil.Error:
                continue
        kids.sort()
        return [(role, p) for role, (_, _, p) in zip(("destination", "source"), kids)]

    def run(self) -> None:
        # Children are looked up until both exist (psutil's children() reads all of /proc,
        # too costly at 20 Hz on a 2-core host); then only their own files are read.
        procs: list[tuple[str, psutil.Process]] = []
        last_thp = 0.0
        while not self._halt.is_set():
            if len(procs) < 2:
                procs = self._find()
            now = time.monotonic()
            for role, p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    rss = 0
                self.peak[role] = max(self.peak.get(role, 0), rss, _hwm(p.pid))
                if now - last_thp >= 1.0:
                    # Share of the worker's anonymous memory on transparent huge pages, at
                    # its highest: 4 KiB mappings cost the kernel's copies TLB misses.
                    thp = _thp(p.pid)
                    if thp is not None:
                        self.thp[role] = max(self.thp.get(role, 0.0), thp)
            if now - last_thp >= 1.0:
                last_thp = now
            self._halt.wait(self.interval)

    def stop(self) -> tuple[dict[str, int], dict[str, float]]:
        """Stop sampling; (peak RSS by role in bytes, highest THP share by role)."""
        self._halt.set()
        self.join(5)
        return dict(self.peak), dict(self.thp)


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def one_run(size: int, args) -> dict:
    """One migration of a ``size``-byte guest; its figures (times in s, RSS in bytes)."""
    guest = GuestConfig(size=size, page_size=args.page_size, fill=args.fill, workload=None,
                        dest_prealloc=args.prealloc)
    caps: dict = {"page-checksums": args.page_checksums}
    params: dict = {"downtime-limit": 300}
    if args.mode == "postcopy":
        caps.update({"postcopy-ram": True, "postcopy-preempt": True})
        params["postcopy-after-percent"] = args.after_percent
    if args.multifd:
        caps["multifd"] = True
        params["multifd-channels"] = args.multifd
    load = os.getloadavg()
    sampler = PeakRSS()
    sampler.start()
    t0 = time.monotonic()
    try:
        src, dst = run_local_migration("tcp:127.0.0.1:0", guest, caps=caps, params=params, timeout=args.timeout)
    finally:
        peak, thp = sampler.stop()
    wall = time.monotonic() - t0
    ok = src.get("status") == "completed" and dst.get("status") == "completed"
    digests_equal = src.get("digests") is not None and src.get("digests") == dst.get("digests")
    if not ok:
        raise RuntimeError(f"{format_size(size)}: source {src.get('status')} ({src.get('error-desc', '')}), "
                           f"destination {dst.get('status')} ({dst.get('error-desc', '')})")
    t = src["transfer-time"] / 1000
    nbytes = src["ram"]["transferred"]
    limit = int(RSS_SHARE * size) + RSS_FIXED
    return {
        "size": size, "transfer-s": t, "mibps": nbytes / MIB / t, "s-per-gib": t / (size / GIB),
        "setup-ms": src.get("setup-time", 0), "verify-ms": src.get("verify-time", 0),
        "total-ms": src.get("total-time", 0), "wall-s": wall, "transferred": nbytes,
        "postcopy-bytes": src.get("postcopy-bytes", 0), "digests-equal": digests_equal,
        "load-1min": load[0], "thp-share": {k: round(v, 3) for k, v in thp.items()},
        "rss-peak": peak, "rss-beyond": {k: v - size for k, v in peak.items()},
        "rss-limit": limit, "rss-ok": bool(peak) and all(v - size <= limit for v in peak.values()),
    }


def demo_run(size: int, args) -> dict:
    """One migration of a ``size``-byte guest between two `ferry worker` processes (`ferry demo`)."""
    import subprocess

    cmd = [sys.executable, "-m", "ferry_migrate.engine.cli", "demo", "--size", str(size),
           "--page-size", str(args.page_size), "--fill", args.fill, "--workload-threads", "0",
           "--cap", f"page-checksums={'on' if args.page_checksums else 'off'}",
           "--migration-timeout", str(int(args.timeout)), "--json"]
    if args.mode == "precopy":
        cmd.append("--precopy")
    else:
        cmd += ["--param", f"postcopy-after-percent={args.after_percent}"]
    if not args.prealloc:
        cmd.append("--no-mem-prealloc")
    if args.multifd:
        cmd += ["--cap", "multifd=on", "--param", f"multifd-channels={args.multifd}"]
    load = os.getloadavg()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = PeakRSS(root=proc.pid)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=args.timeout + 120)
    finally:
        peak, thp = sampler.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.monotonic() - t0
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{format_size(size)}: ferry demo exited {proc.returncode}, no JSON: {err[-2000:]}")
    doc = json.loads(lines[-1])
    src = doc.get("source", {})
    if not doc.get("verified"):
        raise RuntimeError(f"{format_size(size)}: ferry demo {doc.get('result')}: {err[-2000:]}")
    t = src["transfer-time"] / 1000
    nbytes = src["ram"]["transferred"]
    limit = int(RSS_SHARE * size) + RSS_FIXED
    return {
        "size": size, "transfer-s": t, "mibps": nbytes / MIB / t, "s-per-gib": t / (size / GIB),
        "setup-ms": src.get("setup-time", 0), "verify-ms": src.get("verify-time", 0),
        "total-ms": src.get("total-time", 0), "wall-s": wall, "transferred": nbytes,
        "postcopy-bytes": src.get("postcopy-bytes", 0), "digests-equal": bool(doc.get("digests-match")),
        "load-1min": load[0], "thp-share": {k: round(v, 3) for k, v in thp.items()},
        "rss-peak": peak, "rss-beyond": {k: v - size for k, v in peak.items()},
        "rss-limit": limit, "rss-ok": len(peak) == 2 and all(v - size <= limit for v in peak.values()),
    }


def summarise(size: int, runs: list[dict]) -> dict:
    med = statistics.median
    out = {"size": size, "runs": runs}
    for k in ("transfer-s", "mibps", "s-per-gib"):
        vals = [r[k] for r in runs]
        out[k] = med(vals)
        out[k + "-spread"] = [min(vals), max(vals)]
    for role in ("source", "destination"):
        out[f"rss-beyond-{role}"] = max(r["rss-beyond"].get(role, 0) for r in runs)
    out["rss-limit"] = runs[0]["rss-limit"]
    out["rss-ok"] = all(r["rss-ok"] for r in runs)
    out["digests-equal"] = all(r["digests-equal"] for r in runs)
    for role in ("source", "destination"):
        out[f"thp-{role}"] = min(r["thp-share"].get(role, 0.0) for r in runs)
    out["setup-ms"] = statistics.median(r["setup-ms"] for r in runs)
    out["load-1min"] = [round(r["load-1min"], 2) for r in runs]
    return out


def print_table(rows: list[dict], args) -> None:
    print(f"Ferry scale benchmark ({args.mode}{', preempt' if args.mode == 'postcopy' else ''}), "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, tcp loopback, "
          f"{format_size(args.page_size)} pages, paused guest, fill={args.fill}, "
          f"{'destination preallocated, ' if args.prealloc else ''}"
          f"page-checksums {'on' if args.page_checksums else 'off'}, multifd {args.multifd or 'off'}, "
          f"median of {args.repeat} [min-max], via {args.via}{', THP off (MADV_NOHUGEPAGE)' if args.no_thp else ''}")
    head = (f"{'guest':>6} {'time s':>20} {'MiB/s':>20} {'s/GiB':>20} {'ratio':>6} "
            f"{'src +RSS MiB':>12} {'dst +RSS MiB':>12} {'limit':>6} {'':4} {'digests':>7} {'THP s/d':>9} load")
    print(head)
    print("-" * len(head))
    base = rows[0]["s-per-gib"] if rows else 1.0
    for r in rows:
        def f(k, d=2):
            lo, hi = r[k + "-spread"]
            return f"{r[k]:.{d}f} [{lo:.{d}f}-{hi:.{d}f}]"
        r["ratio"] = r["s-per-gib"] / base
        print(f"{format_size(r['size']):>6} {f('transfer-s'):>20} {f('mibps', 0):>20} {f('s-per-gib', 3):>20} "
              f"{r['ratio']:>6.2f} {r['rss-beyond-source'] / MIB:>12.1f} {r['rss-beyond-destination'] / MIB:>12.1f} "
              f"{r['rss-limit'] / MIB:>6.0f} {'ok' if r['rss-ok'] else 'OVER':4} "
              f"{'equal' if r['digests-equal'] else 'DIFFER':>7} "
              f"{r['thp-source'] * 100:>4.0f}/{r['thp-destination'] * 100:<3.0f}% {','.join(map(str, r['load-1min']))}")
    print("time = migration start -> destination's confirmation; ratio = s/GiB over the first size's; "
          "+RSS = worst peak RSS beyond guest RAM over the runs (psutil samples and VmHWM); "
          "limit = 3 % of guest RAM + 64 MiB; THP s/d = lowest share of each worker's anonymous memory on transparent "
          "huge pages (smaps_rollup); load = 1-min load average at each run's start.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1G,2G,4G,8G", help="comma list of guest sizes")
    p.add_argument("--repeat", type=int, default=3, help="runs per size; the median is reported")
    p.add_argument("--mode", default="precopy", choices=("precopy", "postcopy"),
                   help="postcopy: postcopy-ram + postcopy-preempt, switching at --after-percent")
    p.add_argument("--after-percent", type=int, default=10, help="postcopy-after-percent (postcopy mode)")
    p.add_argument("--page-size", default="4K", help="host page size")
    p.add_argument("--fill", default="random", choices=("pattern", "random"))
    p.add_argument("--prealloc", action=argparse.BooleanOptionalAction, default=True,
                   help="destination RAM backed before the migration (default on)")
    p.add_argument("--page-checksums", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--multifd", type=int, default=0, help="multifd-channels (0: capability multifd off)")
    p.add_argument("--via", default="local", choices=("local", "demo"),
                   help="local: two spawned processes (engine.local); demo: two `ferry worker` processes "
                        "driven over the control plane (`ferry demo --json`, no guest workload)")
    p.add_argument("--no-thp", action="store_true",
                   help="measurement only: guest RAM of both workers on 4 KiB mappings (MADV_NOHUGEPAGE) "
                        "instead of transparent huge pages, to show what the kernel's page tables cost (--via local)")
    p.add_argument("--interleave", action="store_true",
                   help="repeat the whole size list --repeat times instead of each size in a row")
    p.add_argument("--timeout", type=float, default=600.0, help="s per migration")
    p.add_argument("--json", action="store_true", help="all figures as one JSON object, last line")
    a = p.parse_args(argv)
    a.sizes = [parse_size(s) for s in a.sizes.split(",") if s.strip()]
    a.page_size = parse_size(a.page_size)
    if not a.sizes:
        p.error("--sizes: empty")
    if a.repeat < 1:
        p.error("--repeat must be >= 1")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.no_thp:
        os.environ[NO_THP_ENV] = "1"
    runs: dict[int, list[dict]] = {s: [] for s in args.sizes}
    order = ([s for _ in range(args.repeat) for s in args.sizes] if args.interleave
             else [s for s in args.sizes for _ in range(args.repeat)])
    for size in order:
        need = 2 * size + GIB
        if mem_available() < need:
            print(f"  {format_size(size)}: only {mem_available() / GIB:.1f} GiB available, need "
                  f"{need / GIB:.1f}; skipped", file=sys.stderr, flush=True)
            continue
        r = demo_run(size, args) if args.via == "demo" else one_run(size, args)
        runs[size].append(r)
        print(f"  {format_size(size)}: {r['transfer-s']:.2f} s, {r['mibps']:.0f} MiB/s, "
              f"+RSS src {r['rss-beyond'].get('source', 0) / MIB:.1f} / dst "
              f"{r['rss-beyond'].get('destination', 0) / MIB:.1f} MiB, THP {r['thp-share']}, load {r['load-1min']:.2f}",
              file=sys.stderr, flush=True)
    rows = [summarise(s, runs[s]) for s in args.sizes if runs[s]]
    print_table(rows, args)
    if args.json:
        print(json.dumps({"host": platform.node(), "cpus": os.cpu_count(), "mode": args.mode,
                          "page-size": args.page_size, "fill": args.fill, "prealloc": args.prealloc,
                          "multifd": args.multifd, "repeat": args.repeat, "sizes": rows}))
    return 0 if rows and all(r["rss-ok"] and r["digests-equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
