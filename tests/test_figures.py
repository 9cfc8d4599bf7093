"""The figures a user reads: postcopy bytes on every channel, remaining and precopy bytes
that mean what they say, one channel-naming scheme, one rate unit, downtime over the
limit said out loud.

Real `ferry demo` runs (worker processes on loopback) for the figures; the pure
helpers (naming, the downtime check, the report) without them.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from ferry_migrate.channels.channel import postcopy_channel_name
from ferry_migrate.engine import stats as S
from ferry_migrate.engine.control.driver import Outcome
from ferry_migrate.engine.control.report import render
from ferry_migrate.engine.destination import MigrationDestination
from ferry_migrate.engine.params import MigrationConfig
from ferry_migrate.engine.ram import GuestRAM
from ferry_migrate.engine.source import MigrationSource

from .test_cli import ferry  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parent.parent


def test_one_channel_naming_scheme_for_any_count():
    assert [postcopy_channel_name(i) for i in range(4)] == ["postcopy-1", "postcopy-2", "postcopy-3", "postcopy-4"]


def test_docs_use_the_channel_names_the_engine_uses():
    old = re.compile(r"`postcopy\d`|\bpostcopy\d+\b|bytes-postcopy\b(?!-)|`postcopy`, `postcopy")
    for path in [*ROOT.glob("docs/*.md"), *ROOT.glob("docs/experiments/*/*.md"), *ROOT.glob("docs/experiments/*/*.csv"),
                 ROOT / "README.md"]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not old.search(line), f"{path.relative_to(ROOT)}:{n}: {line}"


@pytest.mark.parametrize("channels", [1, 2])
def test_postcopy_figures_count_every_channel(ferry, channels):
    r = ferry("demo", "--json", "--size", "32M", "--param", f"postcopy-channels={channels}",
              "--workload-pattern", "random")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    src, dst = res["source"], res["destination"]
    names = [postcopy_channel_name(i) for i in range(channels)]
    assert sorted(src["channels"]) == sorted(["precopy", *names]) == sorted(dst["channels"])
    # Received after the switch: the PRECOPY channel's rest and every POSTCOPY channel.
    on_postcopy = sum(dst["channels"][n]["bytes"] for n in names)
    assert dst["postcopy-bytes"] >= on_postcopy
    assert dst["postcopy-bytes"] == src["postcopy-bytes"]
    assert src["postcopy-bytes"] == src["ram"]["transferred"] - src["ram"]["precopy-bytes"] \
        - src["ram"]["downtime-bytes"]
    for q in (src, dst):
        assert q["ram"]["remaining"] == 0
    assert dst["ram"]["precopy-bytes"] > 0
    # The last sync is the switch's, with the guest paused; no pass before it is.
    assert src["passes"][-1]["guest-paused"] is True
    assert not any(p["guest-paused"] for p in src["passes"][:-1])
    assert "downtime-exceeded" not in src  # downtime-limit does not govern the switch to postcopy


def test_report_units_and_passes(ferry):
    r = ferry("demo", "--size", "32M")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Mbit/s" not in out and "MiB/s" in out
    flat = " ".join(out.split())  # lines are wrapped to the terminal
    m = re.search(r"precopy-pacing-rate ([^,]+?)(,|$| [a-z-]+ )", flat)
    assert m and (m[1].endswith("MiB/s") or m[1].startswith("0 ")), out
    assert re.search(r"pages to send at each pass: [\d, ]+; \d+ at the switch to postcopy", flat), flat


def test_precopy_bytes_during_the_active_phase():
    src, dst = GuestRAM.create(16 << 20), GuestRAM.create(16 << 20)
    src.fill("pattern")
    cfg = MigrationConfig()
    cfg.set_parameters({"max-bandwidth": 4 << 20})
    d = MigrationDestination(dst)
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    s = MigrationSource(src, None, cfg)
    s.start(uri)
    try:
        deadline = time.monotonic() + 60
        while True:
            q = s.query()
            if q["status"] == S.ACTIVE and q["ram"]["transferred"] > 0:
                break
            assert time.monotonic() < deadline and q["status"] in (S.SETUP, S.ACTIVE), q
            time.sleep(0.01)
        assert q["ram"]["precopy-bytes"] == q["ram"]["transferred"]
    finally:
        cfg.set_parameters({"max-bandwidth": 0})
        s.parameters_changed()
        assert s.wait(60) == S.COMPLETED
        assert d.wait(60) == S.COMPLETED
    assert d.query()["ram"]["remaining"] == 0


def test_downtime_check():
    q = {"status": "completed", "downtime": 335}
    assert S.check_downtime(dict(q), 300, postcopy=False) == {**q, "downtime-limit": 300, "downtime-exceeded": 35}
    assert S.check_downtime(dict(q), 400, postcopy=False)["downtime-exceeded"] == 0
    assert "downtime-exceeded" not in S.check_downtime(dict(q), 300, postcopy=True)
    assert "downtime-exceeded" not in S.check_downtime({"status": "active"}, 300, postcopy=False)


def test_report_says_when_downtime_was_over_the_limit():
    src = {"status": "completed", "total-time": 900, "downtime": 335, "expected-downtime": 120,
           "downtime-limit": 300, "downtime-exceeded": 35,
           "downtime-phases": {"pause": 1, "sync": 2, "send": 320, "confirm": 12},
           "ram": {"transferred": 1 << 20, "total": 1 << 20, "mbps": 80.0}, "digests": {"pc.ram": "ab"}}
    out = Outcome(uri="tcp:127.0.0.1:1", source=src, destination={"status": "completed", "digests": {"pc.ram": "ab"}},
                  params={"downtime-limit": 300})
    text = "\n".join(render(out))
    assert "over the downtime-limit by 35 ms" in text and "estimated 120 ms" in text and "send 320 ms" in text
    src["downtime-exceeded"] = 0
    assert "over the downtime-limit" not in "\n".join(render(out))


def test_worker_query_migrate_reports_the_limit(ferry):
    r = ferry("demo", "--json", "--precopy", "--size", "16M", "--param", "downtime-limit=250")
    assert r.returncode == 0, r.stderr
    src = json.loads(r.stdout)["source"]
    assert src["downtime-limit"] == 250
    assert src["downtime-exceeded"] == max(0, src["downtime"] - 250)
    assert set(src["downtime-phases"]) == {"pause", "sync", "send", "confirm"}
    assert "expected-downtime" in src or src["downtime"] >= 0
