"""Postcopy preemption against vanilla postcopy: request latency per case and link.

Same guest and destination workload as tools/bench_postcopy.py (random pages touched one
at a time while the background stream runs; switch to postcopy right after the first
pass started). Cases, on each host page size and link:

  vanilla          postcopy-ram only: requested pages queue on the main stream
  preempt          + postcopy-preempt, urgent pages sent by the migration thread (QEMU 7.2);
                   Ferry's defaults from the switch on: precopy-notsent-lowat 128 KiB,
                   preempt-hold-background (background waits for urgent pages to leave),
                   preempt-pace-background (PRECOPY paced at 90 % of the precopy bandwidth)
  preempt-rp       urgent-pages-from=return-path (QEMU 8.0+)
  preempt-nobreak  preempt-break-huge off (huge pages only; on 4 KiB it equals preempt)
  preempt-rp-nice  preempt-rp with urgent-thread-nice -10: the urgent path's threads (the
                   source's return-path thread, the destination's POSTCOPY loader and uffd
                   fault thread) at nice -10 (engine/urgent.py)
  preempt-rp-fifo  preempt-rp with urgent-thread-rt-priority 10: those threads SCHED_FIFO
  preempt-rp-proc  preempt-rp with postcopy-receiver=process: the destination's POSTCOPY
                   channel read and placed by a process of its own (engine/urgent_receiver.py);
                   needs the guest in its own process, so it runs only as '+uffd' (with --uffd)
  preempt-rp-proc-fifo  preempt-rp-proc, its process and the urgent threads SCHED_FIFO
  preempt-rp-fifo-2ch   preempt-rp-fifo with postcopy-channels 2: a requested huge page need not
                   wait behind another one on the same POSTCOPY channel
  preempt-2ch      postcopy-channels 2 (only when named in --cases)
  preempt[-rp]-MODE  preempt-write-breaks MODE (step, floor, idle, socket; only when named)
  preempt-rp-socket-nolowat  preempt-rp-socket with precopy-notsent-lowat 0 (only when named)

The 1G case: ``--page-sizes 1G`` (or 4K,2M,1G). A guest has at least two host pages
(bench_postcopy.guest_size: 2 GiB with 1 GiB pages; with one, precopy sends it whole
before the switch), on ordinary memory: a block's host page size is its migration
granularity whatever backs it. Its floor is the RTT plus 1 GiB at the link's goodput.

    python tools/bench_preempt.py --links loopback,netns --page-sizes 1G --cases vanilla,preempt,preempt-2ch --repeat 3 --json

With --tls every case runs a second time with every channel over TLS (``case+tls``;
tls-creds made by engine/certs.py, the destination's name checked through tls-hostname).

With --knobs, the shared-bottleneck knobs one at a time:

  preempt-nolowat, preempt-rp-nolowat   precopy-notsent-lowat 0 (the kernel's default)
  preempt-rp-nohold  preempt-rp with preempt-hold-background off
  preempt-bufs     precopy-sndbuf / precopy-rcvbuf bounded
  preempt-nopace, preempt-rp-nopace   preempt-pace-background off (no automatic pacing)
  preempt-paced-link   precopy-pacing-rate set by hand to 90 % of the link's measured goodput

Links: ``loopback`` (TCP on 127.0.0.1) and ``netns``: two network namespaces joined by a
veth pair with tbf at --rate (default 1 Gbit/s) per direction, made and removed here
(engine/testbed.py; needs root). The tbf queue is shared by every connection going
one way, so a POSTCOPY channel's page waits behind background packets queued there.

Floor, per link and page size, measured in the same run: the link's RTT (TCP ping-pong
of small messages between two processes, p50) plus one host page (with its record
headers) at the link's goodput (bytes pushed through the link). Ratios: vanilla/case
and case/floor, on p99. Targets (rate-limited link): preempt p99 <= 2x floor for every
page size, and vanilla/preempt p99 >= 20x on 4 KiB pages.

    python tools/bench_preempt.py                     # 1 GiB, 4K and 2M, loopback and netns
    python tools/bench_preempt.py --knobs --links netns
    python tools/bench_preempt.py --quick --json      # small guest, fewer cases
    python tools/bench_preempt.py --uffd --cases vanilla,preempt   # + each case with a guest process

--uffd runs each case a second time, right after it on the same link, with the
destination's guest in its own process whose faults the kernel reports through
userfaultfd (engine/guestproc.py): '+uffd' cases, with uffd/in-process ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from datetime import datetime

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_args import size_type  # noqa: E402 - tools/bench_args.py
from bench_postcopy import (add_common_args, finish_args, fmt_us, install_signal_handlers, load_note,  # noqa: E402
                            merge_runs, open_link, page_label, print_split, run_case)

from ferry_migrate.engine.reqtrace import STEPS  # noqa: E402

from ferry_migrate.channels import constants as C  # noqa: E402
from ferry_migrate.engine.ram import format_size  # noqa: E402
from ferry_migrate.engine.testbed import TestbedError, cleanup_stale  # noqa: E402

RECORD_HEADER = 8  # be64 offset|flags before each target page (CONTINUE: no block name)
FLOOR_FACTOR = 2.0  # preempt p99 within this many floors
SPEEDUP_4K = 20.0  # vanilla/preempt p99 on 4 KiB pages

PACE = "pace"  # placeholder: PACE_SHARE of the goodput measured on the link
PACE_SHARE = 0.9
TLS_NAME = "ferry-bench-destination"  # the name in the destination's certificate, checked via tls-hostname
VANILLA = {"postcopy-ram": True}
PREEMPT = {"postcopy-ram": True, "postcopy-preempt": True}
URGENT_NICE = -10  # preempt-rp-nice
URGENT_RT = 10  # preempt-rp-fifo: SCHED_FIFO priority


def case_table(args) -> list[tuple[str, dict, dict, bool]]:
    """(name, caps, params, huge pages only)."""
    sndbuf, rcvbuf = args.sndbuf, args.rcvbuf
    rp = {"urgent-pages-from": "return-path"}
    cases = [
        ("vanilla", VANILLA, {}, False),
        ("preempt", PREEMPT, {}, False),
        ("preempt-rp", PREEMPT, rp, False),
        ("preempt-nobreak", PREEMPT, {"preempt-break-huge": False}, True),
        # The urgent path's threads given CPU priority (engine/urgent.py): a documented option each.
        ("preempt-rp-nice", PREEMPT, {**rp, "urgent-thread-nice": URGENT_NICE}, False),
        ("preempt-rp-fifo", PREEMPT, {**rp, "urgent-thread-rt-priority": URGENT_RT}, False),
        # The destination's POSTCOPY channel in a process of its own (guest process only: +uffd).
        ("preempt-rp-proc", PREEMPT, {**rp, "postcopy-receiver": "process"}, False),
        ("preempt-rp-proc-fifo", PREEMPT, {**rp, "postcopy-receiver": "process",
                                           "urgent-thread-rt-priority": URGENT_RT}, False),
        ("preempt-rp-fifo-2ch", PREEMPT, {**rp, "urgent-thread-rt-priority": URGENT_RT,
                                          "postcopy-channels": 2}, False),
    ]
    if args.knobs:
        cases += [
            # Knobs off or on, one at a time (the defaults: notsent-lowat 128 KiB, hold on).
            ("preempt-nolowat", PREEMPT, {"precopy-notsent-lowat": 0}, False),
            ("preempt-rp-nolowat", PREEMPT, {**rp, "precopy-notsent-lowat": 0}, False),
            ("preempt-rp-nohold", PREEMPT, {**rp, "preempt-hold-background": False}, False),
            ("preempt-bufs", PREEMPT, {"precopy-sndbuf": sndbuf, "precopy-rcvbuf": rcvbuf}, False),
            # Kernel pacing of the PRECOPY channel a little under the measured goodput.
            ("preempt-nopace", PREEMPT, {"preempt-pace-background": False}, False),
            ("preempt-rp-nopace", PREEMPT, {**rp, "preempt-pace-background": False}, False),
            # Pacing at a rate given by hand: 90 % of the goodput measured on the link.
            ("preempt-paced-link", PREEMPT, {"precopy-pacing-rate": PACE}, False),
        ]
    if args.cases:
        # Only when named: requested pages spread over two POSTCOPY channels.
        cases.append(("preempt-2ch", PREEMPT, {"postcopy-channels": 2}, False))
        # Only when named: how background writes break for requests (preempt-write-breaks).
        for mode in ("step", "floor", "idle", "socket"):
            cases.append((f"preempt-{mode}", PREEMPT, {"preempt-write-breaks": mode}, False))
            cases.append((f"preempt-rp-{mode}", PREEMPT, {**rp, "preempt-write-breaks": mode}, False))
        cases.append(("preempt-rp-socket-nolowat", PREEMPT, {**rp, "preempt-write-breaks": "socket",
                                                             "precopy-notsent-lowat": 0}, False))
        known = {c[0] for c in cases}
        bad = [c for c in args.cases if c not in known]
        if bad:
            raise SystemExit(f"bench_preempt: --cases: unknown {bad}; known: {', '.join(sorted(known))}"
                             + ("" if args.knobs else " (knob cases need --knobs)"))
        cases = [c for c in cases if c[0] in args.cases]
    elif args.quick:
        cases = [c for c in cases if c[0] in ("vanilla", "preempt", "preempt-rp", "preempt-rp-fifo")
                 or (args.knobs and c[0] in ("preempt-rp-nohold", "preempt-nopace"))]
    return cases


def floor_us(probe: dict, page_size: int) -> float:
    """RTT p50 + one host page (and its record headers) at the measured goodput, in us."""
    wire = page_size + RECORD_HEADER * (page_size // C.TARGET_PAGE_SIZE)
    return probe["rtt-us"]["p50"] + wire / probe["rate-Bps"] * 1e6


def add_ratios(cases: list[dict], floors: dict) -> None:
    """vanilla/case and case/floor (p99, and avg) per case, within each (link, page size)."""
    for c in cases:
        key = (c["link"], c["page-size"])
        c["floor-us"] = round(floors[key], 1) if key in floors else None
        uffd = c["case"].endswith("+uffd")
        vname = "vanilla" + (c["case"][c["case"].index("+"):] if "+" in c["case"] else "")  # same suffix
        van = next((v for v in cases if v["case"] == vname and (v["link"], v["page-size"]) == key), None)
        lat = c.get("latency-us") or {}
        ok = c.get("ok") and lat.get("count")
        c["vanilla/case-p99"] = (round(van["latency-us"]["p99"] / lat["p99"], 2)
                                 if ok and van and van.get("ok") and van["latency-us"].get("count") and lat["p99"]
                                 else None)
        c["vanilla/case-avg"] = (round(van["latency-us"]["avg"] / lat["avg"], 2)
                                 if ok and van and van.get("ok") and van["latency-us"].get("count") and lat["avg"]
                                 else None)
        c["case/floor-p99"] = round(lat["p99"] / c["floor-us"], 2) if ok and c["floor-us"] else None
        # The total-time target: case total / vanilla total (medians), same link and page size.
        c["total/vanilla"] = (round(c["total-time-ms"] / van["total-time-ms"], 2)
                              if c.get("ok") and van and van.get("ok") and van.get("total-time-ms") else None)
        if uffd:
            # The same case in-process, same link and page size: uffd / in-process (< 1: uffd faster).
            base = next((v for v in cases if v["case"] == c["case"][:-5].replace("-proc", "") and (v["link"], v["page-size"]) == key),
                        None)
            blat = (base or {}).get("latency-us") or {}
            for q in ("p50", "p99"):
                c[f"uffd/inproc-{q}"] = (round(lat[q] / blat[q], 2) if ok and base and base.get("ok")
                                         and blat.get("count") and blat[q] else None)


def targets(cases: list[dict], link: str = "netns") -> dict:
    """The issue's targets on the rate-limited link, for every preempt variant."""
    out = {}
    for c in cases:
        if c["link"] != link or not c["case"].startswith("preempt"):
            continue
        t = out.setdefault(c["case"], {})
        ps = page_label(c["page-size"])
        r = c.get("case/floor-p99")
        t[f"p99<={FLOOR_FACTOR:g}x-floor-{ps}"] = None if r is None else r <= FLOOR_FACTOR
        if c["page-size"] == C.TARGET_PAGE_SIZE:
            s = c.get("vanilla/case-p99")
            t[f"vanilla/p99>={SPEEDUP_4K:g}x-{ps}"] = None if s is None else s >= SPEEDUP_4K
    return out


