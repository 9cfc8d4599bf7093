"""A per-channel rate limiter (bytes per second, 0 = unlimited) whose limit can change at any time."""
from __future__ import annotations

import threading
import time

# A sleeping sender re-reads its limit at least this often (QEMU's BUFFER_DELAY,
# migration/migration.h: the rate limit is applied per 100 ms window); a change
# through set_rate also wakes it at once.
RECHECK_S = 0.1


class RateLimiter:
    """Token bucket: after sending n bytes, wait until the budget allows them.

    A short burst is allowed (``burst_s`` of the rate) so that the sender is not
    woken for every small write; the long-run average stays at ``rate``.

    ``set_rate`` takes effect on a sender already asleep: the bytes it still
    owes are re-timed at the new rate (none at 0, unlimited), and it wakes to
    re-check. ``clock`` (seconds, monotonic) is for tests.
    """

    def __init__(self, rate: int = 0, burst_s: float = 0.01, clock=time.monotonic):
        self._clock = clock
        self._rate = int(rate)
        self.burst_s = burst_s
        self._allowed_at = clock()
        self._cond = threading.Condition()
        self._stopped = False

    @property
    def rate(self) -> int:
        """The limit in bytes/second; 0 = unlimited."""
        return self._rate

    @rate.setter
    def rate(self, rate: int) -> None:
        self.set_rate(rate)

    def set_rate(self, rate: int) -> None:
        """Change the limit now, also for a sender asleep in ``consume``."""
        with self._cond:
            now = self._clock()
            owed = max(0.0, self._allowed_at - now) * self._rate  # bytes sent ahead of the old budget
            self._rate = int(rate)
            self._allowed_at = now + owed / self._rate if self._rate > 0 else now
            self._cond.notify_all()

    def debt(self) -> float:
        """Seconds a sender has yet to wait for the bytes it sent (0 when within budget)."""
        with self._cond:
            return max(0.0, self._allowed_at - self._clock() - self.burst_s) if self._rate > 0 else 0.0

    def charge(self, nbytes: int) -> float:
        """Account ``nbytes`` without sleeping; returns the seconds to wait for them (sans-I/O part)."""
        with self._cond:
            if self._rate <= 0 or nbytes <= 0:
                return 0.0
            now = self._clock()
            # Idle time does not build up an unlimited credit.
            self._allowed_at = max(self._allowed_at, now - self.burst_s) + nbytes / self._rate
            return max(0.0, self._allowed_at - now - self.burst_s)

    def consume(self, nbytes: int) -> float:
        """Account nbytes; sleep as the current limit requires. Returns seconds slept."""
        if self.charge(nbytes) <= 0:
            return 0.0
        start = self._clock()
        with self._cond:
            while not self._stopped and self._rate > 0:
                delay = self._allowed_at - self._clock() - self.burst_s
                if delay <= 0:
                    break
                self._cond.wait(min(delay, RECHECK_S))
        return self._clock() - start

    def interrupt(self) -> None:
        """Wake a sleeping sender for good (used at shutdown)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
