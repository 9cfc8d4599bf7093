"""`ferry experiment report`: CSVs, figures and pages from records of real migrations.

The records are made here by migrating small guests for real (both sides in
this process, over a loopback TCP socket, with a guest workload on each
side) and written in the format `ferry experiment run` writes, so the report
is checked against figures the engine produced, not against numbers made up
to fit. Hand-made records cover only what real runs cannot give on demand: a
failed run and malformed files.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import time

import numpy as np
import psutil
import pytest

from ferry_migrate.engine.cli import main
from ferry_migrate.engine.destination import MigrationDestination
from ferry_migrate.engine.experiment.spec import parse_spec, run_capabilities, run_parameters
from ferry_migrate.engine.params import MigrationConfig
from ferry_migrate.engine.ram import GuestRAM
from ferry_migrate.engine.source import MigrationSource
from ferry_migrate.engine.workload import Workload, WorkloadConfig

from .conftest import wait_until

SWEEP = """\
name = "report-fixture"
repeat = 2
link = "loopback"

[fixed]
guest-size = "24M"
postcopy-after-percent = 50     # with postcopy-ram: switch once half the pages went out
max-bandwidth = "64M"           # slow enough for several precopy passes
max-postcopy-bandwidth = "24M"  # and for the destination to fault pages in postcopy
downtime-limit = 30
workload-pattern = "hotset"
workload-dirty-rate = "16M"
dest-workload-pattern = "random"
dest-workload-dirty-rate = "64M"
dest-workload-batch = 1

[sweep]
capabilities = [[], ["postcopy-ram"], ["postcopy-ram", "postcopy-preempt"]]
"""
FAILED_RUN = "c002-r1"
FAILED_ERROR = "destination: ConnectionResetError: [Errno 104] Connection reset by peer | while loading <ram>"


def _workload(settings: dict, prefix: str) -> WorkloadConfig:
    return WorkloadConfig(threads=settings.get(f"{prefix}workload-threads", 1),
                          pattern=settings.get(f"{prefix}workload-pattern", "hotset"),
                          dirty_rate=settings.get(f"{prefix}workload-dirty-rate", 32 << 20),
                          batch=settings.get(f"{prefix}workload-batch", 64))


def _usage() -> dict:
    p = psutil.Process()
    cpu = p.cpu_times()
    return {"cpu-user": round(cpu.user, 2), "cpu-system": round(cpu.system, 2), "rss": p.memory_info().rss,
            "threads": p.num_threads()}


def record_run(name: str, run_id: str, combination: int, repeat: int, settings: dict) -> dict:
    """Migrate a guest with these sweep settings for real; the run's record as the runner writes it."""
    caps = {"return-path": True, **run_capabilities(settings)}
    params = run_parameters(settings)
    events = []

    def on_event(side):
        return lambda ev, data: events.append({"t": time.time(), "side": side, "event": ev, "data": dict(data)})

    size, page = settings["guest-size"], settings.get("page-size", 4096)
    sram = GuestRAM.create(size, page, "anon", 1)
    sram.fill("mixed")
    dram = GuestRAM.create(size, page, "anon", 1)
    cfg = MigrationConfig()
    cfg.set_capabilities(caps)
    cfg.set_parameters(params)
    dwl = Workload(dram, _workload(settings, "dest-"))
    dst = MigrationDestination(dram, cfg, on_event=on_event("destination"), workload=dwl)
    uri = dst.listen("tcp:127.0.0.1:0")
    dst.start()
    swl = Workload(sram, _workload(settings, ""))
    swl.start()
    # A baseline of guest progress (two samples) before the migration starts.
    wait_until(lambda: len(swl.progress_t) >= 2, what="two progress samples of the source's guest")
    src = MigrationSource(sram, swl, cfg, on_event=on_event("source"))
    started = time.time()
    src.start(uri)
    src.wait(60)
    dst.wait(60)
    if not dst.running:
        # Precopy: the guest starts on the destination once everything arrived.
        dwl.start()
    n = len(dwl.progress_t)
    wait_until(lambda: len(dwl.progress_t) >= n + 2, what="two progress samples on the destination")
    dwl.stop()
    sq, dq = src.query(), dst.query()
    samples = {"all": [round(float(v), 1) for v in dst.faults.latency.samples_us()]}
    for ch, rec in sorted(dst.faults.latency_by_channel.items()):
        samples[ch] = [round(float(v), 1) for v in rec.samples_us()]
    # As the runner: the switchover is when the source went to postcopy-active, or to stop-and-copy.
    switch = [e["t"] for status in ("postcopy-active", "device") for e in events
              if e["side"] == "source" and e["event"] == "MIGRATION" and e["data"].get("status") == status]
    assert sq["status"] == "completed", sq
    return {
        "experiment": name, "run": run_id, "combination": combination, "repeat": repeat, "settings": settings,
        "capabilities": caps, "parameters": params, "link": {"kind": "loopback", "rate-bps": None, "probe": None},
        "status": sq["status"], "error": None, "started": started, "wall-time": round(time.time() - started, 3),
        "source": sq, "destination": dq, "passes": src.passes, "events": events,
        "switchover": switch[0] if switch else None,
        "guest-progress": {"source": swl.progress(), "destination": dwl.progress()},
        "latency-samples-us": samples, "workers": {"source": _usage(), "destination": _usage()},
    }


