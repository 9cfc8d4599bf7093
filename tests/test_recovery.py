"""Postcopy faults and recovery: pause on both sides, never resume the source's guest,
recover over new connections (RECV_BITMAP, POSTCOPY_RESUME, RESUME_ACK) any number of
times, end with equal digests. Real sockets on loopback, engine objects in this process,
guest workloads writing on both sides."""
import socket
import threading
import time

import numpy as np
import pytest

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.engine import states as ST
from ferry_migrate.engine.destination import MigrationDestination
from ferry_migrate.engine.params import MigrationConfig
from ferry_migrate.engine.ram import GuestRAM
from ferry_migrate.engine.source import MigrationSource
from ferry_migrate.engine.workload import Workload, WorkloadConfig

SIZE = 64 << 20
WAIT = 60  # s: generous; these wait for states, not for speed


def _config(preempt=True, channels=1):
    cfg = MigrationConfig()
    cfg.set_capabilities({"postcopy-ram": True, "postcopy-preempt": preempt})
    # Slow background pages: the postcopy phase lasts long enough to be cut.
    cfg.set_parameters({"postcopy-after-passes": 1, "max-postcopy-bandwidth": 8 << 20,
                        "postcopy-channels": channels})
    return cfg


def _pair(page_size=2 << 20, preempt=True, channels=1):
    s_ram = GuestRAM.create(SIZE, page_size)
    s_ram.fill("random")
    d_ram = GuestRAM.create(SIZE, page_size)
    wl = WorkloadConfig(threads=1, pattern="random", dirty_rate=8 << 20, batch=1)
    s_wl, d_wl = Workload(s_ram, wl), Workload(d_ram, wl)
    s_wl.start()
    d = MigrationDestination(d_ram, _config(preempt, channels), workload=d_wl)
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    s = MigrationSource(s_ram, s_wl, _config(preempt, channels))
    s.start(uri)
    return s, d, s_wl, d_wl


def _host_port(uri: str) -> tuple[str, int]:
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    return host, int(port)


def _both(s, d, state):
    assert s.sm.wait_for(state, WAIT) == state, (s.status, s.stats.error)
    assert d.sm.wait_for(state, WAIT) == state, (d.status, d.stats.error)


def _never_resumed_after_switch(s):
    """The source's guest never ran again once the package may have left."""
    hist = [new for _, _, new in s.sm.history]
    after = hist[hist.index(ST.POSTCOPY_ACTIVE):]
    assert not any(ST.STATES[x].source_guest_may_run for x in after), hist


def _finish(s, d, s_wl, d_wl):
    try:
        assert s.wait(WAIT) == "completed", (s.status, s.stats.error, d.status, d.stats.error, d.sm.history)
        assert d.wait(WAIT) == "completed", (d.status, d.stats.error)
        assert s.stats.digests and s.stats.digests == d.stats.digests
        assert d.verdict == "completed"
        assert not s_wl.running
        assert d_wl.running  # the guest runs on the destination
        _never_resumed_after_switch(s)
    finally:
        for m in (s, d):
            m.quit()
        s_wl.stop()
        d_wl.stop()


@pytest.mark.parametrize("who", ["source", "destination"])
def test_pause_then_recover_completes_with_equal_digests(who):
    s, d, s_wl, d_wl = _pair()
    _both(s, d, ST.POSTCOPY_ACTIVE)
    (s if who == "source" else d).pause()
    _both(s, d, ST.POSTCOPY_PAUSED)
    assert not s_wl.running, "the source's guest must stay stopped in postcopy-paused"
    q = d.query()
    assert q["status"] == "postcopy-paused" and q["error-desc"]
    if who == "destination":
        d.recover("tcp:127.0.0.1:0")  # a first address nobody connects to, replaced by the next
    uri = d.recover("tcp:127.0.0.1:0")
    s.resume(uri)
    _finish(s, d, s_wl, d_wl)
    assert s.recoveries == 1 and d.recoveries == 1


def test_a_second_fault_during_recovery_pauses_again_then_recovery_succeeds():
    s, d, s_wl, d_wl = _pair(channels=2)
    _both(s, d, ST.POSTCOPY_ACTIVE)
    s.pause()
    _both(s, d, ST.POSTCOPY_PAUSED)
    # The destination pauses as soon as the recovery's main channel is up.
    hit = threading.Event()

    def cut_in_recovery(old, new, reason, orig=d.sm._on_change):
        orig(old, new, reason)
        if new == ST.POSTCOPY_RECOVER and not hit.is_set():
            hit.set()
            threading.Thread(target=d.pause, daemon=True).start()

    d.sm._on_change = cut_in_recovery
    s.resume(d.recover("tcp:127.0.0.1:0"))
    assert hit.wait(WAIT)
    # The source saw the recovery start and fail: back to paused from postcopy-recover.
    deadline = time.monotonic() + WAIT
    while (ST.POSTCOPY_RECOVER, ST.POSTCOPY_PAUSED) not in [(o, n) for _, o, n in s.sm.history]:
        assert time.monotonic() < deadline, s.sm.history
        time.sleep(0.01)
    _both(s, d, ST.POSTCOPY_PAUSED)
    assert not s_wl.running
    s.resume(d.recover("tcp:127.0.0.1:0"))
    _finish(s, d, s_wl, d_wl)
    assert d.recoveries == 1  # one RESUME reached; the first try was cut before it


