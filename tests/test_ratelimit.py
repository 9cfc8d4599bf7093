"""The rate limiter: its budget arithmetic (with a test clock) and a sender asleep in it
that a new limit wakes (real threads)."""
from __future__ import annotations

import threading

import pytest

from ferry_migrate.channels.ratelimit import RECHECK_S, RateLimiter

JOIN = 30.0  # s: far beyond any wake-up, far below the debts these tests create


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_charge_and_retiming_a_debt_at_a_new_rate():
    clock = Clock()
    rl = RateLimiter(1000, burst_s=0.0, clock=clock)
    assert rl.charge(1000) == pytest.approx(1.0)
    clock.t += 0.25
    assert rl.debt() == pytest.approx(0.75)          # 750 bytes still owed
    rl.set_rate(500)
    assert rl.debt() == pytest.approx(1.5)           # the same 750 bytes, at half the rate
    rl.set_rate(3000)
    assert rl.debt() == pytest.approx(0.25)
    rl.set_rate(0)
    assert rl.debt() == 0.0 and rl.charge(10 << 20) == 0.0   # unlimited owes nothing
    rl.set_rate(1000)
    assert rl.debt() == 0.0                          # and leaves no debt behind


def test_idle_time_gives_no_more_than_the_burst():
    clock = Clock()
    rl = RateLimiter(1000, burst_s=0.01, clock=clock)
    clock.t += 60
    assert rl.charge(1000) == pytest.approx(1.0 - 2 * 0.01)  # the burst of credit, and the burst it may run ahead


def _sleeper(rl: RateLimiter, nbytes: int) -> threading.Thread:
    t = threading.Thread(target=rl.consume, args=(nbytes,), daemon=True)
    t.start()
    while rl.debt() <= 0:
        t.join(0.001)
    return t


@pytest.mark.parametrize("new_rate", [0, 1 << 40])
def test_a_new_limit_wakes_a_sleeping_sender(new_rate):
    """1 MiB at 1 KiB/s owes 1024 s; lifting or raising the limit ends the sleep at once."""
    rl = RateLimiter(1024)
    t = _sleeper(rl, 1 << 20)
    assert t.is_alive()
    rl.set_rate(new_rate)
    t.join(JOIN)
    assert not t.is_alive()


def test_a_sleeping_sender_rechecks_even_without_a_wakeup():
    """A limit changed behind the condition's back (attribute poke) is seen within RECHECK_S."""
    assert RECHECK_S <= 0.1  # QEMU re-reads its limit every 100 ms
    rl = RateLimiter(1024)
    t = _sleeper(rl, 1 << 20)
    with rl._cond:
        rl._rate = 0  # no notify
    t.join(JOIN)
    assert not t.is_alive()


def test_interrupt_wakes_and_stops_limiting():
    rl = RateLimiter(1024)
    t = _sleeper(rl, 1 << 20)
    rl.interrupt()
    t.join(JOIN)
    assert not t.is_alive()
    t = threading.Thread(target=rl.consume, args=(1 << 30,), daemon=True)
    t.start()
    t.join(JOIN)
    assert not t.is_alive()  # later sends do not sleep either
