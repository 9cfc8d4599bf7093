"""Each migration parameter acts where and when QEMU's does (or as documented for Ferry's own).

QEMU (migration/options.c, migration.c): max-bandwidth limits the stream while
precopy is active and is re-read at once when changed; downtime-limit is read
at every iteration; max-postcopy-bandwidth limits background pages in
postcopy; while the guest is paused (stop-and-copy, the switch to postcopy)
the stream is not limited. Ferry's postcopy-after-passes/-percent are read at
every iteration too; every other parameter is read when the migration starts,
and a worker refuses to change it during one.

Real source and destination engines over TCP loopback, in this process.
Waits are generous: a failure here is a sleep of minutes, not milliseconds.
"""
from __future__ import annotations

import time

import pytest

from ferry_migrate.engine import stats as S
from ferry_migrate.engine.destination import MigrationDestination
from ferry_migrate.engine.params import LIVE_PARAMETERS, PARAMETERS, MigrationConfig
from ferry_migrate.engine.ram import GuestRAM
from ferry_migrate.engine.source import MigrationSource
from ferry_migrate.engine.worker import Worker, guest_config

SIZE = 16 << 20
DONE = 60.0  # s; the throttled cases below would need 256 s or more


def _pair(params: dict, caps: dict | None = None, size: int = SIZE):
    src, dst = GuestRAM.create(size), GuestRAM.create(size)
    src.fill("pattern")
    scfg, dcfg = MigrationConfig(), MigrationConfig()
    for cfg in (scfg, dcfg):
        if caps:
            cfg.set_capabilities(caps)
        cfg.set_parameters(params)
    d = MigrationDestination(dst, dcfg)
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    s = MigrationSource(src, None, scfg)
    s.start(uri)
    return s, d, scfg


def _until(pred, what: str, timeout: float = DONE):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _finish(s, d):
    try:
        assert s.wait(DONE) == S.COMPLETED, s.stats.error
        assert d.wait(DONE) == S.COMPLETED, d.stats.error
        assert s.query()["digests"] == d.query()["digests"]
    finally:
        for m in (s, d):
            if m.status not in S.FINAL_STATES:
                try:
                    m.cancel()
                except RuntimeError:
                    pass


def test_lifting_max_bandwidth_wakes_a_sender_in_the_middle_of_its_debt():
    """4 KiB/s: the first 1 MiB flush alone owes 256 s; lifting the limit ends it at once."""
    s, d, cfg = _pair({"max-bandwidth": 4096})
    _until(lambda: s.channel is not None and s.channel.writer.limiter.debt() > 1, "the sender never slept")
    cfg.set_parameters({"max-bandwidth": 0})
    s.parameters_changed()
    _finish(s, d)


def test_stop_and_copy_is_not_rate_limited():
    """A downtime limit this large stops the guest at once; what is left goes out unlimited."""
    s, d, cfg = _pair({"max-bandwidth": 256 << 10, "downtime-limit": 2_000_000})
    _finish(s, d)
    r = s.query()["ram"]
    assert r["downtime-bytes"] > SIZE // 2  # most of RAM, sent while paused (at 256 KiB/s: 32 s and more)
    assert s.query()["downtime"] < 2_000_000


def test_max_postcopy_bandwidth_applies_in_postcopy_and_changes_live():
    s, d, cfg = _pair({"max-bandwidth": 0, "max-postcopy-bandwidth": 4096, "postcopy-after-percent": 10},
                      caps={"postcopy-ram": True})
    _until(lambda: s.status == S.POSTCOPY_ACTIVE and s.channel.writer.rate_limit == 4096,
           "no postcopy with max-postcopy-bandwidth")
    _until(lambda: s.channel.writer.limiter.debt() > 1, "the postcopy sender never slept")
    # max-bandwidth is precopy's: changing it now leaves postcopy's limit alone.
    cfg.set_parameters({"max-bandwidth": 1 << 20})
    s.parameters_changed()
    assert s.channel.writer.rate_limit == 4096
    cfg.set_parameters({"max-postcopy-bandwidth": 0})
    s.parameters_changed()
    _finish(s, d)


def test_postcopy_after_percent_can_be_set_during_precopy():
    """Ferry's switch triggers are read at every iteration, so a worker accepts them live."""
    w = Worker("source", guest_config(size="16M", workload_threads=0))
    dst = GuestRAM.create(SIZE)
    dcfg = MigrationConfig()
    dcfg.set_capabilities({"postcopy-ram": True})
    d = MigrationDestination(dst, dcfg)
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    try:
        w.set_capabilities({"capabilities": [{"capability": "postcopy-ram", "state": True}]})
        w.set_parameters({"max-bandwidth": 256 << 10})
        w.migrate({"uri": uri})
        _until(lambda: w.status == S.ACTIVE, "never active")
        w.set_parameters({"postcopy-after-percent": 1, "max-postcopy-bandwidth": 0})
        _until(lambda: w.status in (S.POSTCOPY_ACTIVE, S.COMPLETED), "no switch to postcopy")
        w.set_parameters({"max-bandwidth": 0})
        _finish(w.migration, d)
    finally:
        w.shutdown("test")


@pytest.fixture(scope="module")
def running_worker():
    """A source worker in the middle of a migration throttled to 4 KiB/s."""
    w = Worker("source", guest_config(size="16M", workload_threads=0))
    d = MigrationDestination(GuestRAM.create(SIZE), MigrationConfig())
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    w.set_parameters({"max-bandwidth": 4096})
    w.migrate({"uri": uri})
    _until(lambda: w.status == S.ACTIVE, "never active")
    yield w
    w.shutdown("test")
    d.cancel()
    d.wait(DONE)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_every_parameter_is_either_live_or_refused_during_a_migration(running_worker, name):
    """Each parameter says where and when it applies; the live ones are taken, the others refused by name."""
    from ferry_migrate.engine.control.protocol import RequestError

    spec = PARAMETERS[name]
    assert spec.applies, f"{name}: say where and when it applies"
    value = 4096 if name == "max-bandwidth" else spec.default  # keep the migration throttled
    if spec.live:
        running_worker.set_parameters({name: value})
        assert running_worker.query_parameters({})[name] == value
    else:
        with pytest.raises(RequestError, match=f"{name} cannot change during a migration"):
            running_worker.set_parameters({name: value})
    assert running_worker.status == S.ACTIVE
