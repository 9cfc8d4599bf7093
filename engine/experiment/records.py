"""Reading an experiment's records back: validation, grouping and derived figures.

``ferry experiment run`` writes ``DIR/sweep.json`` (the sweep) and one
``DIR/runs/<run-id>.json`` per run. This module loads them, checks that every
field the report uses has the right shape (a bad record is an error naming
the file and the field, not a traceback halfway through a plot), groups runs
by configuration (one combination of the swept settings) and derives the
figures the CSVs, plots and pages share, so they always agree.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from ..latency import log2_histogram
from ..params import PARAMETERS

TARGET_PAGE = 4096  # dirty-pages counts target pages, whatever the host page size

# Fields a file must have to be read at all, with their types.
SWEEP_REQUIRED = {"name": str, "runs": list, "sweep": dict}
SWEEP_OPTIONAL = {"file": str, "text": str, "started": (int, float), "fixed": dict, "repeat": int, "link": str}
RUN_REQUIRED = {"run": str, "combination": int, "settings": dict, "status": str}
# Optional fields: absent or null is fine (a failed run has few of them); any
# other type is an error, since the report would otherwise fail far from here.
RUN_OPTIONAL = {
    "experiment": str, "repeat": int, "capabilities": dict, "parameters": dict, "link": dict,
    "error": str, "started": (int, float), "wall-time": (int, float),
    "source": dict, "destination": dict, "passes": list, "events": list,
    "switchover": (int, float), "guest-progress": dict, "latency-samples-us": dict, "workers": dict,
}
PASS_KEYS = ("pass", "transferred", "time")

# Settings whose values are sizes: shown as 2 MiB, 64 MiB/s, 100M bit/s.
_BYTE_SETTINGS = {"guest-size", "page-size"}
_RATE_SETTINGS = {"workload-dirty-rate", "dest-workload-dirty-rate"}
_BIT_RATE_SETTINGS = {"link-rate", "link-flow-rate"}


class ReportError(ValueError):
    """The experiment directory or one of its records cannot be reported; says which file and why."""


def _typename(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t)
    return {"dict": "an object", "list": "a list", "str": "a string", "int": "a whole number"}.get(
        t.__name__, t.__name__)


def _is(v, t) -> bool:
    # bool is an int to Python, never to a record.
    if isinstance(v, bool):
        return t is bool or (isinstance(t, tuple) and bool in t)
    return isinstance(v, t)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON: {e}") from None
    except OSError as e:
        raise ReportError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(doc, dict):
        raise ReportError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return doc


def _check_fields(path: str, doc: dict, required: dict, optional: dict, what: str) -> None:
    missing = [k for k in required if k not in doc]
    if missing:
        raise ReportError(f"{path}: missing {'key' if len(missing) == 1 else 'keys'} "
                          f"{', '.join(repr(k) for k in missing)} ({what} needs {', '.join(required)})")
    for k, t in required.items():
        if not _is(doc[k], t):
            raise ReportError(f"{path}: key {k!r} is {type(doc[k]).__name__}, expected {_typename(t)}")
    for k, t in optional.items():
        v = doc.get(k)
        if v is not None and not _is(v, t):
            raise ReportError(f"{path}: key {k!r} is {type(v).__name__}, expected {_typename(t)} or null")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_run(path: str, rec: dict) -> None:
    """Shape checks of a run record, deep enough for everything the report reads."""
    _check_fields(path, rec, RUN_REQUIRED, RUN_OPTIONAL, "a run record")
    for i, p in enumerate(rec.get("passes") or []):
        if not isinstance(p, dict):
            raise ReportError(f"{path}: passes[{i}] is {type(p).__name__}, expected an object")
        for k in PASS_KEYS:
            if not _is_num(p.get(k)):
                raise ReportError(f"{path}: passes[{i}] is missing the number {k!r}")
    for side in ("source", "destination"):
        q = rec.get(side) or {}
        if "ram" in q and not isinstance(q["ram"], dict):
            raise ReportError(f"{path}: {side}.ram is {type(q['ram']).__name__}, expected an object")
        if "channels" in q and not isinstance(q["channels"], dict):
            raise ReportError(f"{path}: {side}.channels is {type(q['channels']).__name__}, expected an object")
    for ch, samples in (rec.get("latency-samples-us") or {}).items():
        if not isinstance(samples, list) or not all(_is_num(s) for s in samples):
            raise ReportError(f"{path}: latency-samples-us.{ch} must be a list of numbers (microseconds)")
    for side, series in (rec.get("guest-progress") or {}).items():
        if series is None:
            continue
        if not isinstance(series, dict):
            raise ReportError(f"{path}: guest-progress.{side} is {type(series).__name__}, expected an object")
        t, v = series.get("t", []), series.get("ms_per_gib", [])
        if not isinstance(t, list) or not isinstance(v, list):
            raise ReportError(f"{path}: guest-progress.{side} needs lists 't' and 'ms_per_gib'")
        if len(t) != len(v):
            raise ReportError(f"{path}: guest-progress.{side}: 't' has {len(t)} samples but "
                              f"'ms_per_gib' has {len(v)}")
        for i, m in enumerate(series.get("marks") or []):
            if not (isinstance(m, list) and len(m) == 2 and _is_num(m[0]) and isinstance(m[1], str)):
                raise ReportError(f"{path}: guest-progress.{side}.marks[{i}] must be [time, name]")
    for i, ev in enumerate(rec.get("events") or []):
        if not isinstance(ev, dict) or not _is_num(ev.get("t")) or not isinstance(ev.get("event"), str):
            raise ReportError(f"{path}: events[{i}] needs a number 't' and a string 'event'")


# --- the model -------------------------------------------------------------------

@dataclass
class RunRecord:
    """One run's record, with accessors that treat absent and null alike."""

    path: str
    data: dict

    @property
    def id(self) -> str:
        return self.data["run"]

    @property
    def combination(self) -> int:
        return self.data["combination"]

    @property
    def repeat(self) -> int:
        return self.data.get("repeat") or 0

    @property
    def status(self) -> str:
        return self.data["status"]

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def error(self) -> str | None:
        return self.data.get("error") or self.source.get("error-desc") or self.destination.get("error-desc")

    @property
    def settings(self) -> dict:
        return self.data["settings"]

    @property
    def source(self) -> dict:
        return self.data.get("source") or {}

    @property
    def destination(self) -> dict:
        return self.data.get("destination") or {}

    @property
    def passes(self) -> list[dict]:
        return self.data.get("passes") or []

    def latency_samples(self, channel: str = "all") -> np.ndarray:
        """Request latencies in microseconds (empty when the run had no postcopy requests)."""
        s = (self.data.get("latency-samples-us") or {}).get(channel) or []
        return np.asarray(s, dtype=np.float64)

    def latency_channels(self) -> list[str]:
        return sorted(k for k, v in (self.data.get("latency-samples-us") or {}).items() if k != "all" and v)

    def progress(self, side: str) -> dict | None:
        return (self.data.get("guest-progress") or {}).get(side)

    def migration_start(self) -> float | None:
        """Epoch seconds the migration began: the source's first event, else the run's start."""
        for ev in self.data.get("events") or []:
            if ev.get("side") == "source" and ev.get("event") == "MIGRATION":
                return float(ev["t"])
        started = self.data.get("started")
        return float(started) if started is not None else None

    def switchover(self) -> float | None:
        """Epoch seconds of the switchover: the record's own, else the source's postcopy/device event."""
        if self.data.get("switchover") is not None:
            return float(self.data["switchover"])
        for ev in self.data.get("events") or []:
            if (ev.get("side") == "source" and ev.get("event") == "MIGRATION"
                    and (ev.get("data") or {}).get("status") in ("postcopy-active", "device")):
                return float(ev["t"])
        return None


