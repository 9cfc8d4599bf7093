"""CPU priority of the urgent path's threads (engine/urgent.py): urgent-thread-nice and
urgent-thread-rt-priority, checked on real threads through the kernel, in migrations
between real worker processes (in-process guest and a guest process with userfaultfd),
through a pause and a recovery, and refused without the privilege (never fatal)."""
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from ferry_migrate.engine import uffd as U
from ferry_migrate.engine.control.client import ControlClient
from ferry_migrate.engine.control.driver import run_migration
from ferry_migrate.engine.local import GuestConfig, run_local_migration
from ferry_migrate.engine.params import MigrationConfig, ParameterError
from ferry_migrate.engine.urgent import UrgentThreads
from ferry_migrate.engine.workload import WorkloadConfig

from .test_control import spawn  # noqa: F401 - spawn is a fixture
from .test_recovery_workers import _until

PREEMPT = {"postcopy-ram": True, "postcopy-preempt": True}
SLOW = {"postcopy-after-percent": 5, "max-postcopy-bandwidth": 32 << 20}
URGENT = {"urgent-pages-from": "return-path", "urgent-thread-nice": -5, "urgent-thread-rt-priority": 5}


def _in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e
    t = threading.Thread(target=run, name="urgent-test")
    t.start()
    t.join(10)
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_enter_sets_nice_and_fifo_on_the_calling_thread_only():
    cfg = MigrationConfig()
    cfg.set_parameters({"urgent-thread-nice": -5, "urgent-thread-rt-priority": 5})
    u = UrgentThreads(cfg)

    def body():
        u.enter()
        tid = threading.get_native_id()
        return os.getpriority(os.PRIO_PROCESS, tid), os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority

    if os.geteuid() != 0:
        pytest.skip("lowering a nice value and SCHED_FIFO need CAP_SYS_NICE")
    nice, policy, prio = _in_thread(body)
    assert (nice, policy, prio) == (-5, os.SCHED_FIFO, 5)
    assert u.metrics() == {"urgent-threads": {"urgent-test": "nice -5, fifo 5"}}
    # The calling test thread is untouched.
    me = threading.get_native_id()
    assert os.sched_getscheduler(me) == os.SCHED_OTHER


def test_default_leaves_threads_alone():
    u = UrgentThreads(MigrationConfig())
    before = os.getpriority(os.PRIO_PROCESS, 0)
    nice, policy = _in_thread(lambda: (u.enter(), (os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
                                                   os.sched_getscheduler(threading.get_native_id())))[1])
    assert (nice, policy) == (before, os.SCHED_OTHER)
    assert u.metrics() == {}