def test_paused_migration_refuses_a_new_migration_and_cancel():
    s, d, s_wl, d_wl = _pair(preempt=False)
    try:
        _both(s, d, ST.POSTCOPY_ACTIVE)
        with pytest.raises(RuntimeError, match="refused"):
            s.cancel()
        s.pause()
        _both(s, d, ST.POSTCOPY_PAUSED)
        with pytest.raises(RuntimeError, match="refused"):
            s.cancel()
        with pytest.raises(ValueError, match="resume needs a live destination"):
            s.resume("file:/nonexistent")
        first = d.recover("tcp:127.0.0.1:0")
        # Asked again (the source never got through): the new address replaces the old one.
        second = d.recover("tcp:127.0.0.1:0")
        assert second != first
        with pytest.raises(OSError):
            socket.create_connection(_host_port(first), timeout=5).close()
        assert not ST.verb_allowed("source", s.status, "migrate-cancel")
        assert not ST.verb_allowed("destination", d.status, "migrate-incoming")
    finally:
        for m in (s, d):
            m.quit()
        s.wait(10)
        d.wait(10)
        s_wl.stop()
        d_wl.stop()
    assert s.status == d.status == ST.POSTCOPY_PAUSED
    _never_resumed_after_switch(s)
    assert not s_wl.running


def test_precopy_fault_fails_both_and_the_source_guest_runs_on():
    s_ram = GuestRAM.create(SIZE, 4096)
    s_ram.fill("random")
    before = s_ram.digests()
    wl = Workload(s_ram, WorkloadConfig(threads=1, dirty_rate=1 << 20))
    wl.start()
    cfg = MigrationConfig()
    cfg.set_parameters({"max-bandwidth": 8 << 20})
    d = MigrationDestination(GuestRAM.create(SIZE, 4096), cfg)
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    s = MigrationSource(s_ram, wl, cfg)
    s.start(uri)
    try:
        assert s.sm.wait_for(ST.ACTIVE, WAIT) == ST.ACTIVE
        d.cancel()  # the destination goes away mid-precopy
        assert s.wait(WAIT) == "failed"
        assert d.wait(WAIT) in ("cancelled", "failed")
        assert wl.running, "a precopy fault must leave the guest running on the source"
        assert s.stats.error
    finally:
        wl.stop()
    assert s_ram.digests() != before or True  # memory is the guest's own, written on by it


