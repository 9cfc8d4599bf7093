"""`ferry experiment ...`: the command-line side of sweeps (argparse only at import time).

``ferry experiment run FILE.toml [--out DIR] [--resume]`` validates the sweep
file, then runs it with engine.experiment.runner.SweepRunner, showing a
progress bar (run i/N, the run's swept settings, its status) and one line per
finished run. ``ferry experiment report`` is registered by
engine/experiment/report.py (``add_report_parser``) when that module exists.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_experiment_parser(sub) -> None:
    """The `experiment` command group: `run` here, `report` from engine/experiment/report.py."""
    x = sub.add_parser("experiment", help="run sweeps of migrations from a TOML file, and report on them",
                       description="Sweep files are described in docs/experiments.md.")
    xs = x.add_subparsers(dest="experiment_command", metavar="SUBCOMMAND")
    r = xs.add_parser("run", help="run every combination x repeat of a sweep file, one JSON record per run",
                      description="Validate FILE (errors name the key and its line; exit 2, nothing started), "
                                  "then run every combination of its swept settings, each repeated, and write "
                                  "DIR/runs/<run-id>.json per run and DIR/sweep.json. Exit 0 if every run "
                                  "completed, 1 if some failed, 2 for a bad file or directory, 130 if "
                                  "interrupted (workers and namespaces are cleaned up; --resume continues).")
    r.add_argument("file", metavar="FILE.toml")
    r.add_argument("--out", metavar="DIR", help="output directory (default results/<experiment name>)")
    r.add_argument("--resume", action="store_true", help="continue a sweep in DIR: skip runs whose record exists")
    r.add_argument("--retry-failed", action="store_true", help="with --resume: run again the runs recorded as failed")
    r.add_argument("--check", action="store_true", help="only validate FILE and list the planned runs")
    r.add_argument("--json", action="store_true", help="print only a JSON summary on stdout (progress on stderr)")
    r.set_defaults(func=cmd_experiment_run)
    # --- `ferry experiment report`: engine/experiment/report.py registers it ---
    if importlib.util.find_spec("ferry_migrate.engine.experiment.report") is not None:
        from .report import add_report_parser  # noqa: PLC0415 - optional sibling module

        add_report_parser(xs)

    def no_sub(args) -> int:
        x.print_help()
        return EXIT_USAGE
    x.set_defaults(func=no_sub)


_SIZE_KEYS = {"guest-size", "page-size", "workload-dirty-rate", "dest-workload-dirty-rate"}


def _is_size(key: str) -> bool:
    from ..params import PARAMETERS

    p = PARAMETERS.get(key)
    return key in _SIZE_KEYS or (p is not None and "bytes" in p.unit)


def _fmt_value(key: str, v) -> str:
    """A setting as a sweep file would write it: 4K, 64M, 100mbit, on/off."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if key in ("link-rate", "link-flow-rate"):
        return f"{v / 1e9:g}gbit" if v % 10**9 == 0 else f"{v / 1e6:g}mbit"  # bits/s, decimal
    if isinstance(v, int) and v and _is_size(key):
        for suffix, sh in (("G", 30), ("M", 20), ("K", 10)):
            if v % (1 << sh) == 0:
                return f"{v >> sh}{suffix}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def _settings_text(settings: dict) -> str:
    return " ".join(f"{k}={_fmt_value(k, v)}" for k, v in settings.items()) or "(no swept settings)"


def _run_line(rec: dict) -> str:
    """One line per finished run: status, times, and the figures that compare runs."""
    s = rec.get("source") or {}
    d = rec.get("destination") or {}
    if rec["status"] == "completed":
        bits = [f"[green]completed[/] in {rec['wall-time']:.1f} s", f"total-time {s.get('total-time', '?')} ms",
                f"downtime {s.get('downtime', '?')} ms", f"passes {len(rec.get('passes') or [])}"]
        lat = d.get("postcopy-latency") or {}
        if lat.get("count"):
            bits.append(f"{lat['count']} requests, p50 {lat['p50'] / 1000:.2f} ms p99 {lat['p99'] / 1000:.2f} ms")
        return ", ".join(bits)
    from rich.markup import escape

    return f"[red]failed[/] after {rec['wall-time']:.1f} s: {escape(str(rec.get('error')))}"


