"""A paused guest has really stopped writing: Workload.pause and Workload.may_write.

Senders that read guest RAM by reference (multifd sender threads, channels with page
checks) decide between a staging copy and the page itself with ``may_write``: it must
stay true while a guest thread is still inside the batch it was writing when pause()
began, and pause() must wait for the threads of a guest started again after stop().
Real guest threads over real guest RAM; the access hook (called before a batch's
writes) holds one thread inside its batch.
"""
from __future__ import annotations

import threading
import time

from ferry_migrate.engine.ram import GuestRAM
from ferry_migrate.engine.workload import Workload, WorkloadConfig

WAIT = 10.0


def _until(pred, timeout: float = WAIT) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


class _Hold:
    """Access hook that holds the next batch of a guest thread until released."""

    def __init__(self):
        self.armed = False
        self.inside = threading.Event()
        self.release = threading.Event()

    def __call__(self, blk, local):
        if self.armed:
            self.armed = False
            self.inside.set()
            self.release.wait(WAIT)

    def arm(self):
        self.inside.clear()
        self.release.clear()
        self.armed = True


def _workload():
    ram = GuestRAM.create(8 << 20, 4096)
    wl = Workload(ram, WorkloadConfig(threads=1, pattern="random", dirty_rate=0, batch=8))
    hold = _Hold()
    wl.access_hook = hold
    return wl, hold


def _pause_held(wl, hold) -> threading.Thread:
    """Start pause() while the guest thread is held inside a batch; returns the pausing thread."""
    hold.arm()
    assert hold.inside.wait(WAIT)
    t = threading.Thread(target=wl.pause, daemon=True)
    t.start()
    assert _until(lambda: not wl.running)  # pause() began: the guest no longer "runs"
    return t


def test_may_write_stays_true_until_the_last_batch_landed():
    wl, hold = _workload()
    wl.start()
    try:
        t = _pause_held(wl, hold)
        # The held thread writes its batch as soon as it is released: a sender must still copy.
        assert wl.may_write
        hold.release.set()
        t.join(WAIT)
        assert not t.is_alive()
        assert not wl.may_write and not wl.running
        wl.resume()
        assert wl.may_write
    finally:
        hold.release.set()
        wl.stop()
    assert not wl.may_write


def test_pause_waits_for_the_threads_of_a_guest_started_again_after_stop():
    wl, hold = _workload()
    wl.start()
    wl.stop()  # the guest left (migrated away) ...
    wl.start()  # ... and came back: new threads
    try:
        t = _pause_held(wl, hold)
        t.join(0.5)
        assert t.is_alive(), "pause() returned while a guest thread was still inside its batch"
        assert wl.may_write
        hold.release.set()
        t.join(WAIT)
        assert not t.is_alive()
        assert not wl.may_write
    finally:
        hold.release.set()
        wl.stop()
