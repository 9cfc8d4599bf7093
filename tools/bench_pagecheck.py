"""CPU cost of page-checksums per GiB, on each side, in one process.

Source side: a RamSendChannel sends a guest (fill=pattern, or mixed with one
page in four zero) into a socketpair whose far end a thread drains; the CPU
time of the sending thread (user + system, so the kernel's copy is in it) is
measured with page-checksums off, on with the guest stopped (values from
guest RAM, pages by reference) and on with the guest "running" (staging
copy), in whole ranges and in fragmented ranges of 1 to 3 pages (what later
precopy passes send). Destination side: the same stream, saved in memory,
decoded by StreamDecoder and placed into guest RAM as the precopy loader does,
with and without checking (PageChecker). CPU time rather than throughput, so a
loaded machine inflates the figures less; the ratio on/off is taken within one
run.

    python tools/bench_pagecheck.py                 # 256 MiB
    python tools/bench_pagecheck.py --size 1G --json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import threading
import time

import numpy as np

from ferry_migrate.channels import codec
from ferry_migrate.channels.channel import RamSendChannel
from ferry_migrate.channels.codec import StreamDecoder
from ferry_migrate.channels.pagecheck import PageChecker
from ferry_migrate.channels.qemufile import QEMUFileWriter
from ferry_migrate.channels.transport import SocketTransport
from ferry_migrate.engine.ram import GuestRAM, page_selector, parse_size

GIB = 1 << 30


def _thread_cpu(user_only: bool = False) -> float:
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return r.ru_utime if user_only else r.ru_utime + r.ru_stime


def send(ram: GuestRAM, checks: bool, staged: bool, ranges, keep: bool = False):
    """(CPU s, user CPU s) of the sending thread for ``ranges``; with ``keep`` also the bytes sent."""
    a, b = socket.socketpair()
    out = bytearray() if keep else None

    def drain():
        buf = bytearray(4 << 20)
        while n := b.recv_into(buf):
            if out is not None:
                out.extend(memoryview(buf)[:n])

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    ch = RamSendChannel(QEMUFileWriter(SocketTransport(a)), "precopy", page_checks=checks,
                        guest_running=lambda: staged)
    blk = ram.blocks[0]
    c0, u0 = _thread_cpu(), _thread_cpu(True)
    for p0, p1 in ranges:
        ch.send_range(blk, p0, p1, ordered=False)
    ch.send_eos()
    ch.flush()
    cpu = (_thread_cpu() - c0, _thread_cpu(True) - u0)
    a.shutdown(socket.SHUT_WR)
    t.join()
    a.close()
    b.close()
    return cpu, (bytes(out) if keep else None)


def receive(stream: bytes, ram: GuestRAM, checks: bool) -> float:
    """CPU s to decode ``stream`` (pages mode) and place it, checking each run first when ``checks``."""
    blk = ram.blocks[0]
    dec = StreamDecoder(ram.infos(), mode="pages")
    checker = PageChecker("precopy", required=checks)
    mv = memoryview(stream)
    pos = 0
    c0 = _thread_cpu()
    while True:
        ev, n = dec.next_event(mv[pos:])
        pos += n
        if isinstance(ev, codec.RamEOS):
            break
        if isinstance(ev, codec.RamRun):
            if checks:
                checker.check(ev)
            blk.write_pages(page_selector(ev.pages), ev.data)
    return _thread_cpu() - c0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="256M", help="guest RAM (one block, 4 KiB pages)")
    p.add_argument("--fill", default="pattern", choices=("pattern", "mixed"))
    p.add_argument("--repeat", type=int, default=3, help="runs per case; the best is reported")
    p.add_argument("--json", action="store_true", help="one JSON object, last line")
    args = p.parse_args(argv)
    size = parse_size(args.size)
    src, dst = GuestRAM.create(size), GuestRAM.create(size, prealloc=True)
    src.fill(args.fill)
    npages = src.blocks[0].npages
    whole = [(p, min(npages, p + 16384)) for p in range(0, npages, 16384)]
    rng = np.random.default_rng(1)
    starts = np.sort(rng.choice(np.arange(0, npages - 3, 4), min(npages // 4 - 1, 16384), replace=False))
    frag = [(int(s), int(s) + 1 + int(s) % 3) for s in starts]
    frag_bytes = sum(b - a for a, b in frag) * 4096
    per_gib = lambda s, nbytes: round(s * GIB / nbytes * 1000, 1)  # noqa: E731 - ms of CPU per GiB sent
    res = {"size": size, "fill": args.fill, "load": os.getloadavg()[0], "source": {}, "source user": {},
           "destination": {}}
    cases = [("off", False, False), ("on, guest stopped", True, False), ("on, guest running (staged)", True, True)]
    for shape, ranges, nbytes in (("whole", whole, size), ("fragmented", frag, frag_bytes)):
        for name, checks, staged in cases:
            runs = [send(src, checks, staged, ranges)[0] for _ in range(args.repeat)]
            res["source"][f"{shape}: {name}"] = per_gib(min(r[0] for r in runs), nbytes)
            res["source user"][f"{shape}: {name}"] = per_gib(min(r[1] for r in runs), nbytes)
    for name, checks in (("off", False), ("on", True)):
        _, stream = send(src, checks, False, whole, keep=True)
        best = min(receive(stream, dst, checks) for _ in range(args.repeat))
        res["destination"][f"whole: {name}"] = per_gib(best, size)
    print(f"page-checksums CPU cost, {time.strftime('%Y-%m-%d %H:%M')}, guest {args.size} fill={args.fill}, "
          f"best of {args.repeat}, load average {res['load']:.1f} on {os.cpu_count()} CPUs")
    for side in ("source", "source user", "destination"):
        what = {"source": "the sending thread, with the kernel's copy (varies with the receiver)",
                "source user": "the sending thread in user mode: Ferry's own work",
                "destination": "decode, check, place"}[side]
        print(f"  {side} (ms of CPU per GiB of pages: {what})")
        for k, v in res[side].items():
            print(f"    {k:<40} {v:8.1f}")
    s, d = res["source user"], res["destination"]
    ratio = lambda on, off: round(on / off, 2) if off > 0 else None  # noqa: E731 - too small to time
    res["ratios"] = {
        "source (user) whole, stopped": ratio(s["whole: on, guest stopped"], s["whole: off"]),
        "source (user) whole, running": ratio(s["whole: on, guest running (staged)"], s["whole: off"]),
        "source (user) fragmented, running": ratio(s["fragmented: on, guest running (staged)"], s["fragmented: off"]),
        "destination whole": ratio(d["whole: on"], d["whole: off"]),
    }
    print("  CPU on/off: " + ", ".join(f"{k} {v}" for k, v in res["ratios"].items()))
    if args.json:
        print(json.dumps(res))
    src.close()
    dst.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