class SweepDisplay:
    """A rich progress bar over the runs, with a line per finished run printed above it."""

    def __init__(self, console, spec):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console
        self.spec = spec
        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[counter]}"), BarColumn(bar_width=16),
                                 TimeElapsedColumn(), TextColumn("{task.fields[run]}  {task.fields[status]}"),
                                 console=console, transient=True, disable=not console.is_terminal)
        self.task = self.progress.add_task("sweep", total=1, counter="", run="", status="")
        self.total = 0
        self.skipped = 0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def on_event(self, kind: str, info: dict) -> None:
        from rich.markup import escape

        p = self.progress
        if kind == "plan":
            self.total, self.skipped = info["total"], len(info["skipped"])
            p.update(self.task, total=max(1, self.total), completed=self.skipped)
            skipped = f" ({self.skipped} already recorded, skipped)" if self.skipped else ""
            self.console.print(f"[bold]{self.spec.name}[/]: {self.total} run(s), link {self.spec.link}{skipped}")
        elif kind == "start":
            n = self.skipped + info["index"]
            p.update(self.task, counter=f"run {n}/{self.total}",
                     run=escape(f"{info['run']} {_settings_text(info['swept'])}"), status="starting")
        elif kind == "status":
            p.update(self.task, status=escape(info["status"]))
        elif kind == "done":
            rec = info["record"]
            n = self.skipped + info["index"]
            p.update(self.task, completed=n)
            swept = {k: rec["settings"][k] for k in self.spec.sweep}
            p.console.print(f"  run {n}/{self.total} {rec['run']}  {escape(_settings_text(swept))}\n"
                            f"      {_run_line(rec)}", highlight=False)


def _raise_terminated(signum, frame):
    # SIGTERM unwinds like Ctrl-C, so workers and namespaces are cleaned up.
    raise KeyboardInterrupt


def hugepage_shortfall(link: str, settings: list[dict]) -> str | None:
    """Why the hugetlb runs of a sweep cannot run on this host, or None.

    On ``loopback`` and ``netns`` links both workers of a run share this host,
    so a run needs twice its guest's huge pages free; runs go one at a time, so
    the largest need of each huge page size counts. ``hosts`` links run the
    workers elsewhere: nothing to check here.
    """
    if link == "hosts":
        return None
    from ..ram import hugepage_advice, hugepage_status

    need: dict[int, int] = {}
    for st in settings:
        if st.get("backing") == "hugetlb":
            page = st.get("page-size", 4096)
            need[page] = max(need.get(page, 0), 2 * (st.get("guest-size", 256 << 20) // page))
    for page, n in sorted(need.items()):
        if hugepage_status(page)[0] < n:
            return ("runs with backing 'hugetlb' need huge pages for both workers on this host: "
                    + hugepage_advice(page, n))
    return None


def cmd_experiment_run(args) -> int:
    from rich.console import Console

    from .runner import RunnerError, SweepRunner, plan
    from .spec import SpecError, parse_spec

    console = Console(stderr=args.json, highlight=False, soft_wrap=True)
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        print(f"ferry: error: {args.file}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    try:
        spec = parse_spec(text, args.file)
    except SpecError as e:
        print(f"ferry: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    runs = plan(spec)
    short = hugepage_shortfall(spec.link, [r.settings for r in runs])
    if short and args.check:
        print(f"ferry: error: {args.file}: {short}", file=sys.stderr)
        return EXIT_USAGE
    if short:
        # A run records its failure; say now why the hugetlb ones will fail.
        print(f"ferry: warning: {args.file}: {short}", file=sys.stderr)
    if args.check:
        if args.json:
            print(json.dumps({"experiment": spec.name, "spec": spec.to_dict(),
                              "runs": [{"run": r.run_id, "settings": r.settings} for r in runs]}, default=str))
        else:
            console.print(f"{args.file}: valid; {len(runs)} run(s), link {spec.link}")
            for r in runs:
                console.print(f"  {r.run_id}  {_settings_text({k: r.settings[k] for k in spec.sweep})}", markup=False)
        return EXIT_OK
    out = args.out or os.path.join("results", spec.name)
    if args.retry_failed and not args.resume:
        print("ferry: error: --retry-failed goes with --resume", file=sys.stderr)
        return EXIT_USAGE
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    display = SweepDisplay(console, spec)
    runner = SweepRunner(spec, text, args.file, out, resume=args.resume, retry_failed=args.retry_failed,
                         on_event=display.on_event)
    try:
        with display:
            result = runner.run()
    except RunnerError as e:
        print(f"ferry: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        done = len(runner._existing())
        print(f"\nferry: interrupted; workers stopped, namespaces removed. {done} run record(s) in "
              f"{out}/runs; continue with: ferry experiment run {args.file} --out {out} --resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
    if args.json:
        print(json.dumps(result.to_dict()), flush=True)
    else:
        r = result.to_dict()
        console.print(f"\n{r['completed']} of {r['ran']} run(s) completed"
                      + (f", {len(r['failed'])} failed ({', '.join(r['failed'])})" if r["failed"] else "")
                      + (f", {len(r['skipped'])} skipped (already recorded)" if r["skipped"] else "")
                      + f"; records in {os.path.join(out, 'runs')}/")
    return EXIT_FAILED if result.failed else EXIT_OK