def failed_record(name: str, run_id: str, combination: int, repeat: int, settings: dict) -> dict:
    """A run that broke in postcopy: few fields, as the runner writes it after a failure."""
    return {"experiment": name, "run": run_id, "combination": combination, "repeat": repeat,
            "settings": settings, "capabilities": run_capabilities(settings),
            "parameters": run_parameters(settings), "link": {"kind": "loopback", "rate-bps": None, "probe": None},
            "status": "failed", "error": FAILED_ERROR, "started": time.time(), "wall-time": 0.4,
            "source": {"status": "failed", "total-time": 380, "error-desc": "return path closed"},
            "destination": None, "passes": [{"pass": 1, "dirty-pages": 6144, "dirty-pages-rate": 0,
                                             "transferred": 0, "time": 0.0}],
            "events": [], "switchover": None, "guest-progress": None, "latency-samples-us": None,
            "workers": None}


def write_experiment(out: str, text: str = SWEEP, failed: tuple[str, ...] = (FAILED_RUN,)) -> dict:
    """Run the sweep in ``text`` for real into ``out`` (sweep.json, runs/); runs in ``failed`` are failures."""
    spec = parse_spec(text, "sweeps/report-fixture.toml")
    runs = spec.runs()
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    meta = {"name": spec.name, "file": "sweeps/report-fixture.toml", "text": text, "started": time.time(),
            "runs": [r[0] for r in runs], "fixed": spec.fixed, "sweep": spec.sweep, "repeat": spec.repeat,
            "link": spec.link}
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(meta, f)
    records = {}
    for i, settings in enumerate(spec.combinations()):
        for r in range(spec.repeat):
            rid = f"c{i:03d}-r{r}"
            make = failed_record if rid in failed else record_run
            rec = make(spec.name, rid, i, r, settings)
            with open(os.path.join(out, "runs", f"{rid}.json"), "w") as f:
                json.dump(rec, f)
            records[rid] = rec
    return records


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("exp"))
    records = write_experiment(d)
    return d, records


@pytest.fixture(scope="module")
def report(experiment):
    d, records = experiment
    assert main(["experiment", "report", d]) == 0
    return os.path.join(d, "report"), records


def _csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(cell: str):
    return None if cell == "" else float(cell)


# --- CSVs ------------------------------------------------------------------------------

