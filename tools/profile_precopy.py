"""Profile one side of a precopy migration with cProfile; the other side runs in a spawned process.

The profiled side runs in this process: its migration thread (source) or its
loader (destination) is run in the main thread under cProfile, so only that
thread is measured (the source's return-path thread is not). The other side is
engine.local's worker (_dest_main / _source_main) in a spawned process.

    python tools/profile_precopy.py --side source --transport unix --page-size 4K
    python tools/profile_precopy.py --side destination --size 1G --top 25 --out dest.prof
    python tools/profile_precopy.py --side destination --prealloc   # RAM backed before: no first touch
"""
from __future__ import annotations

import argparse
import cProfile
import multiprocessing as mp
import os
import pstats
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict

from ferry_migrate.channels.transport import parse_uri
from ferry_migrate.engine.destination import MigrationDestination
from ferry_migrate.engine.local import GuestConfig, _dest_main, _source_main
from ferry_migrate.engine.params import MigrationConfig
from ferry_migrate.engine.process import configure_worker_process
from ferry_migrate.engine.ram import parse_size
from ferry_migrate.engine.source import MigrationSource
from ferry_migrate.engine.workload import Workload, WorkloadConfig


def _answer(conn, proc, what, timeout):
    while True:
        if not conn.poll(timeout):
            raise RuntimeError(f"{what}: no answer in {timeout:.0f} s (exit code {proc.exitcode})")
        kind, val = conn.recv()
        if kind == "error":
            raise RuntimeError(f"{what}: {val}")
        if kind != "ready":
            return val


def profile(args) -> tuple[cProfile.Profile, dict, float]:
    """Run one migration; returns (profile, profiled side's query, its CPU seconds)."""
    wl = WorkloadConfig(pattern="hotset", dirty_rate=args.dirty_rate) if args.workload else None
    guest = GuestConfig(size=args.size, page_size=args.page_size, fill=args.fill, workload=wl,
                        dest_prealloc=args.prealloc)
    gd = asdict(guest)
    tmp = tempfile.mkdtemp(prefix="ferry-prof-")
    uri = "tcp:127.0.0.1:0" if args.transport == "tcp" else f"unix:{os.path.join(tmp, 'ferry.sock')}"
    ctx = mp.get_context("spawn")
    pc, cc = ctx.Pipe()
    prof = cProfile.Profile()
    proc = None
    try:
        g = GuestConfig(**{**gd, "workload": None})
        ram = g.make_ram()
        if args.side == "source":
            ram.fill(g.fill)
            workload = Workload(ram, wl) if wl else None
            proc = ctx.Process(target=_dest_main, args=(cc, gd, {}, {}, uri, args.timeout), daemon=True)
            proc.start()
            real = _answer(pc, proc, "destination", 60)
            if workload:
                workload.start()
                time.sleep(0.5)
            side = MigrationSource(ram, workload, MigrationConfig())
            side.uri = parse_uri(real)
            run = side._run  # the migration thread's body, here in the main thread
        else:
            if args.prealloc:  # back guest RAM here, before the migration starts
                t = time.monotonic()
                for b in ram.blocks:
                    b.prealloc()
                print(f"prealloc of {args.size >> 20} MiB took {time.monotonic() - t:.3f} s", file=sys.stderr)
            side = MigrationDestination(ram, MigrationConfig())
            real = side.listen(uri)
            proc = ctx.Process(target=_source_main, args=(cc, gd, {}, {}, real, args.timeout, 0.5), daemon=True)
            proc.start()
            run = side._run
        cpu0 = time.process_time()
        prof.runcall(run)
        cpu = time.process_time() - cpu0
        other = _answer(pc, proc, "other side", args.timeout)
        if side.status != "completed" or other.get("status") != "completed":
            raise RuntimeError(f"migration did not complete: {side.query().get('error-desc')} / "
                               f"{other.get('error-desc')}")
        q = side.query()
        if args.side == "destination":
            q["transfer-time"] = other.get("transfer-time")
        return prof, q, cpu
    finally:
        if proc is not None:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=("source", "destination"), default="source")
    p.add_argument("--transport", choices=("tcp", "unix"), default="unix")
    p.add_argument("--page-size", default="4K")
    p.add_argument("--size", default="1G")
    p.add_argument("--fill", default="pattern", choices=("pattern", "random"))
    p.add_argument("--workload", action="store_true", help="guest dirtying (hotset)")
    p.add_argument("--dirty-rate", default="64M")
    p.add_argument("--prealloc", action="store_true",
                   help="the destination backs its guest RAM before the migration (dest_prealloc: "
                        "first-touch page faults out of the measured window)")
    p.add_argument("--sort", default="tottime", help="pstats sort key (tottime, cumulative, ...)")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", help="save the raw profile here (for snakeviz, pstats)")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    args.size, args.page_size = parse_size(args.size), parse_size(args.page_size)
    args.dirty_rate = parse_size(args.dirty_rate)
    configure_worker_process()  # as in a worker: GIL switch interval
    try:
        prof, q, cpu = profile(args)
    except (RuntimeError, OSError, ValueError) as e:
        print(f"profile_precopy: {e}", file=sys.stderr)
        return 1
    st = pstats.Stats(prof)
    wall = st.total_tt
    sent = q["ram"]["transferred"]
    print(f"{args.side} {args.transport} page {args.page_size} size {args.size >> 20} MiB: "
          f"{sent / 2**20:.0f} MiB, transfer-time {q.get('transfer-time')} ms, total-time {q.get('total-time')} ms, "
          f"profiled thread {wall:.2f} s (cProfile time), process CPU {cpu:.2f} s, "
          f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10} MiB")
    if args.out:
        prof.dump_stats(args.out)
    st.sort_stats(args.sort).print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
