"""The `ferry` command line.

    ferry demo                      migrate a running 256 MiB guest between two local workers
    ferry worker --role ROLE --control ENDPOINT [guest options]
    ferry migrate --source EP --destination EP [--uri U] [--cap C[=on|off]] [--param K=V]
    ferry query EP | ferry events EP | ferry call EP VERB [JSON]
    ferry keys DIR                  CURVE key pairs for workers reachable from other hosts
    ferry reference                 capabilities, parameters and verbs, with their ranges
    ferry testbed up|down           network namespaces joined by veth, with workers inside
    ferry experiment run FILE.toml  a sweep of migrations, one JSON record per run

Every command takes --json for scripts. Exit status: 0 success, 1 the
migration or command failed, 2 bad usage or configuration, 3 the control plane
could not be reached (or refused us).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time

from . import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_PAUSED = 0, 1, 2, 3, 4


# --- option groups -----------------------------------------------------------

def positive_seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds greater than 0")
    return v


def add_guest_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guest", "shape of the guest's RAM (the same on both workers) and its workload")
    g.add_argument("--size", default="256M", help="guest RAM size, e.g. 32M, 1G (default 256M)")
    g.add_argument("--page-size", default="4K", help="host page size of the RAM blocks: 4K, 2M or 1G (default 4K)")
    g.add_argument("--backing", default="anon", choices=("anon", "memfd", "hugetlb"),
                   help="memory behind the RAM blocks (hugetlb needs reserved huge pages)")
    g.add_argument("--blocks", type=int, default=1, help="number of RAM blocks the size is split into")
    g.add_argument("--guest", default="in-process", choices=("in-process", "process"),
                   help="where the guest runs: in-process (threads of the worker; the default, works "
                        "everywhere) or process (`ferry guest`, a process of its own whose memory the "
                        "kernel faults in through userfaultfd on a destination and whose writes are tracked "
                        "with write-protect on a source; anon backing becomes memfd; docs/uffd.md)")
    g.add_argument("--no-mem-prealloc", dest="mem_prealloc", action="store_false",
                   help="a destination worker backs its RAM when it starts (QEMU's -mem-prealloc), so "
                        "faulting fresh memory in does not slow the migration and throw off the downtime "
                        "estimate; this leaves it to first touch instead")
    g.add_argument("-S", "--no-autostart", dest="autostart", action="store_false",
                   help="a destination does not start the guest when a precopy migration completes; "
                        "`cont` starts it (QEMU's -S)")
    g.add_argument("--fill", default="mixed", choices=("zero", "pattern", "random", "mixed"),
                   help="initial contents on the source (mixed: 1 page in 4 is zero)")
    g.add_argument("--workload-threads", type=int, default=1,
                   help="guest threads writing to RAM (0: an idle guest); on a destination they start "
                        "only when a postcopy migration hands the guest over")
    g.add_argument("--workload-pattern", default="hotset", choices=("sequential", "random", "hotset", "zipf"),
                   help="which pages the guest touches (hotset: --workload-hot-fraction of the pages take 90%% "
                        "of the touches; zipf: page of rank r with probability ~ r^-a)")
    g.add_argument("--dirty-rate", default="32M", help="bytes of pages the guest touches per second, e.g. 64M "
                                                      "(0: as fast as it can)")
    g.add_argument("--workload-write-ratio", type=float, default=1.0, metavar="R",
                   help="share of touches that write (the rest only read), 0..1 (default 1)")
    g.add_argument("--workload-hot-fraction", type=float, default=0.1, metavar="F",
                   help="hotset pattern: share of the pages that are hot, (0, 1] (default 0.1)")
    g.add_argument("--workload-zipf-a", type=float, default=1.2, metavar="A",
                   help="zipf pattern: exponent, > 1; larger is more skewed (default 1.2)")
    g.add_argument("--workload-batch", type=int, default=None, metavar="PAGES",
                   help="pages a guest thread touches per step, 1..4096 (1: one access at a time, like a "
                        "vCPU's faults; default 64)")


def guest_options(args) -> list[str]:
    """The guest options of ``args`` as worker command-line arguments."""
    out = ["--size", str(args.size), "--page-size", str(args.page_size), "--backing", args.backing,
           "--blocks", str(args.blocks), "--fill", args.fill, "--workload-threads", str(args.workload_threads),
           "--workload-pattern", args.workload_pattern, "--dirty-rate", str(args.dirty_rate),
           "--workload-write-ratio", str(args.workload_write_ratio),
           "--workload-hot-fraction", str(args.workload_hot_fraction),
           "--workload-zipf-a", str(args.workload_zipf_a)]
    if args.workload_batch is not None:
        out += ["--workload-batch", str(args.workload_batch)]
    if getattr(args, "guest", "in-process") != "in-process":
        out += ["--guest", args.guest]
    if not args.mem_prealloc:
        out.append("--no-mem-prealloc")
    if not getattr(args, "autostart", True):
        out.append("-S")
    return out


def make_guest(args):
    from .worker import guest_config

    return guest_config(size=args.size, page_size=args.page_size, backing=args.backing, blocks=args.blocks,
                        fill=args.fill, workload_threads=args.workload_threads,
                        workload_pattern=args.workload_pattern, dirty_rate=args.dirty_rate,
                        write_ratio=args.workload_write_ratio, hot_fraction=args.workload_hot_fraction,
                        zipf_a=args.workload_zipf_a, batch=args.workload_batch, prealloc=args.mem_prealloc,
                        autostart=getattr(args, "autostart", True), guest=getattr(args, "guest", "in-process"))


def add_migration_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("migration", "capabilities and parameters, with QEMU's names "
                                          "(see docs/user-guide.md or `ferry call EP query-migrate-parameters`)")
    g.add_argument("--cap", action="append", default=[], metavar="NAME[=on|off]",
                   help="set a capability on both workers, e.g. --cap return-path=off (repeatable)")
    g.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="set a parameter on both workers (each uses those that concern it), e.g. "
                        "--param downtime-limit=100 or --param max-bandwidth=64M (repeatable)")


def parse_caps_params(args) -> tuple[dict, dict]:
    """--cap/--param values, checked with engine.params (the workers check again)."""
    from .control.driver import parse_cap, parse_param
    from .params import MigrationConfig

    caps = dict(parse_cap(c) for c in args.cap)
    params = dict(parse_param(p) for p in args.param)
    cfg = MigrationConfig()
    cfg.set_capabilities(caps)
    cfg.set_parameters(params)
    return caps, params


def add_client_options(p: argparse.ArgumentParser, json_help: str = "machine-readable output") -> None:
    p.add_argument("--curve-dir", metavar="DIR", help="CURVE key directory (from `ferry keys`) for workers that "
                                                      "require authentication")
    p.add_argument("--timeout", type=positive_seconds, default=10.0,
                   help="seconds to wait for each reply (default 10)")
    p.add_argument("--json", action="store_true", help=json_help)


# --- output helpers ----------------------------------------------------------

def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=None, sort_keys=False, default=str), flush=True)


def _error(msg: str, code: int) -> int:
    print(f"ferry: error: {msg}", file=sys.stderr)
    return code


def _fmt_event(ev: dict, t0: float | None = None, side: str | None = None) -> str:
    from .control.protocol import event_time

    t = event_time(ev)
    when = f"+{t - t0:7.3f} s" if t0 is not None else time.strftime("%H:%M:%S", time.localtime(t)) + \
        f".{ev.get('timestamp', {}).get('microseconds', 0):06d}"
    data = ev.get("data") or {}
    if ev.get("event") == "MIGRATION":
        what = f"MIGRATION       {data.get('status')}"
    elif ev.get("event") == "MIGRATION_PASS":
        what = f"MIGRATION_PASS  pass {data.get('pass')}"
    else:
        what = f"{ev.get('event'):<15} " + " ".join(f"{k}={v}" for k, v in data.items())
    return f"  {when}  {side + '  ' if side else ''}{what}"


def ProgressView(console, enabled: bool):
    """The live progress display (engine/control/progress.py), with this module's event lines."""
    from .control.progress import ProgressView as View

    return View(console, enabled, fmt_event=_fmt_event)


