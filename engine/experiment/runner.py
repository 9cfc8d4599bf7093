"""Run a sweep: every combination of a sweep file times its repeats, one JSON record per run.

For each run the runner gets a fresh source and destination worker (or, with
link "hosts", uses workers already running), applies the run's capabilities
and parameters through the control plane, migrates with
engine.control.driver.run_migration, then asks both workers for the guest's
progress series and the destination for its raw postcopy request latencies,
and writes ``DIR/runs/<run-id>.json`` (see RECORD_KEYS and docs/experiments.md).

Links:

- ``loopback``: both workers on this host, control over ipc sockets, the stream
  over tcp on 127.0.0.1 (or a unix socket with ``transport = "unix"``);
- ``netns``: a Testbed (engine/testbed.py) with two namespaces joined by a veth,
  rate limited with tbf when ``link-rate`` is set; the workers run inside with
  ``ip netns exec`` and the stream crosses the veth. One testbed serves every run
  with the same link rate (a new one is made when the rate changes);
- ``hosts``: the control endpoints under ``[hosts]``.

Records are written to a temp file and renamed: an interrupted run leaves no
record, and ``--resume`` runs it again. Workers are stopped after each run and
namespaces deleted at the end, also on Ctrl-C or SIGTERM; workers started here
also watch their parent, so even a SIGKILLed runner leaves none behind.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

from .. import stats as S
from .spec import Spec, run_capabilities, run_parameters

# Every key of a run record, in the order written (the report relies on them).
RECORD_KEYS = ("experiment", "run", "combination", "repeat", "settings", "capabilities", "parameters", "link",
               "status", "error", "started", "wall-time", "source", "destination", "passes", "events",
               "switchover", "guest-progress", "latency-samples-us", "workers")
WORKER_KEYS = ("cpu-user", "cpu-system", "rss", "threads")
DEFAULT_TIMEOUT = 300.0  # s a migration may take unless the sweep sets "timeout"
DEFAULT_WARMUP = 1.0  # s the guest runs before migrate unless the sweep sets "warmup"
DEFAULT_COOLDOWN = 0.5  # s after the end before the progress series are read ("cooldown")
READY_TIMEOUT = 120.0  # s for a worker to build and fill its guest
HOSTS_WAIT = 60.0  # s to wait for [hosts] workers to be ready for a run
PROBE = {"pings": 200, "msg": 32, "seconds": 0.5}  # link probe at testbed setup (engine.testbed.probe_link)

# Sweep settings -> `ferry worker` guest options.
GUEST_OPTIONS = {
    "guest-size": "--size", "page-size": "--page-size", "backing": "--backing", "guest": "--guest",
    "blocks": "--blocks",
    "fill": "--fill", "workload-threads": "--workload-threads", "workload-pattern": "--workload-pattern",
    "workload-dirty-rate": "--dirty-rate", "workload-hot-fraction": "--workload-hot-fraction",
    "workload-write-ratio": "--workload-write-ratio", "workload-zipf-a": "--workload-zipf-a",
    "workload-batch": "--workload-batch",
}
# The destination's guest runs only after a postcopy switch; these override the
# source's workload settings for it (the others it takes from the source's).
DEST_OVERRIDES = {"dest-workload-threads": "workload-threads", "dest-workload-pattern": "workload-pattern",
                  "dest-workload-dirty-rate": "workload-dirty-rate", "dest-workload-batch": "workload-batch"}


class RunnerError(RuntimeError):
    """The sweep cannot start (output directory, resume mismatch, testbed unavailable)."""


@dataclass
class PlannedRun:
    """One run of the sweep: its id, combination index, repeat index and settings."""

    run_id: str
    combination: int
    repeat: int
    settings: dict


def plan(spec: Spec) -> list[PlannedRun]:
    """Every run of the sweep in order (combinations in file order, repeats inside)."""
    return [PlannedRun(rid, i // spec.repeat, rep, settings) for i, (rid, settings, rep) in enumerate(spec.runs())]


def worker_options(settings: dict, role: str) -> list[str]:
    """`ferry worker` guest options for ``role`` from a run's settings (unset: the worker's defaults)."""
    eff = dict(settings)
    if role == "destination":
        for dk, k in DEST_OVERRIDES.items():
            if dk in settings:
                eff[k] = settings[dk]
    out = []
    for k, opt in GUEST_OPTIONS.items():
        if k in eff:
            out += [opt, str(eff[k])]
    return out


def switchover_seconds(settings: dict) -> float | None:
    """S of ``postcopy-after-seconds:S`` (the runner calls migrate-start-postcopy then), else None."""
    kind, _, arg = settings.get("switchover", "precopy").partition(":")
    return float(arg) if kind == "postcopy-after-seconds" else None


def _write_json(path: str, obj) -> None:
    """Write JSON to a temp file beside ``path`` and rename it over: never a half-written file."""
    d = os.path.dirname(path) or "."
    # Not named *.json: readers that list the directory never see it.
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=d)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide records from other users
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _json_default(o):
    item = getattr(o, "item", None)  # numpy scalars
    if callable(item):
        return item()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


def empty_record(spec: Spec, run: PlannedRun) -> dict:
    """A record with every key present, as a run that failed before anything happened leaves it."""
    empty_series = {"t": [], "ms_per_gib": [], "marks": []}
    return {
        "experiment": spec.name, "run": run.run_id, "combination": run.combination, "repeat": run.repeat,
        "settings": run.settings, "capabilities": run_capabilities(run.settings),
        "parameters": run_parameters(run.settings),
        "link": {"kind": spec.link, "rate-bps": None, "probe": None},
        "status": "failed", "error": None, "started": time.time(), "wall-time": 0.0,
        "source": {}, "destination": {}, "passes": [], "events": [], "switchover": None,
        "guest-progress": {"source": dict(empty_series), "destination": dict(empty_series)},
        "latency-samples-us": {"all": []},
        "workers": {side: {k: None for k in WORKER_KEYS} for side in ("source", "destination")},
    }


def _short_dir(prefix: str) -> str:
    # ipc:// paths must fit in a sockaddr_un (107 bytes): keep them in /tmp, not
    # under a possibly long output directory.
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None)


# --- links: where a run's workers come from ----------------------------------------

@dataclass
class RunWorkers:
    """What a run migrates between: control endpoints, the uri for migrate-incoming, the link."""

    source: str
    destination: str
    uri: str | None
    link: dict
    curve_dir: str | None = None
    procs: tuple = ()  # WorkerProcess objects this runner started (stopped after the run)


class LoopbackLink:
    """Fresh workers on this host for every run (the guest's shape may change from run to run)."""

    kind = "loopback"

    def __init__(self, workdir: str, logdir: str):
        self.workdir = workdir
        self.logdir = logdir

    def wrapper(self, role: str) -> list[str] | None:
        return None

    def uri(self, run: PlannedRun) -> str:
        if run.settings.get("transport") == "unix":
            return f"unix:{self.workdir}/{run.run_id}.sock"
        return "tcp:127.0.0.1:0"

    def link_info(self, run: PlannedRun) -> dict:
        return {"kind": self.kind, "rate-bps": None, "probe": None}

    def acquire(self, run: PlannedRun, on_status: Callable[[str], None]) -> RunWorkers:
        from ..control.spawn import spawn_worker

        info = self.link_info(run)  # may build a testbed first
        procs = []
        try:
            on_status("starting workers")
            for role in ("source", "destination"):
                ep = f"ipc://{self.workdir}/{run.run_id}-{role}.ctl"
                # Own session: Ctrl-C at the terminal reaches only the runner,
                # which then stops the workers itself, in order.
                procs.append(spawn_worker(role, ep, worker_options(run.settings, role) + ["--exit-with-parent"],
                                          log_path=os.path.join(self.logdir, f"{run.run_id}-{role}.log"),
                                          new_session=True, wrapper=self.wrapper(role)))
            for p in procs:
                p.wait_ready(READY_TIMEOUT)
        except BaseException:
            for p in procs:
                p.stop()
            raise
        return RunWorkers(procs[0].control, procs[1].control, self.uri(run), info, procs=tuple(procs))

    def release(self, workers: RunWorkers | None) -> None:
        if workers is not None:
            for p in workers.procs:
                p.stop()

    def close(self) -> None:
        pass


class NetnsLink(LoopbackLink):
    """Fresh workers per run inside a two-host testbed; one testbed per link rate."""

    kind = "netns"

    def __init__(self, workdir: str, logdir: str, on_status: Callable[[str], None] | None = None):
        super().__init__(workdir, logdir)
        self.testbed = None
        self.rate: int | None = None
        self.probe: dict | None = None
        self.on_status = on_status or (lambda s: None)

    def _ensure(self, rate: int | None) -> None:
        from ..testbed import LinkShape, Testbed, probe_link

        if self.testbed is not None and self.rate == rate:
            return
        self.close()
        self.on_status(f"creating namespaces (link {'unshaped' if rate is None else f'{rate} bit/s'})")
        tb = Testbed(hosts=("src", "dst"), links=[("src", "dst")], shape=LinkShape(rate) if rate else None)
        tb.setup()
        self.testbed, self.rate = tb, rate
        self.on_status("probing the link")
        try:
            self.probe = probe_link(tb.ns["src"], tb.ns["dst"], tb.address("dst"), **PROBE)
        except Exception as e:  # noqa: BLE001 - a probe that fails does not stop the sweep
            self.probe = {"error": str(e)}

    def wrapper(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.testbed.ns["src" if role == "source" else "dst"]]

    def uri(self, run: PlannedRun) -> str:
        # The destination listens on its veth address: the stream crosses the link.
        return f"tcp:{self.testbed.address('dst')}:0"

    def link_info(self, run: PlannedRun) -> dict:
        self._ensure(run.settings.get("link-rate"))
        return {"kind": self.kind, "rate-bps": self.rate, "probe": self.probe,
                "namespaces": self.testbed.namespaces(),
                "addresses": {"source": self.testbed.address("src"), "destination": self.testbed.address("dst")}}

    def close(self) -> None:
        if self.testbed is not None:
            tb, self.testbed = self.testbed, None
            tb.teardown()


class HostsLink:
    """Workers already running at the [hosts] control endpoints; the runner starts none."""

    kind = "hosts"

    def __init__(self, hosts: dict):
        self.hosts = hosts
        self.curve_dir = hosts.get("curve-dir")
        self.wait = float(hosts.get("wait", HOSTS_WAIT))
        self.quit_after = bool(hosts.get("quit-after-run", False))

    def acquire(self, run: PlannedRun, on_status: Callable[[str], None]) -> RunWorkers:
        on_status("waiting for the workers")
        asyncio.run(self._wait_ready())
        return RunWorkers(self.hosts["source"], self.hosts["destination"], self.hosts.get("uri"),
                          {"kind": self.kind, "rate-bps": None, "probe": None}, curve_dir=self.curve_dir)

    async def _wait_ready(self) -> None:
        """Both workers answer, and neither holds a finished migration (a worker migrates once)."""
        from ..control.client import ControlClient, ControlError

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while True:
            problem = None
            for role in ("source", "destination"):
                ep = self.hosts[role]
                try:
                    async with ControlClient(ep, self.curve_dir, timeout=5.0) as c:
                        st = await c.call("query-status")
                except ControlError as e:
                    problem = (f"{role} worker at {ep}: {e}", True)
                    break
                mig = st.get("migration")
                if st.get("role") != role and mig != S.COMPLETED:
                    raise RunnerError(f"[hosts] {role} = {ep} is a {st.get('role')} worker")
                if (mig not in (S.NONE, S.FAILED, S.CANCELLED) or st.get("role") != role
                        or (role == "source" and not st.get("running"))):
                    problem = (f"{role} worker at {ep} is not ready for a new migration (guest {st.get('status')}, "
                               f"migration {mig}); a worker migrates one guest: restart it (set [hosts] "
                               "quit-after-run = true and run the workers in a restart loop)", self.quit_after)
                    break
            if problem is None:
                return
            msg, retry = problem
            if not retry or loop.time() > deadline:
                raise RunnerError(msg)
            await asyncio.sleep(0.5)

    def release(self, workers: RunWorkers | None) -> None:
        if workers is not None and self.quit_after:
            asyncio.run(self._quit())

    async def _quit(self) -> None:
        from ..control.client import ControlClient, ControlError

        for role in ("source", "destination"):
            try:
                async with ControlClient(self.hosts[role], self.curve_dir, timeout=5.0) as c:
                    await c.call("quit")
            except ControlError:
                pass  # already gone: its restart loop brings it back

    def close(self) -> None:
        pass


# --- one run -------------------------------------------------------------------------

def _usage_delta(before: dict | None, after: dict | None) -> dict:
    """CPU seconds used between just before migrate and the end; RSS and threads at the end."""
    before, after = before or {}, after or {}
    out = {}
    for k in ("cpu-user", "cpu-system"):
        if after.get(k) is None:
            out[k] = None
        else:
            out[k] = round(after[k] - before.get(k, 0.0), 3)
            out[k + "-total"] = after[k]
    out["rss"] = after.get("rss")
    out["threads"] = after.get("threads")
    out["pid"] = after.get("pid")
    return out


def _switchover_time(events: list[dict]) -> float | None:
    """When the guest stopped on the source: the postcopy switch, or the start of stop-and-copy."""
    for status in (S.POSTCOPY_ACTIVE, S.DEVICE):
        for e in events:
            if e["side"] == "source" and e["event"] == "MIGRATION" and e["data"].get("status") == status:
                return e["t"]
    return None


def _failure_text(out, check: dict | None = None) -> str:
    parts = []
    if check and check.get("mismatches"):
        parts.append(f"the destination's guest process read {check['mismatches']} pages that differ from the "
                     f"source's: {check['first-mismatches']}")
    if out.timed_out:
        parts.append("timed out: the runner cancelled the migration")
    for side, q in (("source", out.source), ("destination", out.destination)):
        if q.get("status") != S.COMPLETED:
            parts.append(f"{side} {q.get('status', '?')}" + (f": {q['error-desc']}" if q.get("error-desc") else ""))
    if out.completed and not out.digests_match:
        parts.append("both sides completed but their digests differ")
    return "; ".join(parts) or "failed"


async def _migrate(w: RunWorkers, caps: dict, params: dict, timeout: float, after_s: float | None,
                   on_progress: Callable[[dict, dict], None], cooldown: float = 0.0) -> dict:
    """Drive one migration and collect what the record needs beyond the Outcome."""
    from ..control.client import CommandFailed, ControlClient
    from ..control.driver import run_migration

    async with ControlClient(w.source, w.curve_dir) as src, ControlClient(w.destination, w.curve_dir) as dst:
        switch_task = None

        async def switch_later():
            await asyncio.sleep(after_s)
            try:
                await src.call("migrate-start-postcopy")
            except CommandFailed:
                pass  # the migration ended (or failed) before: nothing to switch

        def on_started(uri: str) -> None:
            nonlocal switch_task
            if after_s is not None:
                switch_task = asyncio.ensure_future(switch_later())

        try:
            if w.uri and not (params or {}).get("tls-creds"):
                # The testbed's own namespaces are a private link: plain TCP on purpose.
                params = {"plaintext-off-loopback": True, **(params or {})}
            out = await run_migration(src, dst, uri=w.uri, caps=caps, params=params, timeout=timeout,
                                      on_progress=on_progress, on_started=on_started)
        finally:
            if switch_task is not None:
                switch_task.cancel()
                await asyncio.gather(switch_task, return_exceptions=True)
        # The destination's guest keeps running (and its series growing) until
        # the worker is stopped: a short cooldown shows it after the migration.
        await asyncio.sleep(cooldown)
        sprog, dprog, lat = await asyncio.gather(src.call("query-guest-progress"),
                                                 dst.call("query-guest-progress"),
                                                 dst.call("query-postcopy-latency"))
        check = None
        if out.destination.get("guest") == "process" and out.completed:
            # The destination's guest process checks what it read first against the source's memory.
            from ..process_guest import guest_check

            check = await guest_check(src, dst)
        return {"outcome": out, "progress": {"source": sprog, "destination": dprog}, "latency": lat,
                "guest-check": check}


def execute_run(spec: Spec, run: PlannedRun, link, on_status: Callable[[str], None] | None = None) -> dict:
    """Run one migration of the sweep and return its record (never raises for a failed run)."""
    from ..control.protocol import event_time

    on_status = on_status or (lambda s: None)
    rec = empty_record(spec, run)
    t0 = time.monotonic()
    workers = None
    try:
        try:
            workers = link.acquire(run, on_status)
            rec["link"] = workers.link
            warmup = float(run.settings.get("warmup", DEFAULT_WARMUP))
            if warmup:
                # The progress series then shows the guest before the migration too.
                on_status(f"guest warming up for {warmup:g} s")
                time.sleep(warmup)
            on_status("migrating")

            def on_progress(sq: dict, dq: dict) -> None:
                ram = sq.get("ram") or {}
                total = ram.get("total") or 1
                pct = 0 if sq.get("status") in (S.NONE, S.SETUP) else 100 * (1 - ram.get("remaining", total) / total)
                on_status(f"{sq.get('status')} pass {ram.get('dirty-sync-count', 0)}, {pct:3.0f}%, "
                          f"{ram.get('transferred', 0) / (1 << 20):.0f} MiB sent")

            got = asyncio.run(_migrate(workers, rec["capabilities"], rec["parameters"],
                                       float(run.settings.get("timeout", DEFAULT_TIMEOUT)),
                                       switchover_seconds(run.settings), on_progress,
                                       float(run.settings.get("cooldown", DEFAULT_COOLDOWN))))
        finally:
            on_status("stopping workers")
            link.release(workers)
    except Exception as e:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
        rec["error"] = f"{type(e).__name__}: {e}" if not str(e) else str(e)
        rec["wall-time"] = round(time.monotonic() - t0, 3)
        return rec
    out = got["outcome"]
    check = got.get("guest-check")
    events = [{"t": event_time(ev), "side": side, "event": ev.get("event"), "data": ev.get("data") or {}}
              for side in ("source", "destination") for ev in out.events[side]]
    events.sort(key=lambda e: e["t"])
    rec.update({
        "status": "completed" if out.verified and not (check or {}).get("mismatches") else "failed",
        "error": None if out.verified and not (check or {}).get("mismatches") else _failure_text(out, check),
        "source": out.source, "destination": out.destination,
        "passes": list(out.source.get("passes") or []),
        "events": events, "switchover": _switchover_time(events),
        "guest-progress": got["progress"], "latency-samples-us": got["latency"],
        "workers": {side: _usage_delta((out.status_before.get(side) or {}).get("worker"),
                                       getattr(out, side).get("worker"))
                    for side in ("source", "destination")},
        "guest": (out.status_before.get("source") or {}).get("guest"),
        "uri": out.uri,
        # guest = "process": the destination guest's own check ({pages-checked, mismatches, ...}).
        "guest-check": check,
    })
    rec["wall-time"] = round(time.monotonic() - t0, 3)
    return rec


# --- the sweep ---------------------------------------------------------------------

def _host_info() -> dict:
    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version()}
    try:
        import subprocess

        here = os.path.dirname(os.path.abspath(__file__))
        r = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if r.returncode == 0:
            info["commit"] = r.stdout.strip()
    except (OSError, ValueError):
        pass
    return info