def verdict(v) -> str:
    return "n/a" if v is None else ("PASS" if v else "MISS")


def print_report(cases: list[dict], probes: dict, tg: dict, args, envs: dict) -> None:
    print(f"Ferry postcopy preemption, {datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f} (figures taken under load are noisy), guest {format_size(args.size)} "
          f"(at least 2 host pages), "
          f"dest workload random batch=1 threads={args.threads} {args.dirty_rate >> 20} MiB/s, "
          f"switch at {args.after_percent} %, median of {args.repeat}, cpu hogs {args.cpu_hog}")
    for name, pr in probes.items():
        env = envs.get(name, {})
        extra = ""
        if env.get("rate-bps"):
            extra = (f", tbf {env['rate-bps'] / 1e9:g} Gbit/s burst {env['burst']} B "
                     f"latency {env['latency-s'] * 1000:g} ms (~{env['queue-bytes'] >> 10} KiB queue)")
        print(f"link {name}: RTT p50 {pr['rtt-us']['p50']:.0f} us p99 {pr['rtt-us']['p99']:.0f} us, goodput "
              f"{pr['rate-Bps'] * 8 / 1e9:.2f} Gbit/s, RTT beside a bulk flow p50 "
              f"{fmt_us(pr['loaded-rtt-us'].get('p50'))} p99 {fmt_us(pr['loaded-rtt-us'].get('p99'))}{extra}")
    head = (f"{'link':<8} {'page':>4} {'case':<22} {'count':>6} {'avg':>9} {'p50':>9} {'p99':>9} "
            f"{'floor':>9} {'van/p99':>7} {'p99/flr':>7} {'total':>7}  status")
    print(head)
    print("-" * len(head))
    for c in cases:
        lat = c.get("latency-us")
        pre = f"{c['link']:<8} {page_label(c['page-size']):>4} {c['case']:<22}"
        if not lat:
            print(f"{pre} ERROR {c.get('error')}")
            continue
        r1, r2 = c.get("vanilla/case-p99"), c.get("case/floor-p99")
        print(f"{pre} {lat['count']:>6} {fmt_us(lat['avg']):>9} {fmt_us(lat['p50']):>9} {fmt_us(lat['p99']):>9} "
              f"{fmt_us(c.get('floor-us')):>9} {'-' if r1 is None else f'{r1:.1f}x':>7} "
              f"{'-' if r2 is None else f'{r2:.1f}x':>7} {c['total-time-ms'] / 1000:>6.1f}s  "
              f"{'ok' if c['ok'] else 'FAILED: ' + c.get('error', '')}")
    print("latency = request sent -> host page placed (destination); +uffd: the kernel's fault (its message "
          "read by the fault thread) -> the UFFDIO_COPY that wakes the guest. floor = RTT p50 + one host page at "
          "the link's goodput. van/p99 = vanilla p99 / case p99; p99/flr = case p99 / floor.")
    for c in cases:
        if c.get("uffd/inproc-p50") is not None or c.get("uffd/inproc-p99") is not None:
            print(f"  {c['link']:<8} {page_label(c['page-size']):>4} {c['case']:<22} uffd/in-process p50 "
                  f"{c.get('uffd/inproc-p50')}x p99 {c.get('uffd/inproc-p99')}x")
    print_trace(cases)
    print("total time, median [min-max], and case/vanilla (target <= 1.2x):")
    for c in cases:
        if c.get("total-time-ms") is None:
            continue
        sp = c.get("total-time-ms-spread") or [c["total-time-ms"]] * 2
        r = c.get("total/vanilla")
        print(f"  {c['link']:<8} {page_label(c['page-size']):>4} {c['case']:<22} {c['total-time-ms'] / 1000:6.2f}s "
              f"[{sp[0] / 1000:.2f}-{sp[1] / 1000:.2f}]  {'-' if r is None else f'{r:.2f}x'}")
    print_split(cases)
    if tg:
        print(f"targets on the rate-limited link (p99 <= {FLOOR_FACTOR:g}x floor; vanilla/preempt p99 >= "
              f"{SPEEDUP_4K:g}x on 4K):")
        for case, t in tg.items():
            print(f"  {case:<17} " + "  ".join(f"{k} {verdict(v)}" for k, v in t.items()))