@dataclass
class Configuration:
    """One combination of the swept settings and its runs (the repeats)."""

    index: int
    settings: dict  # the swept settings only
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def completed(self) -> list[RunRecord]:
        return [r for r in self.runs if r.completed]

    @property
    def label(self) -> str:
        """The swept settings on one line, as legends show them."""
        return ", ".join(self.lines) or "all runs"

    @property
    def lines(self) -> list[str]:
        return [f"{k}={format_setting(k, v)}" for k, v in self.settings.items()]

    @property
    def name(self) -> str:
        return f"c{self.index:03d}"

    def representative(self) -> RunRecord | None:
        """The run a per-run plot shows: the first completed repeat, else the first run."""
        return (self.completed or self.runs or [None])[0]


@dataclass
class Experiment:
    """What ``ferry experiment run`` left in a directory."""

    dir: str
    meta: dict
    runs: list[RunRecord]
    configs: list[Configuration]
    missing: list[str]  # run ids in sweep.json without a record (interrupted, or still running)

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def swept_keys(self) -> list[str]:
        return list(self.meta["sweep"])

    @property
    def failed(self) -> list[RunRecord]:
        return [r for r in self.runs if not r.completed]


def load_experiment(path: str) -> Experiment:
    """Load and check DIR/sweep.json and DIR/runs/*.json; ReportError says which file is wrong and how."""
    if not os.path.isdir(path):
        raise ReportError(f"{path}: not a directory (expected the --out directory of `ferry experiment run`)")
    sweep_path = os.path.join(path, "sweep.json")
    if not os.path.exists(sweep_path):
        raise ReportError(f"{path}: no sweep.json (is this the --out directory of `ferry experiment run`?)")
    meta = _read_json(sweep_path)
    _check_fields(sweep_path, meta, SWEEP_REQUIRED, SWEEP_OPTIONAL, "sweep.json")
    runs_dir = os.path.join(path, "runs")
    if not os.path.isdir(runs_dir):
        raise ReportError(f"{runs_dir}: no runs directory (no run of the experiment has been recorded)")
    names = sorted(n for n in os.listdir(runs_dir) if n.endswith(".json"))
    if not names:
        raise ReportError(f"{runs_dir}: no run records (*.json); has `ferry experiment run` recorded any run?")
    runs = []
    for n in names:
        p = os.path.join(runs_dir, n)
        rec = _read_json(p)
        _check_run(p, rec)
        runs.append(RunRecord(p, rec))
    runs.sort(key=lambda r: (r.combination, r.repeat, r.id))
    seen = {r.id for r in runs}
    missing = [str(i) for i in meta["runs"] if str(i) not in seen]
    swept = list(meta["sweep"])
    by_comb: dict[int, Configuration] = {}
    for r in runs:
        c = by_comb.get(r.combination)
        if c is None:
            c = by_comb[r.combination] = Configuration(r.combination, {k: r.settings.get(k) for k in swept})
        c.runs.append(r)
    return Experiment(path, meta, runs, [by_comb[k] for k in sorted(by_comb)], missing)