def test_runs_csv_matches_the_records(report):
    out, records = report
    rows = _csv(os.path.join(out, "runs.csv"))
    assert [r["run"] for r in rows] == sorted(records)
    cols = set(rows[0])
    for c in ("run", "combination", "repeat", "capabilities", "status", "error",
              "total-time-ms", "downtime-ms", "transferred-bytes", "passes", "mbps", "postcopy-requests",
              "latency-avg-us", "latency-p50-us", "latency-p99-us", "latency-max-us", "blocktime-ms",
              "preemptions", "restores", "bytes-precopy", "bytes-postcopy-1"):
        assert c in cols, c
    for row in rows:
        rec = records[row["run"]]
        src, dst = rec["source"], rec["destination"] or {}
        assert row["status"] == rec["status"]
        assert row["capabilities"] == "+".join(rec["settings"]["capabilities"])
        if rec["status"] != "completed":
            assert row["error"] == FAILED_ERROR
            continue
        assert row["error"] == ""
        assert _num(row["total-time-ms"]) == src["total-time"]
        assert _num(row["downtime-ms"]) == src["downtime"]
        assert _num(row["transferred-bytes"]) == src["ram"]["transferred"]
        assert _num(row["passes"]) == len(rec["passes"])
        expected_mbps = src["ram"]["transferred"] * 8 / src["transfer-time"] / 1000
        assert _num(row["mbps"]) == pytest.approx(expected_mbps, abs=1e-3)
        assert _num(row["bytes-precopy"]) == src["channels"]["precopy"]["bytes"]
        postcopy = "postcopy-ram" in rec["settings"]["capabilities"]
        if postcopy:
            assert _num(row["postcopy-requests"]) == dst["postcopy-requests"]
            assert _num(row["blocktime-ms"]) == dst["postcopy-blocktime"]
            assert _num(row["preemptions"]) == src["preemptions"]
            assert _num(row["restores"]) == src["restores"]
            lat = dst["postcopy-latency"]
            if lat["count"]:
                for k in ("avg", "p50", "p99", "max"):
                    assert _num(row[f"latency-{k}-us"]) == pytest.approx(lat[k]), k
        else:
            # Precopy never got to request a page: no figure, rather than a misleading 0.
            assert row["postcopy-requests"] == row["latency-p99-us"] == row["blocktime-ms"] == ""
        if "postcopy-preempt" in rec["settings"]["capabilities"]:
            assert _num(row["bytes-postcopy-1"]) == src["channels"]["postcopy-1"]["bytes"]


def test_the_fixture_has_postcopy_requests(experiment):
    # Guards the other tests: the latency figures need real requests to mean anything.
    _, records = experiment
    post = [r for r in records.values() if r["status"] == "completed" and r["settings"]["capabilities"]]
    assert sum(len(r["latency-samples-us"]["all"]) for r in post) > 0
    assert any(len(r["passes"]) > 2 for r in records.values() if not r["settings"]["capabilities"])


def test_summary_csv_aggregates_completed_repeats(report):
    out, records = report
    rows = _csv(os.path.join(out, "summary.csv"))
    assert [int(r["combination"]) for r in rows] == [0, 1, 2]
    for row in rows:
        c = int(row["combination"])
        recs = [r for r in records.values() if r["combination"] == c]
        done = [r for r in recs if r["status"] == "completed"]
        assert (int(row["runs"]), int(row["completed"]), int(row["failed"])) == \
            (len(recs), len(done), len(recs) - len(done))
        times = [r["source"]["total-time"] for r in done]
        assert _num(row["total-time-ms-mean"]) == pytest.approx(np.mean(times), abs=1e-3)
        assert _num(row["total-time-ms-min"]) == min(times)
        assert _num(row["total-time-ms-max"]) == max(times)
        sent = [r["source"]["ram"]["transferred"] for r in done]
        assert _num(row["transferred-bytes-mean"]) == pytest.approx(np.mean(sent), abs=1e-3)
        assert row["configuration"] == "capabilities=" + ("+".join(done[0]["settings"]["capabilities"]) or "none")
    assert int(rows[2]["failed"]) == 1  # c002-r1


# --- figures ------------------------------------------------------------------------------

EXPECTED_PNGS = {"headline.png", "latency_cdf.png", "latency_histogram.png", "passes.png", "guest_progress.png",
                 "channel_bytes.png"}


def _pngs(out: str) -> set[str]:
    return {n for n in os.listdir(out) if n.endswith(".png")}


def test_pngs_are_real_images(report):
    import matplotlib.image as mpimg

    out, _ = report
    pngs = _pngs(out)
    assert EXPECTED_PNGS <= pngs
    for name in pngs:
        path = os.path.join(out, name)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        img = mpimg.imread(path)
        assert img.shape[0] > 200 and img.shape[1] > 300, name
        # Not blank: a white page with nothing drawn has no variance at all.
        assert float(np.var(img[..., :3])) > 1e-3, name