def print_trace(cases: list[dict]) -> None:
    """The request trace (engine/reqtrace.py): p50 / p99 of each step, per case."""
    rows = [c for c in cases if c.get("trace-us")]
    if not rows:
        return
    short = [s.replace("request-", "req-").replace("arrived", "arr") for s in STEPS]
    w = max(15, *(len(s) for s in short))
    print("request trace, per step p50/p99 (both workers on this host: CLOCK_MONOTONIC compares across them; "
          "req-arr / arr: the kernel received the request / the page's last bytes, SO_TIMESTAMPNS):")
    head = f"{'link':<8} {'page':>4} {'case':<22} " + " ".join(f"{s:>{w}}" for s in short)
    print(head)
    for c in rows:
        t = c["trace-us"]
        cells = " ".join(f"{fmt_us(t[s]['p50']) + '/' + fmt_us(t[s]['p99']):>{w}}"
                         if t.get(s, {}).get("count") else f"{'-':>{w}}" for s in STEPS)
        print(f"{c['link']:<8} {page_label(c['page-size']):>4} {c['case']:<22} {cells}")


@contextlib.contextmanager
def cpu_hogs(n: int):
    """``n`` processes spinning on the CPU beside the workers (a busy host), stopped after."""
    import multiprocessing as mp
    procs = [mp.get_context("spawn").Process(target=_spin, name=f"cpu-hog-{i}", daemon=True) for i in range(n)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.join(5)


def _spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def uffd_backing(args, page_size: int):
    """A runner with the destination's guest in its own process (userfaultfd).

    With --uffd-hugetlb and huge host pages, the huge pages it needs are
    reserved for the run and given back after.
    """
    from ferry_migrate.engine.guestlocal import run_local_migration_uffd
    from ferry_migrate.engine.ram import hugepage_status

    if not (args.uffd_hugetlb and page_size > C.TARGET_PAGE_SIZE):
        yield run_local_migration_uffd
        return
    need = args.size // page_size + 1
    d = f"/sys/kernel/mm/hugepages/hugepages-{page_size >> 10}kB"
    _, total = hugepage_status(page_size)
    with open(f"{d}/free_hugepages") as f, open(f"{d}/resv_hugepages") as g:
        available = int(f.read()) - int(g.read())  # free and not promised to a mapping already
    added = max(0, need - available)
    path = f"{d}/nr_hugepages"
    if added:
        with open(path, "w") as f:
            f.write(str(total + added))

    def runner(uri, guest, **kw):
        guest.backing = "hugetlb"
        return run_local_migration_uffd(uri, guest, **kw)
    try:
        yield runner
    finally:
        if added:
            _, total = hugepage_status(page_size)
            with open(path, "w") as f:
                f.write(str(max(0, total - added)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--tls", action="store_true", help="run every case also with tls-creds (case+tls)")
    p.add_argument("--links", default="loopback,netns", help="comma list of loopback, netns (default both)")
    p.add_argument("--knobs", action="store_true", help="also the shared-bottleneck knob cases")
    p.add_argument("--cases", help="comma list of case names to run (default: all; --quick: fewer)")
    p.add_argument("--sndbuf", type=size_type, default=256 << 10, help="precopy-sndbuf for knob cases")
    p.add_argument("--rcvbuf", type=size_type, default=256 << 10, help="precopy-rcvbuf for knob cases")
    p.add_argument("--probe-seconds", type=float, default=1.0, help="bulk push per link for the goodput")
    p.add_argument("--uffd", action="store_true",
                   help="also run each case with the destination's guest in its own process, its faults "
                        "served through userfaultfd (engine/guestproc.py); case names get '+uffd'")
    p.add_argument("--uffd-hugetlb", action="store_true",
                   help="with --uffd: 2M/1G guests on real huge pages (reserved here and given back)")
    p.add_argument("--cpu-hog", type=int, default=0, metavar="N",
                   help="N processes spinning on the CPU beside the workers during every case (a busy host)")
    a = p.parse_args(argv)
    finish_args(p, a, "128M")
    if a.cpu_hog < 0:
        p.error("--cpu-hog must be >= 0")
    a.links = [x.strip() for x in a.links.split(",") if x.strip()]
    bad = [x for x in a.links if x not in ("loopback", "netns")]
    if bad or not a.links:
        p.error(f"--links: {bad or 'empty'}; expected loopback and/or netns")
    a.cases = [x.strip() for x in a.cases.split(",") if x.strip()] if a.cases else None
    if a.quick and a.probe_seconds == 1.0:
        a.probe_seconds = 0.5
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    plan = case_table(args)
    if "netns" in args.links:
        cleanup_stale()
    load0 = load_note()
    t0 = time.monotonic()
    tls_dir = ""
    if args.tls:
        import tempfile

        from ferry_migrate.engine.certs import make_certs
        tls_dir = tempfile.mkdtemp(prefix="ferry-bench-tls-")
        make_certs(tls_dir, hosts=(TLS_NAME,))
    cases, probes, envs, floors, skipped = [], {}, {}, {}, {}
    try:
        for link_name in args.links:
            with contextlib.ExitStack() as stack:
                try:
                    link = stack.enter_context(open_link(link_name, args.shape))
                except TestbedError as e:
                    print(f"bench_preempt: link {link_name} skipped: {e}", file=sys.stderr)
                    skipped[link_name] = str(e)
                    continue
                envs[link_name] = link.describe()
                print(f"... {link_name}: probing RTT and goodput", file=sys.stderr, flush=True)
                probes[link_name] = link.probe(args.probe_seconds)
                for ps in args.page_sizes:
                    floors[(link_name, ps)] = floor_us(probes[link_name], ps)
                    for name, caps, params, huge_only in plan:
                        if huge_only and ps == C.TARGET_PAGE_SIZE:
                            continue
                        if params.get("precopy-pacing-rate") == PACE:
                            params = {**params,
                                      "precopy-pacing-rate": int(probes[link_name]["rate-Bps"] * PACE_SHARE)}
                        uffd_only = params.get("postcopy-receiver") == "process"
                        if uffd_only and not args.uffd:
                            print(f"... {link_name} {page_label(ps)} {name}: skipped, needs --uffd", file=sys.stderr)
                            continue
                        if not uffd_only:
                            print(f"... {link_name} {page_label(ps)} {name}", file=sys.stderr, flush=True)
                            with cpu_hogs(args.cpu_hog):
                                runs = [run_case(link, args.size, ps, caps, params, args, name)
                                        for _ in range(args.repeat)]
                            cases.append(merge_runs(runs))
                        if args.tls:
                            # Same case, same link, right after, every channel over TLS.
                            print(f"... {link_name} {page_label(ps)} {name}+tls", file=sys.stderr, flush=True)
                            runs = [run_case(link, args.size, ps, caps, {**params, "tls-creds": tls_dir, "tls-hostname": TLS_NAME}, args,
                                             f"{name}+tls") for _ in range(args.repeat)]
                            cases.append(merge_runs(runs))
                        if args.uffd:
                            # Same case, same link, right after: the guest in its own process.
                            print(f"... {link_name} {page_label(ps)} {name}+uffd", file=sys.stderr, flush=True)
                            with uffd_backing(args, ps) as runner, cpu_hogs(args.cpu_hog):
                                runs = [run_case(link, args.size, ps, caps, params, args, f"{name}+uffd",
                                                 runner=runner) for _ in range(args.repeat)]
                            cases.append(merge_runs(runs))
    except KeyboardInterrupt:
        print("bench_preempt: interrupted; processes and namespaces removed", file=sys.stderr)
        return 130
    except TestbedError as e:
        print(f"bench_preempt: {e}", file=sys.stderr)
        return 2
    add_ratios(cases, floors)
    tg = targets(cases) if "netns" in probes else {}
    print_report(cases, probes, tg, args, envs)
    if args.json:
        print(json.dumps({
            "tool": "bench_preempt", "date": datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "size": args.size, "quick": args.quick,
            "load-start": load0, "load-end": load_note(), "wall-s": round(time.monotonic() - t0, 1),
            "workload": {"pattern": "random", "batch": 1, "threads": args.threads, "dirty-rate": args.dirty_rate},
            "after-percent": args.after_percent, "repeat": args.repeat, "cpu-hog": args.cpu_hog,
            "links": envs, "probes": probes, "skipped-links": skipped,
            "floors-us": {f"{k[0]}/{page_label(k[1])}": round(v, 1) for k, v in floors.items()},
            "cases": cases, "targets": tg, "all-ok": all(c.get("ok") for c in cases),
        }))
    return 0 if all(c.get("ok") for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
