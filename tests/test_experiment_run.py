"""`ferry experiment run`: tiny sweeps end to end, run as the real program.

Each sweep starts real worker processes (on loopback, or inside network
namespaces of a testbed) and migrates real guests; the tests read the JSON
records back. Every worker the runner starts inherits a tag in its environment,
so the check that none is left behind finds exactly ours, even with other
Ferry processes on the host.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from ferry_migrate.engine import testbed
from ferry_migrate.engine.experiment.runner import RECORD_KEYS

FERRY = [sys.executable, "-m", "ferry_migrate.engine.cli"]
TAG = "FERRY_TEST_TAG"

_REASON: list = []


def netns_unavailable() -> str | None:
    """Why namespaces with tbf cannot be used here (tried once per session), or None."""
    if not _REASON:
        _REASON.append(testbed.unavailable_reason(shaping=True))
    return _REASON[0]


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries our tag (the runner's workers)."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(TAG) == tag and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


@pytest.fixture
def ferry(tmp_path):
    """ferry(*args) -> CompletedProcess, run in tmp_path; afterwards no tagged process and no namespace
    of the command is left."""
    tag = uuid.uuid4().hex
    started = []

    def run(*args, timeout=120, wait=True):
        env = {**os.environ, TAG: tag}
        p = subprocess.Popen([*FERRY, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        started.append(p)
        if not wait:
            return p
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            pytest.fail(f"ferry {' '.join(args)} timed out\n{out}\n{err}")
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    run.tag = tag
    yield run
    for p in started:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    deadline = time.monotonic() + 10
    while tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = tagged_processes(tag)
    for p in left:
        p.kill()
    assert not left, f"worker processes left behind: {[(p.pid, p.cmdline()) for p in left]}"
    ours = [n for n in testbed.list_namespaces() for p in started if n.startswith(f"ferry-{p.pid}-")]
    assert not ours, f"namespaces left behind: {ours}"


def wait_for_migration(tag: str, proc, timeout: float) -> str | None:
    """Poll the tagged source worker (found by its command line) until its migration is active."""
    import asyncio

    from ferry_migrate.engine.control.client import ControlClient, ControlError

    async def status(ep):
        async with ControlClient(ep, timeout=2.0) as c:
            return (await c.call("query-migrate"))["status"]

    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline and proc.poll() is None:
        for w in tagged_processes(tag):
            try:
                cmd = w.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "--role" in cmd and cmd[cmd.index("--role") + 1] == "source":
                try:
                    st = asyncio.run(status(cmd[cmd.index("--control") + 1]))
                except ControlError:
                    st = None  # not serving yet
        if st == "active":
            return st
        time.sleep(0.1)
    return st


def write(tmp_path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return name


def records(out_dir) -> dict[str, dict]:
    runs = out_dir / "runs"
    return {p.stem: json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))}


# A small guest whose postcopy phase lasts long enough for the destination's
# guest to fault pages in: background pages are held to 8 MiB/s after the switch.
POSTCOPY_SWEEP = """
name = "tiny"
link = "{link}"

[fixed]
guest-size = "16M"
workload-pattern = "random"
workload-dirty-rate = "32M"
dest-workload-batch = 1
capabilities = ["postcopy-ram"]
max-postcopy-bandwidth = "8M"
warmup = 0.2
cooldown = 0.2
timeout = 60.0