# --- formatting -------------------------------------------------------------------

def _short_size(n: int) -> str:
    for suffix, sh in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << sh and n % (1 << sh) == 0:
            return f"{n >> sh}{suffix}"
    return str(n)


def _binary(n: int, unit: str) -> str:
    """2097152, "B" -> "2 MiB"; a number that is no whole multiple stays in plain units."""
    s = _short_size(n)
    return f"{n} {unit}" if s.isdigit() else f"{s[:-1]} {s[-1]}i{unit}"


def format_setting(key: str, v) -> str:
    """A setting's value as a person reads it: on/off, 2 MiB, 64 MiB/s, 100 Mbit/s, lists joined with +."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, list):
        return "+".join(format_setting(key, x) for x in v) or "none"
    if isinstance(v, int):
        unit = PARAMETERS[key].unit if key in PARAMETERS else ""
        if key in _BYTE_SETTINGS or unit == "bytes":
            return _binary(v, "B")
        if key in _RATE_SETTINGS or unit == "bytes/second":
            return _binary(v, "B/s")
        if key in _BIT_RATE_SETTINGS:
            # Decimal, as tc and the sweep file write link rates (100mbit = 100,000,000 bit/s).
            for unit, div in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
                if v >= div:
                    return f"{v / div:g} {unit}"
            return f"{v} bit/s"
        if unit == "milliseconds":
            return f"{v} ms"
    return str(v)


def csv_value(v):
    """A value as a CSV cell: raw numbers (for analysis), lists joined with +, null as empty."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "+".join(str(x) for x in v)
    if isinstance(v, float):
        return round(v, 3)
    return v