@dataclass
class SweepResult:
    """What a sweep did: records written, runs skipped (resume), where."""

    out_dir: str
    records: dict  # run id -> status of the runs executed now
    skipped: list
    planned: int

    @property
    def failed(self) -> list[str]:
        return [r for r, s in self.records.items() if s != "completed"]

    def to_dict(self) -> dict:
        return {"out": self.out_dir, "planned": self.planned, "ran": len(self.records),
                "completed": len(self.records) - len(self.failed), "failed": self.failed, "skipped": self.skipped,
                "records": {r: os.path.join(self.out_dir, "runs", f"{r}.json") for r in self.records}}


class SweepRunner:
    """Executes a validated Spec into ``out_dir``; see the module docstring."""

    def __init__(self, spec: Spec, text: str, path: str, out_dir: str, resume: bool = False,
                 retry_failed: bool = False, on_event: Callable[[str, dict], None] | None = None):
        self.spec = spec
        self.text = text
        self.path = path
        self.out_dir = out_dir
        self.resume = resume
        self.retry_failed = retry_failed
        # on_event(kind, info): "plan", "start", "status", "done", for the progress display.
        self.on_event = on_event or (lambda kind, info: None)
        self.runs_dir = os.path.join(out_dir, "runs")
        self.log_dir = os.path.join(out_dir, "logs")
        self._sweep_doc: dict = {}  # sweep.json as written by prepare()

    def _existing(self) -> dict[str, str]:
        """Run id -> status of the records already in runs/."""
        out = {}
        if not os.path.isdir(self.runs_dir):
            return out
        for name in os.listdir(self.runs_dir):
            if name.endswith(".json") and not name.startswith("."):
                try:
                    with open(os.path.join(self.runs_dir, name)) as f:
                        out[name[:-5]] = json.load(f).get("status")
                except (OSError, ValueError):
                    pass  # unreadable: run it again
        return out

    def prepare(self) -> tuple[list[PlannedRun], list[str]]:
        """Check the output directory and write sweep.json; returns (runs to do, runs skipped)."""
        runs = plan(self.spec)
        existing = self._existing()
        sweep_path = os.path.join(self.out_dir, "sweep.json")
        previous = None
        if os.path.exists(sweep_path):
            try:
                with open(sweep_path) as f:
                    previous = json.load(f)
            except (OSError, ValueError):
                previous = None
        if (existing or previous) and not self.resume:
            raise RunnerError(f"{self.out_dir} already holds a sweep ({len(existing)} run record(s)): "
                              "continue it with --resume, or choose another --out")
        if self.resume and previous is not None:
            spec_json = json.loads(json.dumps(self.spec.to_dict(), default=_json_default))
            if previous.get("spec") != spec_json:
                raise RunnerError(f"--resume: {self.out_dir} holds runs of a different sweep (its sweep.json "
                                  "records other settings); choose another --out")
        os.makedirs(self.runs_dir, exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        now = time.time()
        spec = self.spec.to_dict()
        # The spec's fields at the top level too (name, sweep, fixed, repeat, link): the report reads them there.
        doc = {**spec, "experiment": self.spec.name, "file": os.path.abspath(self.path), "text": self.text,
               "spec": spec, "started": now, "runs": [r.run_id for r in runs],
               "plan": [{"run": r.run_id, "combination": r.combination, "repeat": r.repeat, "settings": r.settings}
                        for r in runs],
               "host": _host_info(), "resumed": []}
        if previous is not None and self.resume:
            doc["started"] = previous.get("started", now)
            doc["resumed"] = list(previous.get("resumed", [])) + [now]
        _write_json(sweep_path, doc)
        self._sweep_doc = doc
        done = {r for r, st in existing.items() if st == "completed" or not self.retry_failed}
        todo = [r for r in runs if r.run_id not in done]
        skipped = [r.run_id for r in runs if r.run_id in done]
        return todo, skipped

    def make_link(self, workdir: str):
        if self.spec.link == "netns":
            return NetnsLink(workdir, self.log_dir, lambda s: self.on_event("status", {"status": s}))
        if self.spec.link == "hosts":
            return HostsLink(self.spec.hosts)
        return LoopbackLink(workdir, self.log_dir)

    def run(self) -> SweepResult:
        """Execute the sweep; KeyboardInterrupt propagates after everything is cleaned up."""
        if self.spec.link == "netns":
            from ..testbed import TestbedUnavailable, check_available, cleanup_stale

            shaping = "link-rate" in self.spec.fixed or "link-rate" in self.spec.sweep
            try:
                check_available(shaping)
            except TestbedUnavailable as e:
                raise RunnerError(f"link 'netns' needs network namespaces: {e}") from None
            cleanup_stale()  # what crashed runs left behind
        todo, skipped = self.prepare()
        result = SweepResult(self.out_dir, {}, skipped, len(todo) + len(skipped))
        self.on_event("plan", {"total": len(todo) + len(skipped), "todo": len(todo), "skipped": skipped})
        workdir = _short_dir("ferry-exp-")
        link = self.make_link(workdir)
        try:
            for i, run in enumerate(todo, 1):
                self.on_event("start", {"index": i, "todo": len(todo), "run": run.run_id, "settings": run.settings,
                                        "swept": {k: run.settings[k] for k in self.spec.sweep}})
                rec = execute_run(self.spec, run, link,
                                  lambda s: self.on_event("status", {"status": s}))
                _write_json(os.path.join(self.runs_dir, f"{run.run_id}.json"), rec)
                result.records[run.run_id] = rec["status"]
                self.on_event("done", {"index": i, "run": run.run_id, "record": rec})
        finally:
            try:
                link.close()
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
                self._finish(result)
        return result

    def _finish(self, result: SweepResult) -> None:
        doc = dict(self._sweep_doc)
        if not doc:
            return
        doc["finished"] = time.time()
        doc["last-result"] = {k: v for k, v in result.to_dict().items() if k != "records"}
        try:
            _write_json(os.path.join(self.out_dir, "sweep.json"), doc)
        except OSError:
            pass


__all__ = ["SweepRunner", "SweepResult", "RunnerError", "PlannedRun", "plan", "execute_run", "worker_options",
           "switchover_seconds", "empty_record", "RECORD_KEYS"]