# --- commands ------------------------------------------------------------------

def cmd_worker(args) -> int:
    from .control.auth import CurveKeyError
    from .control.endpoints import EndpointError
    from .guestproc import GuestProcessError
    from .process import configure_worker_process
    from .ram import HugePagesUnavailable
    from .worker import run_worker

    configure_worker_process()
    try:
        guest = make_guest(args)
        layout = None
        if args.ram_layout == "source":
            from .layout import LayoutLimits
            from .ram import parse_size

            layout = LayoutLimits(max_total=parse_size(args.max_ram), max_blocks=args.max_blocks,
                                  backing=args.backing, prealloc=args.mem_prealloc,
                                  machine_types=tuple(args.machine_type))
        return run_worker(args.role, args.control, guest, events=args.events, curve_dir=args.curve_dir,
                          ready_json=args.json, exit_with_parent=args.exit_with_parent, layout=layout,
                          qmp=args.qmp)
    except (EndpointError, CurveKeyError, HugePagesUnavailable, ValueError) as e:
        _worker_start_failed(f"worker: {e}", EXIT_USAGE)
    except (GuestProcessError, OSError) as e:  # the guest process did not start (userfaultfd, huge pages)
        _worker_start_failed(f"worker: guest process: {type(e).__name__}: {e}", EXIT_FAILED)