def format_epoch(t) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(float(t), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- derived figures -------------------------------------------------------------

def run_metrics(run: RunRecord) -> dict:
    """The headline figures of one run (None where the run has no such figure, e.g. no postcopy)."""
    src, dst = run.source, run.destination
    sram = src.get("ram") or {}
    transferred = sram.get("transferred")
    # Time the bytes took: start to the destination's confirmation, not counting the digest check.
    ttime = src.get("transfer-time") or src.get("total-time")
    mbps = transferred * 8 / ttime / 1000 if transferred and ttime else None
    lat = dst.get("postcopy-latency")
    samples = run.latency_samples()
    if not isinstance(lat, dict) or not lat.get("count"):
        # Older or partial records: the same figures from the raw samples.
        lat = None
        if len(samples):
            p50, p90, p99 = np.percentile(samples, [50, 90, 99])
            lat = {"count": len(samples), "avg": float(samples.mean()), "p50": float(p50), "p90": float(p90),
                   "p99": float(p99), "max": float(samples.max())}
    postcopy = "postcopy-requests" in dst or "postcopy-requests" in src
    m = {
        "total-time-ms": src.get("total-time"),
        "setup-time-ms": src.get("setup-time"),
        "downtime-ms": src.get("downtime"),
        "transferred-bytes": transferred,
        "precopy-bytes": sram.get("precopy-bytes"),
        "postcopy-bytes": src.get("postcopy-bytes"),
        "passes": len(run.passes) or sram.get("dirty-sync-count"),
        "mbps": round(mbps, 3) if mbps is not None else None,
        "postcopy-requests": dst.get("postcopy-requests", src.get("postcopy-requests")),
        "latency-count": lat["count"] if lat else (0 if postcopy else None),
        "latency-avg-us": lat["avg"] if lat else None,
        "latency-p50-us": lat["p50"] if lat else None,
        "latency-p90-us": lat["p90"] if lat else None,
        "latency-p99-us": lat["p99"] if lat else None,
        "latency-max-us": lat["max"] if lat else None,
        "blocktime-ms": dst.get("postcopy-blocktime"),
        "preemptions": src.get("preemptions"),
        "restores": src.get("restores"),
    }
    for side in ("source", "destination"):
        w = (run.data.get("workers") or {}).get(side) or {}
        cpu = [w.get("cpu-user"), w.get("cpu-system")]
        m[f"{side}-cpu-s"] = round(sum(cpu), 3) if all(_is_num(c) for c in cpu) else None
    m["wall-time-s"] = run.data.get("wall-time")
    return m


def channel_bytes(run: RunRecord) -> dict[str, int]:
    """Bytes the source sent on each channel (precopy, postcopy, ...)."""
    out = {}
    for name, ch in (run.source.get("channels") or {}).items():
        if isinstance(ch, dict) and _is_num(ch.get("bytes")):
            out[name] = ch["bytes"]
    return out


def pass_series(run: RunRecord) -> list[dict]:
    """Per pass: bytes sent, seconds, throughput and dirty rate (bytes/s), memory still dirty at its start.

    Each pass record is the dirty-log sync that starts the pass, with the bytes
    sent so far; so pass N sent the difference to record N+1, and the last pass
    (stop-and-copy, or everything after the switch to postcopy) sent the rest
    of ``transferred`` until the destination confirmed. A record's dirty rate is
    measured over the pass before it. A pass that sent nothing (the sync right
    before the guest stops) has no throughput.
    """
    ps = run.passes
    if not ps:
        return []
    src = run.source
    page = TARGET_PAGE
    end_t = src.get("transfer-time") or src.get("total-time")
    end_b = (src.get("ram") or {}).get("transferred")
    out = []
    for i, p in enumerate(ps):
        final = i == len(ps) - 1
        if not final:
            nxt = ps[i + 1]
            dt, db = nxt["time"] - p["time"], nxt["transferred"] - p["transferred"]
            rate = nxt.get("dirty-pages-rate")
        else:
            dt = end_t / 1000 - p["time"] if end_t is not None else None
            db = end_b - p["transferred"] if end_b is not None else None
            rate = None  # the guest is stopped (or gone to the destination): nothing measured
        thr = db / dt if db and dt and dt > 0 else None
        out.append({"pass": p["pass"], "start-s": p["time"], "seconds": dt, "bytes": db, "throughput": thr,
                    "dirty-rate": rate * page if _is_num(rate) and rate > 0 else None,
                    "dirty-bytes": p["dirty-pages"] * page if _is_num(p.get("dirty-pages")) else None,
                    "final": final})
    return out


def latency_histogram(samples_us: np.ndarray) -> list[int]:
    """QEMU's log2 buckets: bucket N counts latencies in [2^N, 2^(N+1)) microseconds."""
    return log2_histogram(samples_us)


def aggregate(values: list) -> dict:
    """mean, min, max of the numbers in ``values`` (None when there is none)."""
    xs = [float(v) for v in values if _is_num(v) and not math.isnan(v)]
    if not xs:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs), "n": len(xs)}
