"""Guest workload: threads that keep writing to guest RAM, so precopy must converge for real.

Each thread writes a stamp into a batch of target pages chosen by the pattern,
then marks them in the guest's dirty log (write first, then mark: a sync that
runs in between only makes the page go out once more, never lost).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from .ram import GuestRAM

PATTERNS = ("sequential", "random", "hotset")
BATCH = 64  # target pages written between rate-limit and pause checks


@dataclass
class WorkloadConfig:
    """How the guest dirties memory."""

    threads: int = 1
    pattern: str = "hotset"  # sequential | random | hotset
    dirty_rate: int = 32 << 20  # bytes of target pages dirtied per second, 0 = as fast as possible
    hot_fraction: float = 0.1  # hotset: share of pages that take hot_share of the writes
    hot_share: float = 0.9
    seed: int = 1
    batch: int = BATCH  # pages touched per iteration (1: one access at a time, like a vCPU fault)

    def validate(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"workload pattern {self.pattern!r}: expected one of {', '.join(PATTERNS)}")
        if not 0 <= self.threads <= 64:
            raise ValueError(f"workload threads {self.threads}: expected 0..64")
        if self.dirty_rate < 0:
            raise ValueError(f"workload dirty-rate {self.dirty_rate}: must be >= 0")
        if not 0 < self.hot_fraction <= 1:
            raise ValueError(f"workload hot-fraction {self.hot_fraction}: expected (0, 1]")
        if not 0 <= self.hot_share <= 1:
            raise ValueError(f"workload hot-share {self.hot_share}: expected [0, 1]")
        if not 1 <= self.batch <= 4096:
            raise ValueError(f"workload batch {self.batch}: expected 1..4096 pages")


class Workload:
    """Writer threads over a GuestRAM, with pause (guest stop) and resume."""

    def __init__(self, ram: GuestRAM, config: WorkloadConfig | None = None):
        self.ram = ram
        self.config = config or WorkloadConfig()
        self.config.validate()
        self._threads: list[threading.Thread] = []
        self._run = threading.Event()  # set while the guest runs
        self._stop = False
        self._parked = threading.Semaphore(0)
        self._cond = threading.Condition()
        # Called with (block, target pages) before the guest touches them; on a
        # postcopy destination it blocks until they are received (demand paging).
        self.access_hook = None
        self.pages_written = 0  # guest progress counter (part of the guest state)
        self.iterations = 0
        self._paused_count = 0
        # Cumulative page offsets over all blocks, for picking pages globally.
        self._starts = np.cumsum([0] + [b.npages for b in ram.blocks])

    @property
    def running(self) -> bool:
        return self._run.is_set()

    def start(self) -> None:
        if self._threads or self.config.threads == 0:
            self._run.set()
            return
        self._run.set()
        for i in range(self.config.threads):
            t = threading.Thread(target=self._loop, args=(i,), name=f"guest-vcpu{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def pause(self, timeout: float = 10.0) -> None:
        """Stop the guest: returns once no thread is between a write and its dirty mark."""
        with self._cond:
            if not self._run.is_set():
                return
            self._run.clear()
            deadline = time.monotonic() + timeout
            while self._paused_count < len(self._threads):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("guest workload did not pause")
                self._cond.wait(left)

    def resume(self) -> None:
        if not self._stop:
            self._run.set()

    def stop(self) -> None:
        self._stop = True
        self._run.set()
        for t in self._threads:
            t.join(5)
        self._threads.clear()

    def state(self) -> dict:
        """The guest's non-RAM state: its progress counters."""
        return {"pages_written": self.pages_written, "iterations": self.iterations}

    def restore(self, state: dict) -> None:
        """Take over the progress counters of the guest that ran on the source."""
        self.pages_written = int(state.get("pages_written", 0))
        self.iterations = int(state.get("iterations", 0))

    def _pick(self, rng: np.random.Generator, cursor: int, total: int) -> np.ndarray:
        cfg = self.config
        n = cfg.batch
        if cfg.pattern == "sequential":
            return (np.arange(cursor, cursor + n) % total)
        if cfg.pattern == "random":
            return rng.integers(0, total, n)
        hot = max(1, int(total * cfg.hot_fraction))
        nhot = rng.binomial(n, cfg.hot_share)
        return np.concatenate([rng.integers(0, hot, nhot), rng.integers(0, total, n - nhot)])

    def _loop(self, tid: int) -> None:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed * 1000 + tid)
        total = int(self._starts[-1])
        cursor = (total // max(1, cfg.threads)) * tid
        rate_pages = cfg.dirty_rate / 4096 / max(1, cfg.threads)
        next_t = time.monotonic()
        stamp = np.uint64(tid + 1) << np.uint64(56)
        while not self._stop:
            if not self._run.is_set():
                with self._cond:
                    self._paused_count += 1
                    self._cond.notify_all()
                self._run.wait()
                with self._cond:
                    self._paused_count -= 1
                next_t = time.monotonic()
                continue
            pages = self._pick(rng, cursor, total)
            cursor = (cursor + cfg.batch) % total
            self.iterations += 1
            stamp += np.uint64(1)
            bidx = np.searchsorted(self._starts, pages, side="right") - 1
            for bi in np.unique(bidx):
                blk = self.ram.blocks[bi]
                local = pages[bidx == bi] - self._starts[bi]
                # One word per page, at a spot that moves, so content really changes.
                col = int(stamp) % 512
                if self.access_hook is not None:
                    self.access_hook(blk, local)
                blk.words[local, col] = stamp ^ local.astype(np.uint64)
                self.ram.mark_dirty(blk, local)
            self.pages_written += cfg.batch
            if rate_pages > 0:
                next_t += cfg.batch / rate_pages
                delay = next_t - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -0.5:
                    next_t = time.monotonic()  # do not catch up after a stall
        with self._cond:
            self._paused_count += 1
            self._cond.notify_all()