def _worker_start_failed(msg: str, code: int) -> None:
    """A worker that could not start: say why and end the process now, with ``code``.

    Nothing is left to save, and an interpreter shutdown after a half-started
    control server was seen to abort (SIGABRT, "terminate called without an
    active exception" from libzmq's threads) on a loaded host, turning the exit
    code a script checks into -6.
    """
    _error(msg, code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _drive(src_ep: str, dst_ep: str, args, caps: dict, params: dict, view):
    from .control.client import ControlClient
    from .control.driver import run_migration

    async with ControlClient(src_ep, args.curve_dir, args.timeout) as src, \
            ControlClient(dst_ep, args.curve_dir, args.timeout) as dst:
        out = await run_migration(src, dst, uri=args.uri, caps=caps, params=params,
                                  timeout=args.migration_timeout,
                                  on_progress=view.on_progress if view else None,
                                  on_event=view.on_event if view else None,
                                  timeout_action=getattr(args, "timeout_action", "cancel"),
                                  resume=getattr(args, "resume", False))
        out.guest_check = None
        if out.completed and out.destination.get("guest") == "process":
            # The destination's guest process checks what it read first against the source's memory.
            from .control.client import CommandFailed
            from .process_guest import guest_check

            try:
                out.guest_check = await guest_check(src, dst)
            except CommandFailed as e:
                out.guest_check = {"error": str(e)}
        return out


def _guest_check_failed(out) -> bool:
    c = getattr(out, "guest_check", None)
    return bool(c) and (bool(c.get("mismatches")) or "error" in c)


def _guest_process_lines(out) -> list[str]:
    """The report's lines about a destination guest process (kernel faults, its own check)."""
    d, c = out.destination, getattr(out, "guest_check", None)
    if d.get("guest") != "process":
        return []
    lines = [f"  guest        a process of its own (pid {d.get('guest-pid')}): {d.get('uffd-kernel-faults', 0)} "
             f"kernel faults served through userfaultfd, {d.get('uffd-copies', 0)} UFFDIO_COPY"]
    if c is not None and "error" in c:
        lines.append(f"               its own check failed: {c['error']}")
    elif c is not None:
        lines.append(f"               its own check: {c['pages-checked']} pages read first, {c['mismatches']} "
                     "differ from the source's")
    return lines


def _say(console, line: str = "") -> None:
    """One line of human output, wrapped to the terminal (80 columns when not a terminal)."""
    from .control.report import print_wrapped

    print_wrapped(console, line)


def _report(out, console) -> None:
    from .control.report import render

    console.print()
    for line in render(out):
        _say(console, line)


def _check_uri(uri: str | None, caps: dict) -> None:
    """A migration uri that parses, and fits the capabilities (ValueError says why not)."""
    if uri is None:
        return
    from ferry_migrate.channels.transport import parse_uri

    parse_uri(uri)
    if uri.startswith("file:") and caps.get("postcopy-ram"):
        raise ValueError(f"migration uri {uri!r}: postcopy-ram needs a live destination, and a file: "
                         "stream is loaded only after it is written; migrate to file: with precopy")
    if uri.startswith("file:") and caps.get("multifd"):
        raise ValueError(f"migration uri {uri!r}: multifd needs a live destination to open its channels to; "
                         "migrate to file: without --cap multifd")


def cmd_migrate(args) -> int:
    from .control.client import ControlError
    from .params import ParameterError

    from .control.endpoints import check

    try:
        check(args.source)
        check(args.destination)
        caps, params = parse_caps_params(args)
        _check_uri(args.uri, caps)
    except (ParameterError, ValueError) as e:
        return _error(str(e), EXIT_USAGE)
    console = _console()
    view = None if args.json else ProgressView(console, enabled=True)
    if view:
        console.print(f"Migrating [bold]{args.source}[/] -> [bold]{args.destination}[/]")
    try:
        if view:
            with view:
                out = asyncio.run(_drive(args.source, args.destination, args, caps, params, view))
        else:
            out = asyncio.run(_drive(args.source, args.destination, args, caps, params, None))
    except ControlError as e:
        return _error(str(e), EXIT_UNREACHABLE if "no reply" in str(e) or "handshake" in str(e) else EXIT_FAILED)
    except KeyboardInterrupt:
        print("\nferry: interrupted; the migration goes on in the workers (cancel it with "
              f"`ferry call {args.source} migrate-cancel`)", file=sys.stderr)
        return 130
    if args.json:
        doc = out.to_dict()
        if getattr(out, "guest_check", None) is not None:
            doc["guest-check"] = out.guest_check
        _print_json(doc)
    else:
        _report(out, console)
        for line in _guest_process_lines(out):
            _say(console, line)
    if out.paused:
        resume = (f"  ferry migrate --resume --source {args.source} --destination {args.destination}"
                  + (f" --uri {args.uri}" if args.uri else ""))
        if not args.json and out.dest_never_ran:
            why = out.destination.get("error-desc") or "a fault"
            console.print(f"\n[bold yellow]postcopy-paused[/] on the source; the destination failed before it ran "
                          f"the guest ({why}). The guest's only copy is on the source, stopped: nothing is lost. "
                          "Let it run there again (the destination proves it never ran it) with:\n" + resume,
                          highlight=False)
        elif not args.json and out.destination.get("unreachable"):
            console.print(f"\n[bold yellow]postcopy-paused[/] on the source; the destination stopped answering "
                          f"({out.destination.get('error-desc')}). If its worker is gone, the guest went with it "
                          "(its memory was split between the two); the source keeps its pages and never runs its "
                          "copy again. If the destination is only unreachable, recover with:\n" + resume,
                          highlight=False)
        elif not args.json:
            asked = _paused_on_request(out)
            why = asked or out.destination.get("error-desc") or out.source.get("error-desc") or "a fault"
            then = "Recover with" if asked else "When the link is back, recover with"
            console.print(f"\n[bold yellow]postcopy-paused[/] on both sides ({why}). The guest waits on the "
                          f"destination; nothing is lost. {then}:\n" + resume, highlight=False)
        return EXIT_PAUSED
    return EXIT_OK if out.verified and not _guest_check_failed(out) else EXIT_FAILED


def _paused_on_request(out) -> str | None:
    """The error-desc of the side that migrate-pause paused, if one was (the other side then only
    saw its connection close, which reads like a fault)."""
    for side in (out.source, out.destination):
        why = side.get("error-desc") or ""
        if "migrate-pause" in why:
            return why
    return None


def _demo_intro(console, args, workers, caps, params) -> None:
    from .params import CAPABILITIES, PARAMETERS
    from .ram import format_size, parse_size

    src, dst = workers
    size = parse_size(args.size)
    wl = ("an idle guest (no workload)" if args.workload_threads == 0 else
          f"{args.workload_threads} guest thread(s) writing {format_size(parse_size(args.dirty_rate))}/s "
          f"({args.workload_pattern} pattern)")
    on = [n for n, (default, _, _) in CAPABILITIES.items() if caps.get(n, default)]
    dl = params.get("downtime-limit", PARAMETERS["downtime-limit"].default)
    bw = params.get("max-bandwidth", PARAMETERS["max-bandwidth"].default)
    _say(console, "[bold]Ferry demo[/]: live migration of a running guest between two worker processes")
    _say(console)
    process = getattr(args, "guest", "in-process") == "process"
    backing = "memfd" if process and args.backing == "anon" else args.backing
    _say(console, f"  source worker       pid {src.pid:<7} owns the guest: {format_size(size)} of RAM in "
                  f"{args.blocks} block(s), {format_size(parse_size(args.page_size))} pages, {backing} memory, "
                  "filled with data "
                  f"({args.fill}); {wl}" + ("; the guest runs in a process of its own (--guest process: "
                                           "userfaultfd, docs/uffd.md)" if process else ""))
    _say(console, f"  destination worker  pid {dst.pid:<7} owns empty RAM of the same shape and fills it from "
                  "the migration stream")
    _say(console, f"  control plane       ZeroMQ requests + event stream at {src.control} and {dst.control}")
    _say(console, f"  settings            downtime-limit {dl} ms, max-bandwidth "
                  f"{'unlimited' if not bw else f'{bw} B/s'}; capabilities on: {', '.join(on)}")
    extra = {k: v for k, v in params.items() if k not in ("downtime-limit", "max-bandwidth")}
    if extra:
        _say(console, "                      " + ", ".join(f"{k} {v}" for k, v in extra.items()))
    _say(console)
    _say(console, "  How it works: the source sends all of RAM while the guest keeps writing (pass 1), then "
                  "re-sends the pages written meanwhile (passes 2, 3, ...) until the rest fits in the downtime "
                  "limit; then it pauses the guest, sends the rest and the guest's state, and completes only "
                  "once the destination's sha256 digests of every RAM block match its own.")
    if caps.get("postcopy-ram"):
        _say(console, "  With postcopy-ram, the guest moves to the destination early (after postcopy-after-passes "
                      "or on migrate-start-postcopy) and the pages it touches before they arrive are requested "
                      "on demand.")
    _say(console)


def _check_demo_hugepages(args) -> None:
    """hugetlb: both workers run on this host, so twice the guest's huge pages must be free."""
    if args.backing != "hugetlb":
        return
    from .ram import HugePagesUnavailable, hugepage_advice, hugepage_status, parse_size

    page = parse_size(args.page_size)
    need = 2 * (parse_size(args.size) // page)
    free, _ = hugepage_status(page)
    if free < need:
        raise HugePagesUnavailable("the demo runs the source and the destination on this host, each with the "
                                   "guest's RAM: " + hugepage_advice(page, need))


def cmd_demo(args) -> int:
    from .control.client import ControlError
    from .control.spawn import WorkerStartError, spawn_worker
    from .params import ParameterError
    from .ram import HugePagesUnavailable

    try:
        make_guest(args)  # validate before starting anything
        caps, params = parse_caps_params(args)
        if not args.precopy:
            # The default demo shows postcopy with preemption: the guest moves
            # after the first pass and faults in what it touches first.
            caps = {"postcopy-ram": True, "postcopy-preempt": True, **caps}
            if caps["postcopy-ram"] and not {"postcopy-after-passes", "postcopy-after-percent"} & set(params):
                params = {"postcopy-after-passes": 1, **params}
            from .params import MigrationConfig

            check = MigrationConfig()
            check.set_capabilities(caps)
            check.set_parameters(params)
        if "multifd-channels" in params and not caps.get("multifd"):
            # The demo's workers start with multifd off: the parameter alone would change nothing.
            raise ValueError(f"parameter 'multifd-channels' {params['multifd-channels']}: has no effect without "
                             "the multifd capability; add --cap multifd")
        if "preempt-write-breaks" in params and not (caps.get("postcopy-ram") and caps.get("postcopy-preempt")):
            # It shapes the PRECOPY channel's writes after a preempt switch only: without one it changes nothing.
            how = "drop --precopy" if args.precopy else "leave postcopy-ram and postcopy-preempt on"
            raise ValueError(f"parameter 'preempt-write-breaks' {params['preempt-write-breaks']}: has no effect "
                             f"without postcopy-ram and postcopy-preempt; {how}")
        _check_demo_hugepages(args)
        if args.uri is not None and args.uri.startswith("file:") and caps.get("postcopy-ram"):
            raise ValueError(f"migration uri {args.uri!r}: the demo's postcopy needs a live destination; "
                             "add --precopy to save the guest to a file and load it from there")
        _check_uri(args.uri, caps)
    except (ParameterError, ValueError, HugePagesUnavailable) as e:
        return _error(str(e), EXIT_USAGE)
    if args.guest_process:
        return _demo_guest_process(args, caps, params)
    tmp = tempfile.mkdtemp(prefix="ferry-demo-")
    if args.control == "ipc" and len(tmp) < 80:
        eps = {r: f"ipc://{tmp}/{r}.ctl" for r in ("source", "destination")}
    else:
        eps = {r: "tcp://127.0.0.1:0" for r in ("source", "destination")}
    if args.uri is None:
        args.uri = f"unix:{tmp}/migration.sock" if args.stream == "unix" else "tcp:127.0.0.1:0"
    console = _console()
    workers = []
    ok = False
    try:
        for role in ("source", "destination"):
            workers.append(spawn_worker(role, eps[role], guest_options(args) + ["--exit-with-parent"],
                                        log_path=os.path.join(tmp, f"{role}.log")))
        for w in workers:
            w.wait_ready()
        if not args.json:
            _demo_intro(console, args, workers, caps, params)
            console.print("  Events as the workers publish them (seconds since the first one):")
        view = ProgressView(console, enabled=not args.json)
        with view:
            out = asyncio.run(_drive(workers[0].control, workers[1].control, args, caps, params, view))
        ok = out.verified and not _guest_check_failed(out)
        if args.json:
            doc = out.to_dict()
            if getattr(out, "guest_check", None) is not None:
                doc["guest-check"] = out.guest_check
            _print_json(doc)
        else:
            _report(out, console)
            for line in _guest_process_lines(out):
                _say(console, line)
            _say(console)
            _say(console, "  Try: [bold]ferry demo --precopy[/] (plain precopy), [bold]--precopy --dirty-rate 128M "
                          "--param downtime-limit=50[/] (more passes), [bold]--page-size 2M[/], [bold]--size 1G[/], "
                          "or [bold]--json[/]; docs/user-guide.md explains every figure.")
        return EXIT_OK if ok else EXIT_FAILED
    except WorkerStartError as e:
        return _error(str(e), EXIT_FAILED)
    except ControlError as e:
        return _error(str(e), EXIT_FAILED)
    except KeyboardInterrupt:
        print("\nferry demo: interrupted; workers stopped", file=sys.stderr)
        return 130
    finally:
        for w in workers:
            w.stop()
        # Keep the directory only when asked, or when a worker had something to say.
        logs = [w.log_path for w in workers if os.path.exists(w.log_path) and os.path.getsize(w.log_path) > 0]
        if args.keep:
            print(f"ferry demo: worker logs kept in {tmp}" + ("" if logs else " (empty: the workers said nothing)"),
                  file=sys.stderr)
        elif not ok and logs:
            print(f"ferry demo: worker logs kept: {', '.join(logs)}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _demo_guest_process(args, caps: dict, params: dict) -> int:
    """The demo with each guest in its own process (userfaultfd; engine/guestlocal.py), no control plane."""
    from .guestlocal import demo_guest_process
    from .uffd import unavailable_reason

    why = unavailable_reason()
    if why is not None:
        return _error(f"--guest-process needs userfaultfd: {why}", EXIT_FAILED)
    try:
        out = demo_guest_process(args, caps, params)
    except (RuntimeError, ValueError) as e:
        return _error(str(e), EXIT_FAILED)
    if args.json:
        _print_json(out)
    else:
        s, d, c = out["source"], out["destination"], out["guest-check"]
        lat = d.get("postcopy-latency") or {}
        print(f"source {s['status']}, destination {d['status']} {d.get('error-desc') or ''}".rstrip())
        print(f"  source writes tracked by {s.get('wp-tracking')} ({s.get('wp-tracking-why')}): "
              f"{s.get('wp-dirty-pages')} pages dirty in {s.get('wp-scans')} scans, "
              f"{s.get('wp-extra-bytes')} bytes re-sent for host-page granularity")
        print(f"  destination guest: {d.get('uffd-kernel-faults')} kernel faults, {d.get('postcopy-requests')} "
              f"requests, {d.get('uffd-copies')} UFFDIO_COPY, {d.get('uffd-zeropages')} UFFDIO_ZEROPAGE; "
              f"fault->wake p50 {lat.get('p50', 0) / 1000:.2f} ms p99 {lat.get('p99', 0) / 1000:.2f} ms")
        print(f"  guest's own check: {c.get('pages-checked')} pages read first, {c.get('mismatches')} differ "
              f"from the source{'; ' + c['error'] if 'error' in c else ''}")
        print("verified" if out["verified"] else "NOT verified")
    return EXIT_OK if out["verified"] else EXIT_FAILED


def _client_run(args, coro_fn):
    from .control.client import ControlClient

    async def run():
        async with ControlClient(args.endpoint, args.curve_dir, args.timeout) as c:
            return await coro_fn(c)
    return asyncio.run(run())


def _human_query(status: dict, mig: dict, console) -> None:
    from .control.report import mbps_to_mib, mib

    w = status.get("worker") or {}
    _say(console, f"[bold]{status.get('role')}[/] worker, pid {w.get('pid')}: guest {status.get('status')} "
                  f"({status['guest']['description']})")
    _say(console, f"  control {status.get('control')}  events {status.get('events')}"
                  + ("  (CURVE)" if status.get("curve") else ""))
    from . import stats as S

    ram = mig.get("ram") or {}
    role = mig.get("role", status.get("role"))  # in that migration (roles swap with the guest)
    line = f"  migration {mig.get('status')}"
    if ram:
        moved = "received" if role == "destination" else "sent"
        line += f": {mib(ram.get('transferred', 0))} {moved} for {mib(ram.get('total', 0))} of RAM"
        if mig.get("status") not in S.FINAL_STATES:
            line += f", {mib(ram.get('remaining', 0))} remaining"
        if role == "source":
            line += f", pass {ram.get('dirty-sync-count', 0)}, {mbps_to_mib(ram.get('mbps', 0)):.1f} MiB/s"
    for k in ("total-time", "downtime"):
        if k in mig:
            line += f", {k} {mig[k]} ms"
    _say(console, line)
    if mig.get("error-desc"):
        _say(console, f"  [red]error[/]: {mig['error-desc']}")
    _say(console, f"  cpu {w.get('cpu-user', 0) + w.get('cpu-system', 0):.2f} s, rss {mib(w.get('rss', 0))}, "
                  f"{w.get('threads')} threads")


def cmd_query(args) -> int:
    from .control.client import ControlError

    async def q(c):
        return await c.call("query-status"), await c.call("query-migrate")
    try:
        status, mig = _client_run(args, q)
    except ControlError as e:
        return _error(str(e), EXIT_UNREACHABLE)
    if args.json:
        _print_json({"status": status, "migrate": mig})
    else:
        _human_query(status, mig, _console())
    return EXIT_OK


def cmd_events(args) -> int:
    from .control.client import ControlError
    from . import stats as S

    async def tail(c):
        stream = await c.events()
        # On stderr even with --json: scripts can wait for this line to know the subscription is live.
        print(f"subscribed to the events of {args.endpoint} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        n = 0
        while args.count is None or n < args.count:
            ev = await stream.next()
            n += 1
            if args.json:
                _print_json(ev)
            else:
                print(_fmt_event(ev), flush=True)
            if args.until_final and ev.get("event") == "MIGRATION" and \
                    (ev.get("data") or {}).get("status") in S.FINAL_STATES:
                break
            if ev.get("event") == "SHUTDOWN":
                break  # the worker is gone: nothing more will come
        return n
    try:
        _client_run(args, tail)
    except ControlError as e:
        return _error(str(e), EXIT_UNREACHABLE)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_call(args) -> int:
    from .control.client import ControlError

    try:
        arguments = json.loads(args.arguments) if args.arguments else None
    except ValueError as e:
        return _error(f"arguments must be a JSON object: {e}", EXIT_USAGE)
    try:
        reply = _client_run(args, lambda c: c.request(args.verb, arguments))
    except ControlError as e:
        return _error(str(e), EXIT_UNREACHABLE)
    if args.json:
        _print_json(reply)
    elif "error" in reply:
        print(f"{reply['error'].get('class')}: {reply['error'].get('desc')}", file=sys.stderr)
    else:
        print(json.dumps(reply.get("return"), indent=2, default=str))
    return EXIT_FAILED if "error" in reply else EXIT_OK


def cmd_keys(args) -> int:
    from .control.auth import CurveKeyError, create_keys

    try:
        paths = create_keys(args.dir, force=args.force)
    except (CurveKeyError, OSError) as e:
        return _error(str(e), EXIT_USAGE)
    if args.json:
        _print_json(paths)
        return EXIT_OK
    d = args.dir
    console = _console()
    for line in (f"CURVE keys written to {d} (secret keys readable by their owner only):",
                 "  server.key, server.key_secret   the workers' key pair (secret: worker hosts only)",
                 "  client.key, client.key_secret   the controller's key pair (secret: controller hosts only)",
                 "  authorized_clients/client.key   client keys the workers accept",
                 f"  workers:      ferry worker ... --control tcp://0.0.0.0:5555 --curve-dir {d}",
                 f"  controllers:  ferry migrate ... --curve-dir {d}   (see docs/multi-host.md)"):
        _say(console, line)
    return EXIT_OK


def cmd_certs(args) -> int:
    from .certs import make_certs

    hosts = [h.strip() for h in args.hosts.split(",")] if args.hosts else None
    try:
        paths = make_certs(args.dir, hosts=hosts or ("localhost", "127.0.0.1", "::1"), days=args.days)
    except (ValueError, OSError) as e:
        return _error(f"ferry certs: {e}", EXIT_USAGE)
    if args.json:
        _print_json(paths)
        return EXIT_OK
    d = args.dir
    console = _console()
    for line in (f"TLS credentials written to {d} (QEMU tls-creds-x509 layout; keys readable by their owner only):",
                 "  ca-cert.pem (ca-key.pem)          the CA both sides verify the peer with",
                 "  server-cert.pem, server-key.pem   the destination (listening) worker",
                 "  client-cert.pem, client-key.pem   the source (connecting) worker",
                 f"  both workers:  ferry call EP migrate-set-parameters '{{\"tls-creds\": \"{d}\"}}'"
                 "   (see docs/multi-host.md)"):
        _say(console, line)
    return EXIT_OK


def _range_text(p) -> str:
    """Allowed values of a parameter, as engine.params checks them."""
    if getattr(p, "choices", ()):
        return "one of " + ", ".join(map(str, p.choices))
    if p.kind is bool:
        return "on or off"
    if p.lo is None:
        return ""
    hi = "2^64-1" if p.hi == (1 << 64) - 1 else p.hi
    return f"{p.lo} to {hi}"


def _default_text(p) -> str:
    if isinstance(p.default, bool):
        return "on" if p.default else "off"
    return str(p.default)


def reference_markdown() -> str:
    """Verbs, capabilities and parameters as markdown tables (docs/user-guide.md embeds this)."""
    from .control.protocol import VERBS
    from .params import CAPABILITIES, PARAMETERS

    def cell(text) -> str:
        return str(text).replace("|", "\\|")


    out = ["| verb | runs on | arguments | returns | description |", "|---|---|---|---|---|"]
    for v in VERBS.values():
        args = "any parameter names" if v.open_args else ", ".join(
            f"`{n}` ({a.type_name}{'' if a.required else ', optional'})" for n, a in v.args.items()) or "none"
        out.append(f"| `{v.name}` | {' or '.join(v.roles)} | {args} | `{cell(v.returns)}` | {cell(v.doc)} |")
    out += ["", "| capability | default | implemented | description |", "|---|---|---|---|"]
    for n, (default, impl, doc) in CAPABILITIES.items():
        out.append(f"| `{n}` | {'on' if default else 'off'} | {'yes' if impl else 'no'} | {cell(doc)} |")
    out += ["", "| parameter | default | range | unit | implemented | applies | live | description |",
            "|---|---|---|---|---|---|---|---|"]
    for p in PARAMETERS.values():
        impl = "yes" if p.implemented else "no"
        out.append(f"| `{p.name}` | {_default_text(p)} | {_range_text(p)} | {p.unit} | {impl} "
                   f"| {cell(p.applies)} | {'yes' if p.live else 'no'} | {cell(p.doc)} |")
    return "\n".join(out) + "\n"


REFERENCE_BEGIN = "<!-- BEGIN ferry reference --markdown -->\n"
REFERENCE_END = "<!-- END ferry reference --markdown -->"


def embed_reference(text: str) -> str:
    """``text`` with the tables between the reference markers regenerated."""
    i, j = text.find(REFERENCE_BEGIN), text.find(REFERENCE_END)
    if i < 0 or j < i:
        raise ValueError("no '<!-- BEGIN/END ferry reference --markdown -->' markers found")
    return text[:i + len(REFERENCE_BEGIN)] + reference_markdown() + text[j:]


def cmd_reference(args) -> int:
    from .control.protocol import VERBS
    from .params import CAPABILITIES, PARAMETERS

    if args.write_doc:
        try:
            with open(args.write_doc) as f:
                text = f.read()
            with open(args.write_doc, "w") as f:
                f.write(embed_reference(text))
        except (OSError, ValueError) as e:
            return _error(str(e), EXIT_USAGE)
        return EXIT_OK
    if args.markdown:
        sys.stdout.write(reference_markdown())
        return EXIT_OK
    if args.json:
        _print_json({
            "verbs": {n: {"roles": list(v.roles), "arguments": "open" if v.open_args else list(v.args),
                          "implemented": v.implemented, "doc": v.doc} for n, v in VERBS.items()},
            "capabilities": {n: {"default": d, "implemented": i, "doc": doc}
                             for n, (d, i, doc) in CAPABILITIES.items()},
            "parameters": {n: {"default": p.default, "min": p.lo, "max": p.hi, "unit": p.unit,
                               "implemented": p.implemented, "applies": p.applies, "live": p.live,
                               "doc": p.doc} for n, p in PARAMETERS.items()}})
        return EXIT_OK
    # Name on its own line, details indented and wrapped below: readable at 80 columns.
    width = max(60, min(shutil.get_terminal_size((80, 24)).columns, 100))
    out: list[str] = []

    def entry(name: str, facts: str, *paras: str) -> None:
        out.append(f"  {name}")
        for text in (facts, *paras):
            if text:
                out.extend(textwrap.wrap(text, width, initial_indent="      ", subsequent_indent="      "))

    out.append("Capabilities (--cap NAME[=on|off])")
    for n, (d, i, doc) in CAPABILITIES.items():
        entry(n, f"default {'on' if d else 'off'}" + ("" if i else "; not implemented"), doc)
    out += ["", "Parameters (--param NAME=VALUE; during a migration only the live ones)"]
    for p in PARAMETERS.values():
        rng = _range_text(p)
        facts = f"default {_default_text(p)}" + (f", {rng}" if rng else "") + (f" {p.unit}" if p.unit else "")
        facts += ("; live" if p.live else "") + ("" if p.implemented else "; not implemented")
        entry(p.name, facts, p.doc, f"applies: {p.applies}" if p.implemented else "")
    out += ["", "Control-plane verbs (ferry call ENDPOINT VERB [JSON])"]
    for v in VERBS.values():
        entry(v.name, f"runs on {' or '.join(v.roles)}", v.doc)
    print("\n".join(out))
    return EXIT_OK


# --- parser --------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferry", description="Ferry: live migration of guest memory between "
                                "processes, on QEMU's wire format. Start with `ferry demo`.")
    p.add_argument("--version", action="version", version=f"ferry {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="migrate a running guest between two local workers, verify it, report",
                       description="Start a source and a destination worker on this host, migrate a running "
                                   "guest (256 MiB, one thread writing to it) and verify it.")
    add_guest_options(d)
    add_migration_options(d)
    d.add_argument("--stream", choices=("tcp", "unix"), default="tcp",
                   help="migration stream transport between the workers (default tcp on 127.0.0.1)")
    d.add_argument("--uri", help="migration uri for the destination to listen on (overrides --stream)")
    d.add_argument("--control", choices=("ipc", "tcp"), default="ipc",
                   help="control plane transport: ipc sockets in a temp dir, or tcp on 127.0.0.1")
    d.add_argument("--migration-timeout", type=positive_seconds, default=120.0,
                   help="give up after this many seconds (default 120)")
    d.add_argument("--timeout", type=positive_seconds, default=10.0, help=argparse.SUPPRESS)
    d.add_argument("--precopy", action="store_true",
                   help="plain precopy; by default the demo switches to postcopy with preemption "
                        "(postcopy-ram, postcopy-preempt) after the first pass")
    d.add_argument("--guest-process", action="store_true",
                   help="each guest in a process of its own: the destination's faults served through "
                        "userfaultfd, the source's writes tracked with write-protect (docs/uffd.md); "
                        "two local workers without the control plane")
    d.add_argument("--keep", action="store_true", help="keep the temp dir with the worker logs")
    d.add_argument("--json", action="store_true", help="print only the result as JSON")
    d.set_defaults(func=cmd_demo, curve_dir=None)

    w = sub.add_parser("worker", help="run a source or destination worker",
                       description="A worker process serving the control plane on ENDPOINT. A source owns a "
                                   "running guest; a destination owns the empty RAM a migration fills.")
    w.add_argument("--role", required=True, choices=("source", "destination"))
    w.add_argument("--control", required=True, metavar="ENDPOINT",
                   help="tcp://HOST:PORT or ipc://PATH (non-loopback tcp needs --curve-dir)")
    w.add_argument("--events", metavar="ENDPOINT", help="event stream endpoint (default: control port + 1, "
                                                       "or PATH.events)")
    w.add_argument("--curve-dir", metavar="DIR", help="require CURVE authentication with the keys from `ferry keys`")
    w.add_argument("--qmp", action="append", default=[], metavar="ADDRESS",
                   help="also serve QMP (the QEMU Machine Protocol, for qmp-shell and QEMU's qemu.qmp library) on "
                        "unix:PATH or tcp:HOST:PORT on loopback (repeatable)")
    w.add_argument("--json", action="store_true", help="print the ready line as JSON")
    w.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process goes away")
    add_guest_options(w)
    lay = w.add_argument_group("RAM layout", "a destination without a fixed guest (e.g. for a QEMU source)")
    lay.add_argument("--ram-layout", choices=("fixed", "source"), default="fixed",
                     help="fixed: the guest options above, checked against the source's MEM_SIZE; source: "
                          "take the RAM blocks MEM_SIZE announces, within --max-ram and --max-blocks")
    lay.add_argument("--max-ram", default="64G", metavar="SIZE",
                     help="--ram-layout source: most RAM accepted over all blocks (default 64G)")
    lay.add_argument("--max-blocks", type=int, default=256, metavar="N",
                     help="--ram-layout source: most RAM blocks accepted (default 256)")
    lay.add_argument("--machine-type", action="append", default=[], metavar="NAME",
                     help="--ram-layout source: a machine type the stream's CONFIGURATION may name "
                          "(repeatable; default: any)")
    w.set_defaults(func=cmd_worker)

    m = sub.add_parser("migrate", help="migrate between two running workers",
                       description="Calls migrate-incoming on the destination, then migrate on the source, "
                                   "follows events and progress, waits for the end and compares digests.")
    m.add_argument("--source", required=True, metavar="ENDPOINT")
    m.add_argument("--destination", required=True, metavar="ENDPOINT")
    m.add_argument("--uri", help="migration uri the destination listens on: tcp:HOST:PORT (port 0: any), "
                                 "unix:PATH or file:PATH (default tcp:DEST-HOST:0)")
    add_migration_options(m)
    add_client_options(m)
    m.add_argument("--migration-timeout", type=positive_seconds, default=600.0,
                   help="after this many seconds apply --timeout-action (default 600)")
    m.add_argument("--timeout-action", choices=("cancel", "postcopy", "pause"), default="cancel",
                   help="on --migration-timeout: cancel (precopy only; a postcopy migration cannot be "
                        "cancelled and is followed on), postcopy (switch to postcopy), pause (migrate-pause "
                        "in postcopy; cancel in precopy). As virsh migrate --timeout/--timeout-postcopy")
    m.add_argument("--resume", action="store_true",
                   help="recover a postcopy-paused migration: migrate-recover on the destination (on --uri), "
                        "then migrate with resume on the source; exit 4 if it pauses again")
    m.set_defaults(func=cmd_migrate)

    q = sub.add_parser("query", help="state of a worker and its migration")
    q.add_argument("endpoint", metavar="ENDPOINT")
    add_client_options(q)
    q.set_defaults(func=cmd_query)

    e = sub.add_parser("events", help="print a worker's events as they come")
    e.add_argument("endpoint", metavar="ENDPOINT")
    e.add_argument("--count", type=int, help="stop after this many events")
    e.add_argument("--until-final", action="store_true", help="stop at completed, failed or cancelled "
                                                                "(it always stops when the worker shuts down)")
    add_client_options(e, "one JSON object per event")
    e.set_defaults(func=cmd_events)

    c = sub.add_parser("call", help="run one control-plane verb (QMP-style)",
                       description="Examples: ferry call EP query-migrate-parameters; "
                                   "ferry call EP migrate-set-parameters '{\"downtime-limit\": 100}'; "
                                   "ferry call EP migrate-cancel; ferry call EP quit")
    c.add_argument("endpoint", metavar="ENDPOINT")
    c.add_argument("verb")
    c.add_argument("arguments", nargs="?", help="arguments as a JSON object")
    add_client_options(c, "print the whole reply as JSON")
    c.set_defaults(func=cmd_call)

    r = sub.add_parser("reference", help="list capabilities, parameters and verbs with their ranges")
    r.add_argument("--markdown", action="store_true", help="markdown tables (as in docs/user-guide.md)")
    r.add_argument("--json", action="store_true")
    r.add_argument("--write-doc", metavar="FILE", help="regenerate the tables between the markers in FILE "
                                                       "(docs/user-guide.md)")
    r.set_defaults(func=cmd_reference)

    k = sub.add_parser("keys", help="create CURVE key pairs for multi-host use")
    k.add_argument("dir", metavar="DIR")
    k.add_argument("--force", action="store_true", help="replace existing keys")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_keys)

    t = sub.add_parser("certs", help="create a small CA and TLS certificates for migration channels (tls-creds)")
    t.add_argument("dir", metavar="DIR")
    t.add_argument("--hosts", default="", help="comma-separated names/addresses of the destination's "
                                               "certificate (default: localhost,127.0.0.1,::1)")
    t.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_certs)

    # Testbeds of network namespaces (engine/testbed_cli.py) and sweeps of
    # migrations (engine/experiment/commands.py: `run`; `report` comes from
    # engine/experiment/report.py when present).
    from .experiment.commands import add_experiment_parser
    from .snapshot_cli import add_snapshot_parser
    from .testbed_cli import add_testbed_parser

    add_testbed_parser(sub)
    add_experiment_parser(sub)
    add_snapshot_parser(sub)  # saved VMs in and out of QEMU (engine/snapshot_cli.py)
    from .guestproc import add_guest_parser  # `ferry guest`: a guest in its own process (userfaultfd)

    add_guest_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from .control.auth import CurveKeyError
    from .control.endpoints import EndpointError

    try:
        return args.func(args)
    except (EndpointError, CurveKeyError) as e:
        # Checked where the endpoint or key directory is first used: one line, no traceback.
        return _error(str(e), EXIT_USAGE)
    except BrokenPipeError:
        # Whoever read stdout went away (`ferry call EP query-migrate | head`): no traceback.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