def test_refused_without_privilege_is_reported_not_raised():
    """An unprivileged worker: the thread goes on at its old priority and says why."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user")
    # Imports first: the interpreter's files may not be readable by that user.
    code = ("import os, threading, json\n"
            "from ferry_migrate.engine.params import MigrationConfig\n"
            "from ferry_migrate.engine.urgent import UrgentThreads\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "c = MigrationConfig(); c.set_parameters({'urgent-thread-nice': -5, 'urgent-thread-rt-priority': 5})\n"
            "u = UrgentThreads(c)\n"
            "t = threading.Thread(target=u.enter, name='load-postcopy-1'); t.start(); t.join()\n"
            "print(json.dumps(u.metrics()))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                       cwd="/")
    assert r.returncode == 0, r.stderr
    m = r.stdout.strip().splitlines()[-1]
    assert "load-postcopy-1" in m and "refused" in m and "nice -5" in m, m


@pytest.mark.parametrize("name,value", [("urgent-thread-nice", 1), ("urgent-thread-nice", -21),
                                        ("urgent-thread-rt-priority", 100), ("urgent-thread-rt-priority", -1),
                                        ("urgent-thread-nice", "high")])
def test_out_of_range_values_named(name, value):
    with pytest.raises(ParameterError) as e:
        MigrationConfig().set_parameters({name: value})
    assert name in str(e.value) and str(value) in str(e.value)


def check(src, dst):
    assert src["status"] == "completed", src.get("error-desc")
    assert dst["status"] == "completed", dst.get("error-desc")
    assert src["digests"] == dst["digests"]


@pytest.mark.parametrize("page_size", [4096, 2 << 20])
def test_migration_with_urgent_priority_serves_requests(page_size):
    if os.geteuid() != 0:
        pytest.skip("SCHED_FIFO needs CAP_SYS_NICE")
    g = GuestConfig(size=64 << 20, page_size=page_size, fill="pattern", workload=WorkloadConfig(dirty_rate=8 << 20),
                    dest_workload=WorkloadConfig(threads=2, pattern="random", dirty_rate=4 << 20, batch=1))
    src, dst = run_local_migration("tcp:127.0.0.1:0", g, caps=PREEMPT, params={**SLOW, **URGENT}, timeout=120)
    check(src, dst)
    assert dst["postcopy-requests"] > 0
    assert src["channels"]["postcopy-1"]["normal"] + src["channels"]["postcopy-1"]["duplicate"] > 0
    assert src["urgent-threads"] == {"return-path": "nice -5, fifo 5"}
    assert dst["urgent-threads"] == {"load-postcopy-1": "nice -5, fifo 5"}
    # The request trace still joins both sides (engine/reqtrace.py).
    assert src["postcopy-request-trace"]["rows"] and dst["postcopy-request-trace"]["rows"]


@pytest.mark.skipif(U.unavailable_reason() is not None, reason=f"userfaultfd unavailable: {U.unavailable_reason()}")
def test_guest_process_fault_thread_gets_the_priority():
    if os.geteuid() != 0:
        pytest.skip("SCHED_FIFO needs CAP_SYS_NICE")
    from ferry_migrate.engine.guestlocal import GuestProcessConfig, run_guest_process_migration
    src, dst, chk = run_guest_process_migration(guest=GuestProcessConfig(size=32 << 20), caps=PREEMPT,
                                                params={"postcopy-after-percent": 5,
                                                        "max-postcopy-bandwidth": 16 << 20, **URGENT},
                                                timeout=180)
    check(src, dst)
    assert dst["postcopy-requests"] > 0 and dst["uffd-copies"] > 0
    assert dst["postcopy-faults"] == dst["uffd-kernel-faults"]
    assert "error" not in chk and chk["mismatches"] == 0, chk
    assert dst["urgent-threads"] == {"load-postcopy-1": "nice -5, fifo 5", "uffd-faults": "nice -5, fifo 5"}


DEST = ["--workload-threads", "1", "--workload-pattern", "random", "--dirty-rate", "2M"]
RECOVER_PARAMS = {"postcopy-after-percent": 10, "max-bandwidth": 32 << 20, "max-postcopy-bandwidth": 1 << 20,
                  **URGENT}


async def test_pause_and_recovery_with_urgent_priority(spawn):  # noqa: F811 - the fixture
    if os.geteuid() != 0:
        pytest.skip("SCHED_FIFO needs CAP_SYS_NICE")
    src, dst = spawn("source"), spawn("destination", DEST)
    async with ControlClient(src.control) as s, ControlClient(dst.control) as d:
        first = asyncio.ensure_future(run_migration(s, d, caps=PREEMPT, params=RECOVER_PARAMS, timeout=120))
        await _until(s, "postcopy-active")
        await _until(d, "postcopy-active")
        assert await s.call("migrate-pause") == {}
        out = await first
        assert out.paused and not out.completed
        out = await run_migration(s, d, resume=True, timeout=120)
        assert out.verified, (out.source.get("error-desc"), out.destination.get("error-desc"))
        assert out.source["postcopy-recoveries"] == out.destination["postcopy-recoveries"] == 1
        assert out.source["urgent-threads"] == {"return-path": "nice -5, fifo 5"}
        assert out.destination["urgent-threads"] == {"load-postcopy-1": "nice -5, fifo 5"}
        assert out.destination["postcopy-requests"] > 0


# --- postcopy-receiver=process (engine/urgent_receiver.py): a guest in its own process ---

UFFD_REASON = U.unavailable_reason()
needs_uffd = pytest.mark.skipif(UFFD_REASON is not None, reason=f"userfaultfd unavailable: {UFFD_REASON}")
PROC = {"urgent-pages-from": "return-path", "postcopy-receiver": "process"}


@needs_uffd
@pytest.mark.parametrize("page_size", [4096, 2 << 20])
def test_receiver_process_places_requested_pages(page_size):
    from ferry_migrate.engine.guestlocal import GuestProcessConfig, run_guest_process_migration
    src, dst, chk = run_guest_process_migration(
        guest=GuestProcessConfig(size=32 << 20, page_size=page_size), caps=PREEMPT,
        params={"postcopy-after-percent": 5, "max-postcopy-bandwidth": 16 << 20, **PROC}, timeout=180)
    check(src, dst)
    assert dst["postcopy-requests"] > 0
    assert dst["postcopy-faults"] == dst["uffd-kernel-faults"]
    assert dst["uffd-errors"] == [] and dst["uffd-fault-errors"] == []
    assert "error" not in chk and chk["mismatches"] == 0, chk
    info = dst["postcopy-receiver"]
    assert info["mode"] == "process"
    ch = info["channels"]["postcopy-1"]
    assert ch["pages-placed"] > 0 and ch["exit-status"] == 0
    assert dst["channels"]["postcopy-1"]["pages-placed"] == ch["pages-placed"]
    assert dst["channels"]["postcopy-1"]["bytes"] == src["channels"]["postcopy-1"]["bytes"]
    # The trace still has the placement of pages the process placed.
    rows = dst["postcopy-request-trace"]["rows"]
    placed = [r for r in rows if r[2 + 9] is not None]
    assert placed


def test_receiver_process_without_a_guest_process_falls_back_to_a_thread():
    g = GuestConfig(size=32 << 20, page_size=4096, fill="pattern", workload=None,
                    dest_workload=WorkloadConfig(threads=1, pattern="random", dirty_rate=4 << 20, batch=1))
    src, dst = run_local_migration("tcp:127.0.0.1:0", g, caps=PREEMPT,
                                   params={"postcopy-after-percent": 5, "max-postcopy-bandwidth": 16 << 20, **PROC},
                                   timeout=120)
    check(src, dst)
    assert dst["postcopy-receiver"]["mode"] == "thread"
    assert "guest in its own process" in dst["postcopy-receiver"]["why"]


@needs_uffd
@pytest.mark.parametrize("cut", ["pause", "kill-receiver"])
def test_receiver_process_through_pause_and_recovery(cut):
    """Pause after the switch (migrate-pause, or the receiver process killed: the migration
    pauses naming it), recover over new connections: a new receiver process takes the new
    POSTCOPY channel; digests equal at the end."""
    from ferry_migrate.engine import states as ST
    from ferry_migrate.engine.destination import MigrationDestination
    from ferry_migrate.engine.guestproc import GuestLink, GuestProcessWorkload, GuestSpec
    from ferry_migrate.engine.ram import GuestRAM
    from ferry_migrate.engine.source import MigrationSource
    from ferry_migrate.engine.uffd_dest import UffdBackend

    size = 32 << 20

    def cfg():
        c = MigrationConfig()
        c.set_capabilities(PREEMPT)
        c.set_parameters({"postcopy-after-percent": 5, "max-postcopy-bandwidth": 4 << 20, **PROC})
        return c

    link = GuestLink.spawn(GuestSpec(size, 4096, "memfd", role="destination",
                                     workload={"threads": 1, "pattern": "random", "dirty_rate": 2 << 20,
                                               "batch": 1}))
    backend = s = d = None
    try:
        d = MigrationDestination(link.ram, cfg(), workload=GuestProcessWorkload(link))
        backend = UffdBackend(d, link)
        s_ram = GuestRAM.create(size, 4096)
        assert [b.idstr for b in s_ram.blocks] == [b.idstr for b in link.ram.blocks]
        s_ram.fill("random")
        s = MigrationSource(s_ram, None, cfg())
        s.start(d.listen("tcp:127.0.0.1:0"))
        d.start()
        for m in (s, d):
            assert m.sm.wait_for(ST.POSTCOPY_ACTIVE, 60) == ST.POSTCOPY_ACTIVE, (m.status, m.stats.error)
        deadline = time.monotonic() + 60
        while d.query().get("postcopy-requests", 0) == 0:
            assert time.monotonic() < deadline, "no request before the pause"
            time.sleep(0.05)
        first_pid = d.stats.extra["postcopy-receiver"]["channels"]["postcopy-1"]["pid"]
        if cut == "pause":
            s.pause()
        else:
            os.kill(first_pid, signal.SIGKILL)
        for m in (s, d):
            assert m.sm.wait_for(ST.POSTCOPY_PAUSED, 60) == ST.POSTCOPY_PAUSED, (m.status, m.stats.error)
        if cut == "kill-receiver":
            assert f"receiver process pid {first_pid} ended" in d.stats.error, d.stats.error
        s.resume(d.recover("tcp:127.0.0.1:0"))
        assert s.wait(120) == "completed", (s.status, s.stats.error, d.status, d.stats.error)
        assert d.wait(60) == "completed", (d.status, d.stats.error)
        assert s.stats.digests and s.stats.digests == d.stats.digests
        q = d.query()
        assert q["postcopy-recoveries"] == 1
        ch = q["postcopy-receiver"]["channels"]["postcopy-1"]
        assert ch["pid"] != first_pid and ch["exit-status"] == 0
    finally:
        for m in (s, d):
            if m is not None:
                m.quit()
        if backend is not None:
            backend.close()
        link.close()