[sweep]
{sweep}
"""


def check_record(rec: dict, run_id: str) -> None:
    """Schema keys and shapes the report relies on."""
    assert set(RECORD_KEYS) <= set(rec), set(RECORD_KEYS) - set(rec)
    assert rec["run"] == run_id and rec["experiment"] == "tiny"
    assert rec["status"] == "completed", rec["error"]
    assert rec["error"] is None
    assert rec["source"]["status"] == rec["destination"]["status"] == "completed"
    assert rec["source"]["digests"] and rec["source"]["digests"] == rec["destination"]["digests"]
    assert rec["passes"] and {"pass", "dirty-pages", "dirty-pages-rate", "transferred", "time"} <= set(rec["passes"][0])
    assert {e["side"] for e in rec["events"]} == {"source", "destination"}
    assert all(set(e) == {"t", "side", "event", "data"} for e in rec["events"])
    for side in ("source", "destination"):
        assert set(rec["workers"][side]) >= {"cpu-user", "cpu-system", "rss", "threads"}
        assert rec["workers"][side]["rss"] > 0
        g = rec["guest-progress"][side]
        assert len(g["t"]) == len(g["ms_per_gib"])
    assert len(rec["guest-progress"]["source"]["t"]) > 0
    assert isinstance(rec["latency-samples-us"]["all"], list)


def test_loopback_sweep_then_resume(ferry, tmp_path):
    f = write(tmp_path, "tiny.toml", POSTCOPY_SWEEP.format(
        link="loopback", sweep='switchover = ["precopy", "postcopy-after-percent:5"]'))
    r = ferry("experiment", "run", f, "--out", "out", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["completed"] == 2 and summary["failed"] == [] and summary["skipped"] == []
    out = tmp_path / "out"
    recs = records(out)
    assert list(recs) == ["c000-r0", "c001-r0"]
    for rid, rec in recs.items():
        check_record(rec, rid)
        assert rec["link"] == {"kind": "loopback", "rate-bps": None, "probe": None}
    pre, post = recs["c000-r0"], recs["c001-r0"]
    assert pre["settings"]["switchover"] == "precopy" and pre["parameters"] == {"max-postcopy-bandwidth": 8 << 20}
    assert post["parameters"]["postcopy-after-percent"] == 5 and post["capabilities"] == {"postcopy-ram": True}
    # Precopy: no page was requested, and the guest ran on the destination only once the
    # migration completed (autostart), never before the switchover.
    assert pre["latency-samples-us"]["all"] == []
    assert all(t >= pre["switchover"] for t in pre["guest-progress"]["destination"]["t"])
    assert pre["switchover"] is not None and "postcopy-active" not in [e["data"].get("status") for e in pre["events"]]
    # Postcopy: the guest ran on both sides, and faulted pages in on the destination.
    assert "postcopy-active" in [e["data"].get("status") for e in post["events"] if e["side"] == "source"]
    for side in ("source", "destination"):
        assert len(post["guest-progress"][side]["t"]) > 0, side
    assert "start" in [m[1] for m in post["guest-progress"]["destination"]["marks"]]
    lat = post["latency-samples-us"]
    assert len(lat["all"]) > 0 and all(v > 0 for v in lat["all"])
    assert sum(len(v) for k, v in lat.items() if k != "all") == len(lat["all"])
    assert len(lat["all"]) == post["destination"]["postcopy-latency"]["count"]
    assert post["switchover"] <= min(post["guest-progress"]["destination"]["t"])

    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["name"] == "tiny" and sweep["runs"] == ["c000-r0", "c001-r0"]
    assert sweep["sweep"] == {"switchover": ["precopy", "postcopy-after-percent:5"]}
    assert sweep["text"] == (tmp_path / f).read_text() and sweep["started"] <= pre["started"]
    assert [p["settings"]["switchover"] for p in sweep["plan"]] == ["precopy", "postcopy-after-percent:5"]
    assert sorted(os.listdir(out / "logs")) == ["c000-r0-destination.log", "c000-r0-source.log",
                                                 "c001-r0-destination.log", "c001-r0-source.log"]

    # Again without --resume: refused, nothing touched.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    r = ferry("experiment", "run", f, "--out", "out")
    assert r.returncode == 2 and "--resume" in r.stderr
    # --resume after losing one record: only that run again.
    (out / "runs" / "c001-r0.json").unlink()
    r = ferry("experiment", "run", f, "--out", "out", "--resume", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["skipped"] == ["c000-r0"] and list(summary["records"]) == ["c001-r0"]
    assert (out / "runs" / "c000-r0.json").stat().st_mtime_ns == mtimes["c000-r0.json"]
    check_record(records(out)["c001-r0"], "c001-r0")
    assert len(json.loads((out / "sweep.json").read_text())["resumed"]) == 1
    # Nothing left to do.
    r = ferry("experiment", "run", f, "--out", "out", "--resume", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ran"] == 0
    # --resume with another sweep in the same directory: refused.
    g = write(tmp_path, "other.toml", POSTCOPY_SWEEP.format(link="loopback", sweep='blocks = [1, 2]'))
    r = ferry("experiment", "run", g, "--out", "out", "--resume")
    assert r.returncode == 2 and "different sweep" in r.stderr


def test_guest_backend_as_a_sweep_axis(ferry, tmp_path):
    from ferry_migrate.engine import uffd

    why = uffd.unavailable_reason()
    if why is not None:
        pytest.skip(f"userfaultfd unavailable: {why}")
    f = write(tmp_path, "tiny.toml", POSTCOPY_SWEEP.format(
        link="loopback", sweep='guest = ["in-process", "process"]\nswitchover = ["postcopy-after-percent:5"]'))
    r = ferry("experiment", "run", f, "--out", "out", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    recs = records(tmp_path / "out")
    inproc, proc = recs["c000-r0"], recs["c001-r0"]
    for rid, rec in recs.items():
        check_record(rec, rid)
    assert inproc["guest-check"] is None and "uffd-kernel-faults" not in inproc["destination"]
    # The guest process: faults through the kernel, each one a fault of the migration; its own check clean.
    d = proc["destination"]
    assert proc["settings"]["guest"] == "process" and d["guest"] == "process"
    assert d["uffd-kernel-faults"] > 0 and d["postcopy-faults"] == d["uffd-kernel-faults"]
    assert proc["guest-check"]["pages-checked"] > 0 and proc["guest-check"]["mismatches"] == 0
    assert len(proc["latency-samples-us"]["all"]) == d["postcopy-latency"]["count"] > 0


def test_report_on_real_run_output(ferry, tmp_path):
    """`experiment report` reads what `experiment run` wrote (not a hand-made record): its
    CSVs carry the records' own figures, its PNGs are drawn, its page links them all."""
    import csv

    f = write(tmp_path, "tiny.toml", POSTCOPY_SWEEP.format(
        link="loopback", sweep='switchover = ["precopy", "postcopy-after-percent:5"]'))
    r = ferry("experiment", "run", f, "--out", "out")
    assert r.returncode == 0, r.stderr
    recs = records(tmp_path / "out")
    r = ferry("experiment", "report", "out")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = tmp_path / "out" / "report"
    with open(rep / "runs.csv", newline="") as fh:
        rows = {row["run"]: row for row in csv.DictReader(fh)}
    assert sorted(rows) == sorted(recs) == ["c000-r0", "c001-r0"]
    for rid, rec in recs.items():
        row = rows[rid]
        assert row["status"] == rec["status"] == "completed"
        assert float(row["total-time-ms"]) == rec["source"]["total-time"]
        assert float(row["transferred-bytes"]) == rec["source"]["ram"]["transferred"]
        assert float(row["passes"]) == len(rec["passes"])
    post = recs["c001-r0"]["destination"]
    assert float(rows["c001-r0"]["postcopy-requests"]) == post["postcopy-requests"] > 0
    # postcopy-ram on, but the switchover never came: none requested.
    assert float(rows["c000-r0"]["postcopy-requests"]) == recs["c000-r0"]["destination"]["postcopy-requests"] == 0
    with open(rep / "summary.csv", newline="") as fh:
        summary = list(csv.DictReader(fh))
    assert [(s["combination"], s["runs"], s["completed"]) for s in summary] == [("0", "1", "1"), ("1", "1", "1")]
    pngs = sorted(p.name for p in rep.glob("*.png"))
    assert "headline.png" in pngs and "latency_cdf.png" in pngs
    md = (rep / "report.md").read_text()
    assert md.startswith("# Experiment report: tiny")
    for name in pngs:
        assert (rep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in md, name


def test_failed_run_is_recorded_and_the_sweep_goes_on(ferry, tmp_path):
    # 16 MiB at 128 KiB/s would take two minutes: the runner cancels it at the
    # 8 s timeout, records the run as failed, and goes on with the next one, which
    # (unlimited) takes a fraction of a second: far inside the timeout even under load.
    f = write(tmp_path, "fail.toml", """
name = "tiny"
[fixed]
guest-size = "16M"
timeout = 8.0
warmup = 0.0
cooldown = 0.0
[sweep]
max-bandwidth = ["128K", 0]
""")
    r = ferry("experiment", "run", f, "--out", "out")
    assert r.returncode == 1, r.stderr
    assert "1 of 2 run(s) completed, 1 failed (c000-r0)" in r.stdout
    recs = records(tmp_path / "out")
    bad, good = recs["c000-r0"], recs["c001-r0"]
    assert set(RECORD_KEYS) <= set(bad)
    assert bad["status"] == "failed" and "timed out" in bad["error"] and "cancelled" in bad["error"]
    assert bad["source"]["status"] == "cancelled"
    check_record(good, "c001-r0")


def test_worker_that_cannot_start_is_a_failed_run(ferry, tmp_path):
    # The source refuses a guest whose single 1 GiB huge page the host has not
    # reserved: a failure at run time, not in the file.
    from ferry_migrate.engine.ram import hugepage_status

    if hugepage_status(1 << 30)[0] >= 1:
        pytest.skip("this host has a free 1 GiB huge page: the hugetlb guest would start")
    f = write(tmp_path, "huge.toml", """
name = "tiny"
[fixed]
warmup = 0.0
cooldown = 0.0
page-size = "1G"
guest-size = "1G"
backing = "hugetlb"
""")
    r = ferry("experiment", "run", f, "--out", "out")
    assert r.returncode == 1
    rec = records(tmp_path / "out")["c000-r0"]
    assert rec["status"] == "failed" and "huge" in rec["error"].lower() and "exited" in rec["error"]
    assert rec["source"] == {} and rec["guest-progress"]["source"]["t"] == []


BAD_FILES = [
    ("unknown key", '[fixed]\nguest-sise = "32M"\n', "bad.toml:2", "unknown key 'guest-sise'"),
    ("wrong type", '[fixed]\ntimeout = "soon"\n', "bad.toml:2", "timeout"),
    ("bad value", '[sweep]\npage-size = ["4K", "3M"]\n', "bad.toml:2", "page-size"),
    ("impossible", '[sweep]\npostcopy-preempt = [false, true]\n', "bad.toml:2", "postcopy-preempt needs postcopy-ram"),
    ("switchover", '[fixed]\nswitchover = "postcopy-after-passes:1"\n', "bad.toml:2", "needs the postcopy-ram"),
    ("hosts guest", 'link = "hosts"\n[hosts]\nsource = "ipc:///tmp/s"\ndestination = "ipc:///tmp/d"\n'
                    '[sweep]\nworkload-dirty-rate = ["8M", "16M"]\n', "bad.toml:6", "changes the guest"),
    ("hosts key", 'link = "hosts"\n[hosts]\nsource = "ipc:///tmp/s"\ndestination = "ipc:///tmp/d"\n'
                  'token = "x"\n', "bad.toml:5", "unknown key 'token' in [hosts]"),
    ("link-rate", '[fixed]\nlink-rate = "1gbit"\n', "bad.toml:2", "link-rate"),
    ("unix netns", 'link = "netns"\n[fixed]\ntransport = "unix"\n', "bad.toml:3", "transport"),
    ("repeat", 'repeat = 0\n', "bad.toml:1", "repeat"),
]


@pytest.mark.parametrize("case,text,where,words", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_sweep_file_is_refused_naming_key_and_line(tmp_path, capsys, case, text, where, words):
    from ferry_migrate.engine.cli import main

    (tmp_path / "bad.toml").write_text(text)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main(["experiment", "run", "bad.toml", "--out", "out"])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code == 2
    assert where in err and words in err, err
    assert not (tmp_path / "out").exists()  # nothing started


def test_bad_file_exit_code_from_the_program(ferry, tmp_path):
    write(tmp_path, "bad.toml", 'name = "x"\n[sweep]\nguest-size = ["16M", "lots"]\n')
    r = ferry("experiment", "run", "bad.toml")
    assert r.returncode == 2 and "bad.toml:3" in r.stderr and "guest-size" in r.stderr
    assert not (tmp_path / "results").exists()
    r = ferry("experiment", "run", "missing.toml")
    assert r.returncode == 2 and "missing.toml" in r.stderr


def test_netns_sweep(ferry, tmp_path):
    if (why := netns_unavailable()) is not None:
        pytest.skip(f"network namespaces unavailable: {why}")
    f = write(tmp_path, "tiny.toml", POSTCOPY_SWEEP.format(
        link="netns", sweep='link-rate = ["500mbit"]\npostcopy-preempt = [false, true]').replace(
        '[sweep]', 'switchover = "postcopy-after-percent:5"\n[sweep]'))
    r = ferry("experiment", "run", f, "--out", "out", "--json")
    assert r.returncode == 0, r.stderr
    recs = records(tmp_path / "out")
    assert list(recs) == ["c000-r0", "c001-r0"]
    for rid, rec in recs.items():
        check_record(rec, rid)
        link = rec["link"]
        assert link["kind"] == "netns" and link["rate-bps"] == 500_000_000
        assert link["probe"]["rtt-us"]["count"] > 0 and link["probe"]["rate-Bps"] > 0
        # The stream crossed the veth: the destination listened on its own address.
        assert rec["uri"].startswith(f"tcp:{link['addresses']['destination']}:")
        assert len(rec["latency-samples-us"]["all"]) > 0
        assert len(rec["guest-progress"]["destination"]["t"]) > 0
    # One testbed for the sweep (one link rate).
    assert recs["c000-r0"]["link"]["namespaces"] == recs["c001-r0"]["link"]["namespaces"]
    assert "postcopy-1" in recs["c001-r0"]["latency-samples-us"]  # preempt: pages placed via the POSTCOPY channel
    assert "postcopy-1" not in recs["c000-r0"]["latency-samples-us"]


def test_interrupt_stops_workers_and_removes_namespaces(ferry, tmp_path):
    link = "netns" if netns_unavailable() is None else "loopback"
    f = write(tmp_path, "slow.toml", f"""
name = "slow"
link = "{link}"
[fixed]
guest-size = "32M"
max-bandwidth = "1M"
warmup = 0.0
[sweep]
blocks = [1, 2]
""")
    p = ferry("experiment", "run", f, "--out", "out", wait=False)
    # Interrupt in the middle of the first migration (1 MiB/s: it takes 32 s).
    assert wait_for_migration(ferry.tag, p, 30) == "active"
    if link == "netns":
        assert [n for n in testbed.list_namespaces() if n.startswith(f"ferry-{p.pid}-")]
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "--resume" in err
    assert not list((tmp_path / "out" / "runs").glob("*.json"))  # no half record
    assert not list((tmp_path / "out" / "runs").glob(".*"))  # nor a temp file
    # The fixture checks that no worker and no namespace is left.


def test_hosts_sweep_with_workers_in_restart_loops(ferry, tmp_path):
    # Workers "already running" elsewhere, each in a restart loop as docs/experiments.md
    # suggests: the runner quits both after each run and waits for the fresh ones.
    loops = []
    eps = {r: f"ipc://{tmp_path}/{r}.ctl" for r in ("source", "destination")}
    env = {**os.environ, TAG: ferry.tag}
    try:
        for role, ep in eps.items():
            cmd = " ".join([*FERRY, "worker", "--role", role, "--control", ep, "--size", "8M"])
            loops.append(subprocess.Popen(["bash", "-c", f"while {cmd} 2>>{tmp_path}/{role}.log; do :; done"],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
                                          start_new_session=True))
        f = write(tmp_path, "hosts.toml", f"""
name = "tiny"
link = "hosts"
repeat = 2
[hosts]
source = "{eps['source']}"
destination = "{eps['destination']}"
quit-after-run = true
wait = 30
[fixed]
warmup = 0.1
cooldown = 0.0
""")
        r = ferry("experiment", "run", f, "--out", "out")
        assert r.returncode == 0, r.stdout + r.stderr
        recs = records(tmp_path / "out")
        assert [rec["status"] for rec in recs.values()] == ["completed", "completed"]
        a, b = recs["c000-r0"], recs["c000-r1"]
        assert a["link"]["kind"] == "hosts" and a["guest"]["size"] == 8 << 20
        # Fresh workers for the second run.
        assert a["workers"]["source"]["pid"] != b["workers"]["source"]["pid"]
        assert a["source"]["digests"] == a["destination"]["digests"]
    finally:
        for p in loops:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(10)


def test_new_verbs_on_workers(tmp_path):
    """query-guest-progress on both roles, query-postcopy-latency on a destination only."""
    import asyncio

    from ferry_migrate.engine.control.client import CommandFailed, ControlClient
    from ferry_migrate.engine.control.spawn import spawn_worker

    ws = [spawn_worker(role, f"ipc://{tmp_path}/{role}.ctl", ["--size", "8M", "--workload-pattern", "zipf",
                                                              "--workload-write-ratio", "0.5"],
                       log_path=str(tmp_path / f"{role}.log"), new_session=True)
          for role in ("source", "destination")]
    try:
        for w in ws:
            w.wait_ready(30)

        async def ask():
            async with ControlClient(ws[0].control) as s, ControlClient(ws[1].control) as d:
                # Wait for a progress sample (taken every 0.1 s), however long that takes.
                for _ in range(600):
                    sp = await s.call("query-guest-progress")
                    if sp["t"]:
                        break
                    await asyncio.sleep(0.1)
                dp = await d.call("query-guest-progress")
                lat = await d.call("query-postcopy-latency")
                # A source has no incoming migration: no samples (either role may ask).
                assert await s.call("query-postcopy-latency") == {"all": []}
                st = await s.call("query-status")
                return sp, dp, lat, st
        sp, dp, lat, st = asyncio.run(ask())
        assert sp["running"] and len(sp["t"]) == len(sp["ms_per_gib"]) > 0 and sp["marks"][0][1] == "start"
        assert not dp["running"] and dp["t"] == [] and dp["marks"] == []  # the guest has not moved
        assert lat == {"all": []}
        wl = st["guest"]["workload"]
        assert wl["pattern"] == "zipf" and wl["write-ratio"] == 0.5
    finally:
        for w in ws:
            w.stop()