def test_pages_reference_every_png_and_list_failed_runs(report):
    out, records = report
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    for name in _pngs(out):
        assert f"]({name})" in md, name
        assert f'src="{name}"' in page, name
    assert md.startswith("# Experiment report: report-fixture")
    assert "sweeps/report-fixture.toml" in md and "sweeps/report-fixture.toml" in page
    # The error's pipe must not break the markdown table; in HTML it is escaped.
    assert FAILED_RUN in md and FAILED_ERROR.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;") in md
    assert FAILED_RUN in page and "while loading &lt;ram&gt;" in page
    # The table of configurations: one row per configuration.
    for c in range(3):
        assert f"| c{c:03d} |" in md
    assert page.count("<figure>") == len(_pngs(out))
    assert "runs.csv" in md and "summary.csv" in md


def test_format_and_out_options(experiment, tmp_path):
    d, _ = experiment
    out = str(tmp_path / "md-only")
    assert main(["experiment", "report", d, "--out", out, "--format", "md"]) == 0
    assert os.path.exists(os.path.join(out, "report.md"))
    assert not os.path.exists(os.path.join(out, "report.html"))
    assert {"runs.csv", "summary.csv"} <= set(os.listdir(out))
    with pytest.raises(SystemExit):
        main(["experiment", "report", d, "--format", "pdf"])


def test_precopy_only_experiment_has_no_latency_figures(experiment, tmp_path):
    """No postcopy request anywhere: the latency figures are left out, not drawn empty."""
    d, records = experiment
    sub = tmp_path / "precopy"
    (sub / "runs").mkdir(parents=True)
    meta = json.load(open(os.path.join(d, "sweep.json")))
    keep = [rid for rid, r in records.items() if r["combination"] == 0]
    meta.update(runs=keep, sweep={"capabilities": [[]]})
    (sub / "sweep.json").write_text(json.dumps(meta))
    for rid in keep:
        shutil.copy(os.path.join(d, "runs", f"{rid}.json"), sub / "runs")
    # A stale figure of an earlier report in the same place must go.
    (sub / "report").mkdir()
    (sub / "report" / "latency_cdf.png").write_bytes(b"old")
    assert main(["experiment", "report", str(sub)]) == 0
    out = str(sub / "report")
    pngs = _pngs(out)
    assert "latency_cdf.png" not in pngs and "latency_histogram.png" not in pngs
    assert {"headline.png", "passes.png", "guest_progress.png", "channel_bytes.png"} <= pngs
    md = open(os.path.join(out, "report.md")).read()
    assert "latency_cdf.png" not in md
    assert "every recorded run completed" in md


def test_every_run_failed(tmp_path):
    """Nothing completed: the report still comes out, with the failures and no figure."""
    text = SWEEP.replace("repeat = 2", "repeat = 1")
    spec = parse_spec(text)
    (tmp_path / "runs").mkdir()
    ids = []
    for i, settings in enumerate(spec.combinations()):
        rid = f"c{i:03d}-r0"
        ids.append(rid)
        (tmp_path / "runs" / f"{rid}.json").write_text(json.dumps(failed_record(spec.name, rid, i, 0, settings)))
    (tmp_path / "sweep.json").write_text(json.dumps({"name": spec.name, "runs": ids + ["c004-r0"],
                                                     "sweep": spec.sweep, "text": text}))
    assert main(["experiment", "report", str(tmp_path)]) == 0
    out = tmp_path / "report"
    assert _pngs(str(out)) == set()
    md = (out / "report.md").read_text()
    assert "No figure" in md and all(rid in md for rid in ids)
    assert "Not recorded (1): c004-r0" in md
    rows = _csv(str(out / "runs.csv"))
    assert {r["status"] for r in rows} == {"failed"}


def test_records_without_raw_samples(experiment, tmp_path):
    """Without latency-samples-us the histogram comes from the destination's postcopy-latency-dist."""
    d = _copy(experiment, tmp_path)
    for name in os.listdir(os.path.join(d, "runs")):
        p = os.path.join(d, "runs", name)
        rec = json.load(open(p))
        rec.pop("latency-samples-us")
        json.dump(rec, open(p, "w"))
    assert main(["experiment", "report", d]) == 0
    out = os.path.join(d, "report")
    pngs = _pngs(out)
    assert "latency_histogram.png" in pngs and "latency_cdf.png" not in pngs
    rows = {r["run"]: r for r in _csv(os.path.join(out, "runs.csv"))}
    _, records = experiment
    rec = records["c002-r0"]
    assert _num(rows["c002-r0"]["latency-p99-us"]) == pytest.approx(rec["destination"]["postcopy-latency"]["p99"])