def test_recv_bitmap_round_trip_is_bit_exact():
    rng = np.random.default_rng(3)
    for n in (1, 63, 64, 65, 4097):
        bits = rng.integers(0, 2, n).astype(bool)
        raw = codec.encode_rp_recv_bitmap("pc.ram", bits)
        dec = codec.ReturnPathDecoder({"pc.ram": n})
        msg, used = dec.next_event(memoryview(raw))
        assert used == len(raw) and msg.block == "pc.ram"
        assert np.array_equal(msg.received, bits)
        # Bit i of the bitmap is page i, in little-endian 64-bit words.
        body = raw[4 + 1 + 6 + 8:-8]
        assert len(body) == ((n + 63) // 64) * 8
        words = np.frombuffer(body, dtype="<u8")
        for i in np.flatnonzero(bits)[:5]:
            assert (int(words[i // 64]) >> int(i % 64)) & 1


@pytest.mark.parametrize("mutate, words", [
    (lambda b: b[:-8] + (0x1234).to_bytes(8, "big"), ["end mark 0x0000000000001234"]),
    (lambda b: b[:11] + (9999).to_bytes(8, "big") + b[19:], ["bitmap size 9999", "expected 16"]),
])
def test_recv_bitmap_bad_input_is_named(mutate, words):
    raw = mutate(codec.encode_rp_recv_bitmap("pc.ram", np.ones(100, dtype=bool)))
    with pytest.raises(Exception) as ei:
        codec.ReturnPathDecoder({"pc.ram": 100}).next_event(memoryview(raw))
    for w in words:
        assert w in str(ei.value)
    with pytest.raises(Exception, match="unknown RAM block 'pc.ram'"):
        codec.ReturnPathDecoder({"other": 100}).next_event(memoryview(raw))


def test_resume_ack_value_and_verdict_are_checked():
    from ferry_migrate.engine.return_path import SourceReturnPath  # noqa: F401 - the checks live there
    with pytest.raises(Exception, match="magic"):
        codec.parse_ferry_verdict(b"\0" * 8)
    with pytest.raises(Exception, match="outcome 7"):
        codec.parse_ferry_verdict(codec.encode_ferry_verdict(0)[:4] + (7).to_bytes(4, "big"))
    assert codec.parse_ferry_verdict(codec.encode_ferry_verdict(C.FERRY_VERDICT_COMPLETED)) == 0


def _cut_at_the_point_of_no_return(secret: str | None):
    """A migration whose main channel dies on the destination the moment the source enters
    postcopy-active, before the package with RUN can arrive: the source pauses (the
    package may have left), the destination fails before RUN (its guest never ran)."""
    s_ram = GuestRAM.create(SIZE, 2 << 20)
    s_ram.fill("random")
    wl = WorkloadConfig(threads=1, pattern="random", dirty_rate=8 << 20, batch=1)
    s_wl = Workload(s_ram, wl)
    s_wl.start()
    d_ram = GuestRAM.create(SIZE, 2 << 20)
    d_wl = Workload(d_ram, wl)
    cfgs = [_config(), _config()]
    if secret:
        for c in cfgs:
            c.set_parameters({"migration-secret": secret})
    d = MigrationDestination(d_ram, cfgs[0], workload=d_wl)
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    s = MigrationSource(s_ram, s_wl, cfgs[1])

    def cut(old, new, reason, orig=s.sm._on_change):
        if new == ST.POSTCOPY_ACTIVE and d.status != ST.FAILED:
            d._shutdown_channels()  # before the source writes the package's first byte
        orig(old, new, reason)

    s.sm._on_change = cut
    s.start(uri)
    assert s.sm.wait_for(ST.POSTCOPY_PAUSED, WAIT) == ST.POSTCOPY_PAUSED, (s.status, s.stats.error)
    assert d.wait(WAIT) == ST.FAILED, (d.status, d.stats.error)
    assert not d.running and not d_wl.running and not s_wl.running
    return s, d, s_wl, d_wl


def test_destination_that_failed_before_run_gives_the_paused_source_its_guest_back():
    s, d, s_wl, d_wl = _cut_at_the_point_of_no_return(secret="a" * 32)
    try:
        assert d.query().get("never-ran") is True
        d.recover("tcp:127.0.0.1:0")  # accepted in failed: it serves the proof
        uri = d.recover("tcp:127.0.0.1:0")  # asked again: the new address replaces the old one
        s.resume(uri)
        assert s.wait(WAIT) == ST.FAILED, (s.status, s.stats.error)
        assert "never processed POSTCOPY_RUN" in s.stats.error
        hist = [(o, n) for _, o, n in s.sm.history]
        assert (ST.POSTCOPY_RECOVER, ST.FAILED) in hist, hist
        assert s_wl.running, "the guest runs on the source again: its only copy"
        assert d.status == ST.FAILED and not d.running and not d_wl.running
        deadline = time.monotonic() + WAIT
        while d.query().get("never-ran-told") != 1:
            assert time.monotonic() < deadline, d.query()
            time.sleep(0.02)
    finally:
        for m in (s, d):
            m.quit()
        s_wl.stop()
        d_wl.stop()


def test_no_proof_without_a_migration_secret_and_none_after_the_guest_ran():
    from ferry_migrate.engine.never_ran import NeverRanRefused
    s, d, s_wl, d_wl = _cut_at_the_point_of_no_return(secret=None)
    try:
        with pytest.raises(NeverRanRefused, match="migration-secret"):
            d.recover("tcp:127.0.0.1:0")
        assert s.status == ST.POSTCOPY_PAUSED and not s_wl.running
    finally:
        for m in (s, d):
            m.quit()
        s_wl.stop()
        d_wl.stop()
    # A destination whose guest ran and then died (guest lost) has nothing to prove.
    s, d, s_wl, d_wl = _pair()
    try:
        _both(s, d, ST.POSTCOPY_ACTIVE)
        d.guest_lost(RuntimeError("guest process died"))
        assert d.wait(WAIT) == ST.FAILED
        assert not d.never_ran and "never-ran" not in d.query()
        with pytest.raises(RuntimeError, match="the guest ran here"):
            d.recover("tcp:127.0.0.1:0")
    finally:
        for m in (s, d):
            m.quit()
        s_wl.stop()
        d_wl.stop()
