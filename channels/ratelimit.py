"""A per-channel rate limiter (bytes per second, 0 = unlimited)."""
from __future__ import annotations

import threading
import time


class RateLimiter:
    """Token bucket: after sending n bytes, wait until the budget allows them.

    A short burst is allowed (``burst_s`` of the rate) so that the sender is not
    woken for every small write; the long-run average stays at ``rate``.
    """

    def __init__(self, rate: int = 0, burst_s: float = 0.01):
        self.rate = int(rate)
        self.burst_s = burst_s
        self._allowed_at = time.monotonic()
        self._wake = threading.Event()

    def set_rate(self, rate: int) -> None:
        self.rate = int(rate)
        self._allowed_at = time.monotonic()

    def consume(self, nbytes: int) -> float:
        """Account nbytes; sleep as needed. Returns seconds slept."""
        if self.rate <= 0 or nbytes <= 0:
            return 0.0
        now = time.monotonic()
        # Idle time does not build up an unlimited credit.
        self._allowed_at = max(self._allowed_at, now - self.burst_s) + nbytes / self.rate
        delay = self._allowed_at - now - self.burst_s
        if delay > 0:
            self._wake.wait(delay)
            return delay
        return 0.0

    def interrupt(self) -> None:
        """Wake a sleeping sender (used at shutdown)."""
        self._wake.set()
