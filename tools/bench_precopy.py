"""Precopy throughput benchmark: Ferry against the raw-socket ceiling.

Each case migrates a guest of non-zero RAM between two spawned processes
(engine.local.run_local_migration) over TCP loopback or a Unix socket, with
4 KiB or 2 MiB host pages, the guest paused (no workload) or dirtying memory.
Right after each migration the same number of bytes (what Ferry sent,
ram.transferred) goes through a bare socket between two processes: the
sender sendall()s a 1 MiB buffer repeatedly, the receiver recv_into()s a
preallocated 4 MiB buffer and acks the last byte. That is the ceiling.

By default (as destination workers do) the destination backs its guest RAM before it listens
(GuestConfig.dest_prealloc, QEMU's -mem-prealloc), so first-touch page faults
(expensive in a VM) fall outside the measured window.

Throughput = bytes transferred / transfer-time, where transfer-time runs from
the migration's start to the destination's confirmation of the load (the end
of the downtime). The digest check that follows (verify-time) is excluded;
the ceiling is timed the same way (first send to the receiver's ack).

Each case runs with the capability page-checksums on (Ferry's default: a
check value per page, computed on the source from a staging copy while the
guest runs, checked on the destination before placing) and off, one after the
other, and the table ends with the throughput ratio on/off per case.

    python tools/bench_precopy.py                  # 1 GiB, all cases
    python tools/bench_precopy.py --quick --json   # 256 MiB, JSON last line
    python tools/bench_precopy.py --page-checksums on   # only with checks
    python tools/bench_precopy.py --tls --transports tcp --repeat 3   # each case plain and over TLS

With ``--multifd 0,1,2`` every case runs with the capability multifd off (0) and with 1 and 2
multifd channels; the ceiling of an N-channel case is N bare sockets at once, and the table
adds the multifd/single-channel ratio with the spread (worst and best of the repeats).

With ``--peer qemu`` each tcp 4 KiB run is followed by the same migration between two QEMU 7.2
processes (tools/qemu_peer.py; same size, random contents, destination preallocated, the same
multifd-channels), and the table adds the Ferry/QEMU ratio of the medians with both spreads.

With ``--tls`` every case runs twice, without and with TLS on the channel
(``tls-creds`` made by engine/certs.py in a temporary directory); the table
adds the TLS/plain throughput ratio.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime

from ferry_migrate.engine.local import GuestConfig, run_local_migration
from ferry_migrate.engine.ram import format_size
from ferry_migrate.engine.workload import WorkloadConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qemu_peer  # noqa: E402 - tools/qemu_peer.py, next to this file
from bench_args import page_sizes_arg, positive_arg, size_arg  # noqa: E402 - tools/bench_args.py

TARGET_4K = 0.40  # share of the ceiling to reach with 4 KiB host pages
TARGET_HUGE = 0.70  # with 2 MiB (or 1 GiB) host pages
SEND_CHUNK = 1 << 20  # the raw sender's buffer (Ferry's writer flushes every >= 1 MiB)
RECV_BUF = 4 << 20  # the raw receiver's buffer (Ferry's reader buffer)
MIB = 1 << 20
_TICK = os.sysconf("SC_CLK_TCK")


def _busy_cpu() -> float:
    """CPU seconds the whole machine spent busy so far (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / _TICK  # all but idle and iowait


def _own_cpu() -> float:
    """CPU seconds of this process and its finished children."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def wait_idle(limit: float, busy_max: float = 0.15) -> None:
    """Wait (at most ``limit`` s) for a 1 s sample with the machine < busy_max busy."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        b0 = _busy_cpu()
        time.sleep(1.0)
        if (_busy_cpu() - b0) / (os.cpu_count() or 1) < busy_max:
            return
    if limit > 0:
        print(f"    machine still busy after {limit:.0f} s; measuring anyway", file=sys.stderr, flush=True)


# --- raw-socket ceiling -------------------------------------------------------

def _raw_receiver(conn, family: str, path: str, nbytes: int) -> None:
    """Accept one connection, read nbytes into a reused buffer, ack with one byte."""
    try:
        if family == "unix":
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(path)
            addr = path
        else:
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            srv.bind(("127.0.0.1", 0))
            addr = srv.getsockname()
        srv.listen(1)
        conn.send(("listening", addr))
        s, _ = srv.accept()
        buf = memoryview(bytearray(RECV_BUF))
        got = 0
        while got < nbytes:
            n = s.recv_into(buf[:min(RECV_BUF, nbytes - got)])
            if n == 0:
                raise ConnectionError(f"sender closed after {got} of {nbytes} bytes")
            got += n
        s.sendall(b"\x01")
        s.close()
        srv.close()
        conn.send(("done", got))
    except Exception as e:  # noqa: BLE001 - report to the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _raw_sender(conn, family: str, addr, nbytes: int) -> None:
    """Connect, sendall nbytes from a 1 MiB non-zero buffer, wait for the ack."""
    try:
        fam = socket.AF_UNIX if family == "unix" else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.connect(addr if family == "unix" else tuple(addr))
        if fam == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Ferry's transport
        chunk = memoryview(os.urandom(SEND_CHUNK))
        t0 = time.monotonic()
        left = nbytes
        while left > 0:
            n = min(left, SEND_CHUNK)
            s.sendall(chunk[:n])
            left -= n
        if s.recv(1) != b"\x01":
            raise ConnectionError("receiver did not ack")
        dt = time.monotonic() - t0
        s.close()
        conn.send(("done", dt))
    except Exception as e:  # noqa: BLE001
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _wait(conn, proc, what: str, timeout: float):
    if not conn.poll(timeout):
        raise RuntimeError(f"{what}: no answer in {timeout:.0f} s (exit code {proc.exitcode})")
    kind, val = conn.recv()
    if kind == "error":
        raise RuntimeError(f"{what}: {val}")
    return val


def raw_ceiling(family: str, nbytes: int, tmpdir: str, timeout: float = 300.0, conns: int = 1) -> float:
    """Seconds to push nbytes through ``conns`` bare sockets (nbytes / conns each, a sender and a
    receiver process per socket, all at once): the slowest sender's time."""
    ctx = mp.get_context("spawn")
    paths = [os.path.join(tmpdir, f"raw{i}.sock") for i in range(conns)]
    share = -(-nbytes // conns)
    procs = []
    try:
        receivers, senders = [], []
        for path in paths:
            rp, rc = ctx.Pipe()
            recv = ctx.Process(target=_raw_receiver, args=(rc, family, path, share), daemon=True)
            recv.start()
            procs.append(recv)
            receivers.append((rp, recv, _wait(rp, recv, "raw receiver", 60)))
        for _, _, addr in receivers:
            sp, sc = ctx.Pipe()
            send = ctx.Process(target=_raw_sender, args=(sc, family, addr, share), daemon=True)
            send.start()
            procs.append(send)
            senders.append((sp, send))
        dt = max(_wait(sp, send, "raw sender", timeout) for sp, send in senders)
        for rp, recv, _ in receivers:
            _wait(rp, recv, "raw receiver", 10)
        return dt
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for path in paths:
            if os.path.exists(path):
                os.unlink(path)


# --- one case -------------------------------------------------------------------

def run_case(transport: str, page_size: int, workload: bool, args, tmpdir: str, checks: bool = True,
             tls: str = "", multifd: int = 0) -> dict:
    """One migration plus its ceiling, repeated; returns all figures (``checks``: capability page-checksums;
    ``tls``: a tls-creds dir, '' = plain; ``multifd``: multifd-channels, 0 = capability multifd off, and the
    ceiling then uses as many parallel sockets)."""
    runs, qemu_runs = [], []
    qemu_blob = getattr(args, "qemu_blob", None) if transport == "tcp" and page_size == 4096 else None
    for _ in range(args.repeat):
        wait_idle(args.wait_idle)
        busy0, own0, t0 = _busy_cpu(), _own_cpu(), time.monotonic()
        uri = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{os.path.join(tmpdir, 'ferry.sock')}"
        wl = WorkloadConfig(pattern=args.pattern, dirty_rate=args.dirty_rate) if workload else None
        guest = GuestConfig(size=args.size, page_size=page_size, fill=args.fill, workload=wl,
                            dest_prealloc=args.prealloc)
        src, dst = run_local_migration(uri, guest, timeout=args.timeout, warm=0.5 if workload else 0.0,
                                       caps={"page-checksums": checks, **({"multifd": True} if multifd else {})},
                                       params={"downtime-limit": args.downtime_limit,
                                               **({"multifd-channels": multifd} if multifd else {}),
                                               **({"tls-creds": tls} if tls else {})})
        if src.get("status") != "completed" or dst.get("status") != "completed":
            raise RuntimeError(f"migration {transport}/{format_size(page_size)}: source "
                               f"{src.get('status')} ({src.get('error-desc', '')}), destination "
                               f"{dst.get('status')} ({dst.get('error-desc', '')})")
        nbytes = src["ram"]["transferred"]
        t_mig = src["transfer-time"] / 1000
        t_raw = raw_ceiling(transport, nbytes, tmpdir, args.timeout, max(1, multifd))
        # CPU used meanwhile by processes not ours, in % of all CPUs: a noise indicator.
        foreign = max(0.0, (_busy_cpu() - busy0) - (_own_cpu() - own0))
        foreign_pct = 100 * foreign / ((time.monotonic() - t0) * (os.cpu_count() or 1))
        if args.peer == "qemu" and qemu_blob:
            # The same guest on QEMU 7.2, right after (interleaved with) Ferry's run.
            qr = qemu_peer.run_qemu(args.size, qemu_blob, multifd, args.downtime_limit, tmpdir, args.timeout)
            qemu_runs.append(qr)
        runs.append({
            "transferred": nbytes, "transfer-time-ms": src["transfer-time"],
            "verify-time-ms": src["verify-time"], "total-time-ms": src["total-time"],
            "setup-time-ms": src["setup-time"], "downtime-ms": src.get("downtime", 0),
            "passes": src["ram"]["dirty-sync-count"], "precopy-bytes": src["ram"]["precopy-bytes"],
            "downtime-bytes": src["ram"]["downtime-bytes"], "normal-pages": src["ram"]["normal"],
            "zero-pages": src["ram"]["duplicate"],
            "mibps": nbytes / MIB / t_mig, "ceiling-s": round(t_raw, 4),
            "ceiling-mibps": nbytes / MIB / t_raw, "foreign-cpu-pct": foreign_pct,
        })
    med = statistics.median
    mibps = med(r["mibps"] for r in runs)
    ceiling = med(r["ceiling-mibps"] for r in runs)
    target = TARGET_4K if page_size == 4096 else TARGET_HUGE
    ratio = mibps / ceiling
    qemu = {}
    if qemu_runs:
        q = [r["mibps"] for r in qemu_runs]
        qemu = {"qemu-mibps": round(med(q), 1), "qemu-mibps-worst": round(min(q), 1),
                "qemu-mibps-best": round(max(q), 1), "ferry-qemu-ratio": round(mibps / med(q), 3),
                "qemu-runs": [{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}
                              for r in qemu_runs]}
    return {
        **qemu,
        "transport": transport, "page-size": page_size, "workload": workload, "page-checksums": checks,
        "tls": bool(tls), "multifd": multifd,
        "mibps": round(mibps, 1), "mibps-best": round(max(r["mibps"] for r in runs), 1),
        "mibps-worst": round(min(r["mibps"] for r in runs), 1),
        "ceiling-mibps": round(ceiling, 1), "ratio": round(ratio, 3), "target": target,
        "pass": ratio >= target,
        "downtime-ms": statistics.median_low(r["downtime-ms"] for r in runs),
        "passes": statistics.median_low(r["passes"] for r in runs),
        "transferred": int(med(r["transferred"] for r in runs)),
        "foreign-cpu-pct": round(max(r["foreign-cpu-pct"] for r in runs), 1),
        "runs": [{k: (round(v, 1) if isinstance(v, float) and k != "ceiling-s" else v) for k, v in r.items()}
                 for r in runs],
    }


# --- output -----------------------------------------------------------------------

def print_table(cases: list[dict], args) -> None:
    print(f"Ferry precopy benchmark, {datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, "
          f"guest {format_size(args.size)} fill={args.fill}, "
          f"workload {args.pattern} {args.dirty_rate // MIB} MiB/s when dirtying, "
          f"median of {args.repeat}{', destination RAM preallocated' if args.prealloc else ''}")
    head = (f"{'transport':<9} {'page':>4} {'guest':<8} {'checks':<6} {'mfd':>3} {'MiB/s':>7} {'worst':>7} "
            f"{'best':>7} {'ceiling':>8} "
            f"{'ratio':>6} {'target':>6} {'':4} {'downtime':>9} {'passes':>6} {'sent MiB':>8} {'other CPU':>9}")
    print(head)
    print("-" * len(head))
    for c in cases:
        page = "4K" if c["page-size"] == 4096 else format_size(c["page-size"]).replace(" MiB", "M").replace(" GiB", "G")
        print(f"{c['transport'] + ('+tls' if c.get('tls') else ''):<9} {page:>4} "
              f"{'dirtying' if c['workload'] else 'paused':<8} "
              f"{'on' if c['page-checksums'] else 'off':<6} {c.get('multifd', 0):>3} "
              f"{c['mibps']:>7.0f} {c['mibps-worst']:>7.0f} {c['mibps-best']:>7.0f} {c['ceiling-mibps']:>8.0f} "
              f"{c['ratio'] * 100:>5.0f}% {c['target'] * 100:>5.0f}% {'PASS' if c['pass'] else 'MISS':4} "
              f"{c['downtime-ms']:>6} ms {c['passes']:>6} {c['transferred'] / MIB:>8.0f} {c['foreign-cpu-pct']:>8.0f}%")
    plain = {(c["transport"], c["page-size"], c["workload"], c["page-checksums"], c.get("multifd")): c
             for c in cases if not c.get("tls")}
    for c in cases:
        base = plain.get((c["transport"], c["page-size"], c["workload"], c["page-checksums"], c.get("multifd")))
        if c.get("tls") and base:
            print(f"TLS/plain {c['transport']} {format_size(c['page-size'])} "
                  f"{'dirtying' if c['workload'] else 'paused'}: {c['mibps'] / base['mibps']:.2f} "
                  f"({c['mibps']:.0f} / {base['mibps']:.0f} MiB/s)")
    print("MiB/s = bytes sent / (start -> destination's confirmation); ceiling = same bytes through "
          "a bare socket between two processes (mfd N: N sockets at once, N pairs of processes); "
          "mfd = multifd-channels (0: multifd off); other CPU = most CPU used by processes not ours during a run.")
    base = {(c["transport"], c["page-size"], c["workload"], c["page-checksums"], c.get("tls")): c
            for c in cases if not c.get("multifd")}
    for c in cases:
        b = base.get((c["transport"], c["page-size"], c["workload"], c["page-checksums"], c.get("tls")))
        if c.get("multifd") and b:
            print(f"multifd {c['multifd']}/single channel, {c['transport']}{'+tls' if c.get('tls') else ''} "
                  f"{format_size(c['page-size'])} {'dirtying' if c['workload'] else 'paused'} "
                  f"checks {'on' if c['page-checksums'] else 'off'}: {c['mibps'] / b['mibps']:.2f} (median; "
                  f"{c['mibps-worst']:.0f}-{c['mibps-best']:.0f} against {b['mibps-worst']:.0f}-{b['mibps-best']:.0f} MiB/s)")
    for c in cases:
        if "qemu-mibps" in c:
            print(f"Ferry/QEMU 7.2, {c['transport']} {format_size(c['page-size'])} multifd {c.get('multifd', 0)} "
                  f"checks {'on' if c['page-checksums'] else 'off'}: {c['ferry-qemu-ratio']:.2f} (medians "
                  f"{c['mibps']:.0f} / {c['qemu-mibps']:.0f} MiB/s; Ferry {c['mibps-worst']:.0f}-{c['mibps-best']:.0f}, "
                  f"QEMU {c['qemu-mibps-worst']:.0f}-{c['qemu-mibps-best']:.0f})")
    for on, off in checksum_pairs(cases):
        page = format_size(on["page-size"])
        print(f"page-checksums on/off, {on['transport']} {page} {'dirtying' if on['workload'] else 'paused'}: "
              f"{on['mibps'] / off['mibps']:.2f} (median), {on['mibps-best'] / off['mibps-best']:.2f} (best)")


def checksum_pairs(cases: list[dict]) -> list[tuple[dict, dict]]:
    """(on, off) pairs of the same case measured with and without page-checksums."""
    key = lambda c: (c["transport"], c["page-size"], c["workload"], c.get("multifd"))  # noqa: E731
    off = {key(c): c for c in cases if not c["page-checksums"] and not c.get("tls")}
    return [(c, off[key(c)]) for c in cases if c["page-checksums"] and not c.get("tls") and key(c) in off]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", help="guest RAM (default 1G, 256M with --quick)")
    p.add_argument("--quick", action="store_true", help="256 MiB guest, for a fast check")
    p.add_argument("--repeat", type=int, default=1, help="runs per case; the median is reported")
    p.add_argument("--transports", default="tcp,unix", help="comma list of tcp, unix")
    p.add_argument("--page-sizes", default="4K,2M", help="comma list of host page sizes")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-workload", action="store_true", help="only the paused-guest cases")
    g.add_argument("--workload-only", action="store_true", help="only the dirtying-guest cases")
    p.add_argument("--fill", default="pattern", choices=("pattern", "random"), help="guest contents (non-zero)")
    p.add_argument("--pattern", default="hotset", help="workload pattern when dirtying")
    p.add_argument("--dirty-rate", default="64M", help="workload dirty rate, bytes/s")
    p.add_argument("--downtime-limit", type=int, default=300, help="ms")
    p.add_argument("--prealloc", action=argparse.BooleanOptionalAction, default=True,
                   help="the destination backs its guest RAM before the migration (dest_prealloc, as "
                        "destination workers do by default); --no-prealloc leaves it to first touch")
    p.add_argument("--timeout", type=float, default=300.0, help="s per migration")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each run, wait up to S s for the machine to be idle (shared hosts)")
    p.add_argument("--page-checksums", default="on,off", metavar="on,off",
                   help="run each case with the capability page-checksums on and/or off (default both, "
                        "one after the other)")
    p.add_argument("--multifd", default="0", metavar="N[,M...]",
                   help="comma list of multifd-channels to run each case with; 0 = capability multifd off "
                        "(default 0; e.g. 0,1,2 compares the single channel with 1 and 2 multifd channels)")
    p.add_argument("--peer", default="ferry", choices=("ferry", "qemu"),
                   help="qemu: after each Ferry run of a tcp 4K case, the same migration between two QEMU 7.2 "
                        "processes (paused guest of random bytes, destination preallocated, same multifd-channels); "
                        "the table adds the Ferry/QEMU ratio of the medians (tools/qemu_peer.py)")
    p.add_argument("--json", action="store_true", help="print all figures as one JSON object, last line")
    p.add_argument("--tls", action="store_true", help="run every case also over TLS (tcp only) and report the ratio")
    a = p.parse_args(argv)
    a.page_checksums = [v.strip() for v in a.page_checksums.split(",") if v.strip()]
    if not a.page_checksums or any(v not in ("on", "off") for v in a.page_checksums):
        p.error(f"--page-checksums: {a.page_checksums}; expected on and/or off")
    a.page_checksums = [v == "on" for v in a.page_checksums]
    try:
        a.multifd = [int(v) for v in a.multifd.split(",") if v.strip()]
    except ValueError:
        p.error(f"--multifd: {a.multifd!r}; expected a comma list of channel counts (0 = off)")
    if not a.multifd or any(not 0 <= v <= 255 for v in a.multifd):
        p.error(f"--multifd: {a.multifd}; expected counts from 0 (off) to 255")
    a.size = size_arg(p, "--size", a.size or ("256M" if a.quick else "1G"), positive=True)
    a.dirty_rate = size_arg(p, "--dirty-rate", a.dirty_rate)
    positive_arg(p, "--timeout", a.timeout)
    a.transports = [t.strip() for t in a.transports.split(",") if t.strip()]
    bad = [t for t in a.transports if t not in ("tcp", "unix")]
    if bad or not a.transports:
        p.error(f"--transports: {bad or 'empty'}; expected tcp and/or unix")
    a.page_sizes = page_sizes_arg(p, "--page-sizes", a.page_sizes)
    if a.repeat < 1:
        p.error("--repeat must be >= 1")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    modes = [False, True]
    if args.no_workload:
        modes = [False]
    elif args.workload_only:
        modes = [True]
    tmpdir = tempfile.mkdtemp(prefix="ferry-bench-")
    creds = ""
    if args.tls:
        from ferry_migrate.engine.certs import make_certs
        creds = os.path.join(tmpdir, "tls")
        make_certs(creds)
    cases = []
    if args.peer == "qemu":
        why = qemu_peer.available()
        if why:
            print(f"bench_precopy: --peer qemu: {why}", file=sys.stderr)
            return 1
        print("... writing the QEMU guest's random contents", file=sys.stderr, flush=True)
        args.qemu_blob = qemu_peer.random_blob(os.path.join(tmpdir, "qemu-guest.bin"), args.size - 2 * MIB)
    try:
        for transport in args.transports:
            for ps in args.page_sizes:
                for wl in modes:
                    for checks in args.page_checksums:
                        for mfd in args.multifd:
                            print(f"... {transport} {format_size(ps)} {'dirtying' if wl else 'paused'} "
                                  f"page-checksums {'on' if checks else 'off'} multifd {mfd}",
                                  file=sys.stderr, flush=True)
                            cases.append(run_case(transport, ps, wl, args, tmpdir, checks, multifd=mfd))
                            if args.tls and transport == "tcp":
                                print(f"... {transport}+tls {format_size(ps)} {'dirtying' if wl else 'paused'}",
                                      file=sys.stderr, flush=True)
                                cases.append(run_case(transport, ps, wl, args, tmpdir, checks, tls=creds,
                                                      multifd=mfd))
    except (RuntimeError, ValueError, OSError) as e:
        print(f"bench_precopy: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    print_table(cases, args)
    if args.json:
        print(json.dumps({
            "date": datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "python": platform.python_version(), "size": args.size, "fill": args.fill,
            "repeat": args.repeat, "prealloc": args.prealloc,
            "workload": {"pattern": args.pattern, "dirty-rate": args.dirty_rate},
            "downtime-limit": args.downtime_limit, "cases": cases,
            "page-checksums-ratio": [{"transport": on["transport"], "page-size": on["page-size"],
                                      "workload": on["workload"], "median": round(on["mibps"] / off["mibps"], 3),
                                      "best": round(on["mibps-best"] / off["mibps-best"], 3)}
                                     for on, off in checksum_pairs(cases)],
            "all-pass": all(c["pass"] for c in cases),
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