def test_netns_link_and_probe_on_the_page(experiment, tmp_path):
    d = _copy(experiment, tmp_path)
    probe = {"rate-Bps": 11.9e6, "rtt-us": 60, "loaded-rtt-us": 4100}
    for name in os.listdir(os.path.join(d, "runs")):
        p = os.path.join(d, "runs", name)
        rec = json.load(open(p))
        rec["link"] = {"kind": "netns", "rate-bps": 100_000_000, "probe": probe}
        json.dump(rec, open(p, "w"))
    meta = json.load(open(os.path.join(d, "sweep.json")))
    json.dump({**meta, "link": "netns"}, open(os.path.join(d, "sweep.json"), "w"))
    assert main(["experiment", "report", d, "--format", "md"]) == 0
    md = open(os.path.join(d, "report", "report.md")).read()
    assert "Link: netns: shaped to 100 Mbit/s (measured: 95.2 Mbit/s, RTT 0.06 ms idle, 4.1 ms loaded)" in md


# --- bad input ------------------------------------------------------------------------------

def _copy(experiment, tmp_path) -> str:
    d, _ = experiment
    dst = str(tmp_path / "copy")
    shutil.copytree(d, dst, ignore=shutil.ignore_patterns("report"))
    return dst


def _report_error(args, capsys) -> str:
    assert main(["experiment", "report", *args]) == 2
    return capsys.readouterr().err


def test_no_sweep_json(tmp_path, capsys):
    err = _report_error([str(tmp_path)], capsys)
    assert "no sweep.json" in err and str(tmp_path) in err


def test_no_runs(experiment, tmp_path, capsys):
    d = _copy(experiment, tmp_path)
    shutil.rmtree(os.path.join(d, "runs"))
    err = _report_error([d], capsys)
    assert os.path.join(d, "runs") in err and "no runs directory" in err
    os.mkdir(os.path.join(d, "runs"))
    err = _report_error([d], capsys)
    assert "no run records" in err


def test_sweep_json_missing_key(experiment, tmp_path, capsys):
    d = _copy(experiment, tmp_path)
    p = os.path.join(d, "sweep.json")
    meta = json.load(open(p))
    del meta["sweep"]
    json.dump(meta, open(p, "w"))
    err = _report_error([d], capsys)
    assert p in err and "missing key 'sweep'" in err


@pytest.mark.parametrize("damage, expected", [
    (lambda text, rec: text[: len(text) // 2], "not valid JSON"),
    (lambda text, rec: json.dumps({k: v for k, v in rec.items() if k != "settings"}), "missing key 'settings'"),
    (lambda text, rec: json.dumps({**rec, "status": 3}), "key 'status' is int, expected a string"),
    (lambda text, rec: json.dumps({**rec, "passes": [{"pass": 1, "time": 0.0}]}),
     "passes[0] is missing the number 'transferred'"),
    (lambda text, rec: json.dumps({**rec, "latency-samples-us": {"all": ["fast"]}}),
     "latency-samples-us.all must be a list of numbers"),
    (lambda text, rec: json.dumps({**rec, "guest-progress": {"source": {"t": [1.0, 2.0], "ms_per_gib": [3.0]}}}),
     "guest-progress.source: 't' has 2 samples but 'ms_per_gib' has 1"),
], ids=["bad-json", "missing-settings", "status-type", "pass-fields", "samples", "progress-lengths"])
def test_malformed_record_is_named(experiment, tmp_path, capsys, damage, expected):
    d = _copy(experiment, tmp_path)
    p = os.path.join(d, "runs", "c001-r0.json")
    text = open(p).read()
    with open(p, "w") as f:
        f.write(damage(text, json.loads(text)))
    err = _report_error([d], capsys)
    assert p in err and expected in err, err
    assert not os.path.exists(os.path.join(d, "report", "report.md"))
