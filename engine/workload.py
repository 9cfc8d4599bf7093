"""Guest workload: threads that keep touching guest RAM, so precopy must converge for real.

Each thread picks a batch of target pages by the pattern; it writes a stamp
into the written ones, then marks them in the guest's dirty log (write first,
then mark: a sync that runs in between only makes the page go out once more,
never lost), and reads the others.

Progress is sampled as guestperf does it: how long the guest takes to update
a GiB of memory (ms/GiB) over time, so a user sees the slowdown during
precopy, the pause at the switch and the postcopy faults.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from .ram import GuestRAM

PATTERNS = ("sequential", "random", "hotset", "zipf")
BATCH = 64  # target pages touched between rate-limit and pause checks
PROGRESS_INTERVAL = 0.1  # s between progress samples
GIB_PAGES = (1 << 30) // 4096


@dataclass
class WorkloadConfig:
    """How the guest dirties memory."""

    threads: int = 1
    pattern: str = "hotset"  # sequential | random | hotset | zipf
    # Target pages touched per second, in bytes (all threads together), 0 = as
    # fast as possible. With write_ratio 1 every touch dirties its page.
    dirty_rate: int = 32 << 20
    hot_fraction: float = 0.1  # hotset: share of pages that take hot_share of the accesses
    hot_share: float = 0.9
    zipf_a: float = 1.2  # zipf: exponent (> 1); larger is more skewed
    write_ratio: float = 1.0  # share of touches that write (the rest read)
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
        if not self.zipf_a > 1:
            raise ValueError(f"workload zipf-a {self.zipf_a}: must be > 1")
        if not 0 <= self.write_ratio <= 1:
            raise ValueError(f"workload write-ratio {self.write_ratio}: expected [0, 1]")


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
        n = max(1, self.config.threads)
        self._written = [0] * n
        self._touched = [0] * n
        self._iters = [0] * n
        self._sink = [0] * n  # what reads saw, so they are not optimised into nothing
        self._base = {"pages_written": 0, "iterations": 0}  # progress of the guest before it came here
        # Progress samples: wall-clock time and ms per GiB touched in the interval
        # before it (None: no progress at all, e.g. paused or blocked).
        self.progress_t: list[float] = []
        self.progress_ms_per_gib: list[float | None] = []
        self.marks: list[tuple[float, str]] = []  # (wall time, "pause" | "resume" | "start" | "stop")
        self._sampler: threading.Thread | None = None
        self._paused_count = 0
        # Cumulative page offsets over all blocks, for picking pages globally.
        self._starts = np.cumsum([0] + [b.npages for b in ram.blocks])

    @property
    def running(self) -> bool:
        return self._run.is_set()

    @property
    def may_write(self) -> bool:
        """True unless every guest thread is parked: a sender that reads guest RAM by
        reference must not trust ``running``, which pause() clears before the threads
        finished the batch they are writing."""
        with self._cond:
            return self._run.is_set() or self._paused_count < len(self._threads)

    def start(self) -> None:
        """Start (or start again, after stop()) the guest's threads."""
        if not self._threads:
            self._stop = False
        if self._threads or self.config.threads == 0:
            self._run.set()
            return
        self._run.set()
        self.marks.append((time.time(), "start"))
        self._sampler = threading.Thread(target=self._sample, name="guest-progress", daemon=True)
        self._sampler.start()
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
        self.marks.append((time.time(), "pause"))

    def resume(self) -> None:
        if not self._stop:
            self.marks.append((time.time(), "resume"))
            self._run.set()

    def stop(self) -> None:
        if not self._stop and self._threads:
            self.marks.append((time.time(), "stop"))
        self._stop = True
        self._run.set()  # wake paused threads so they see _stop
        for t in self._threads:
            t.join(5)
        with self._cond:
            self._threads.clear()
            self._paused_count = 0  # the next start()'s threads count afresh: pause() must wait for them
        self._run.clear()  # stopped: not running

    def progress(self) -> dict:
        """The progress series: wall-clock times, ms/GiB per interval, and pause/resume marks."""
        return {"interval": PROGRESS_INTERVAL, "t": list(self.progress_t),
                "ms_per_gib": list(self.progress_ms_per_gib),
                "marks": [list(m) for m in self.marks], "pages_touched": self.pages_touched}

    def _sample(self) -> None:
        last_t, last_n = time.time(), self.pages_touched
        while not self._stop:
            time.sleep(PROGRESS_INTERVAL)
            t, n = time.time(), self.pages_touched
            pages = n - last_n
            self.progress_t.append(round(t, 4))
            self.progress_ms_per_gib.append(round((t - last_t) * 1000 * GIB_PAGES / pages, 2) if pages else None)
            last_t, last_n = t, n

    @property
    def pages_written(self) -> int:
        return self._base["pages_written"] + sum(self._written)

    @property
    def pages_touched(self) -> int:
        return sum(self._touched)

    @property
    def iterations(self) -> int:
        return self._base["iterations"] + sum(self._iters)

    def state(self) -> dict:
        """The guest's non-RAM state: its progress counters."""
        return {"pages_written": self.pages_written, "iterations": self.iterations}

    def restore(self, state: dict) -> None:
        """Take over the progress counters of the guest that ran on the source."""
        self._base = {"pages_written": int(state.get("pages_written", 0)),
                      "iterations": int(state.get("iterations", 0))}

    def _pick(self, rng: np.random.Generator, cursor: int, total: int) -> np.ndarray:
        cfg = self.config
        n = cfg.batch
        if cfg.pattern == "sequential":
            return (np.arange(cursor, cursor + n) % total)
        if cfg.pattern == "random":
            return rng.integers(0, total, n)
        if cfg.pattern == "zipf":
            # Rank r is touched with probability ~ r^-a; ranks spread over memory.
            ranks = rng.zipf(cfg.zipf_a, n) - 1
            return (ranks * 2654435761) % total
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
            stamp += np.uint64(1)
            col = int(stamp) % 512  # one word per page, at a spot that moves: content really changes
            writes = None if cfg.write_ratio >= 1 else rng.random(len(pages)) < cfg.write_ratio
            bidx = np.searchsorted(self._starts, pages, side="right") - 1
            nwritten = 0
            for bi in np.unique(bidx):
                blk = self.ram.blocks[bi]
                sel = bidx == bi
                local = pages[sel] - self._starts[bi]
                if self.access_hook is not None:
                    self.access_hook(blk, local)
                if writes is not None:
                    w = writes[sel]
                    if (~w).any():
                        self._sink[tid] ^= int(np.bitwise_xor.reduce(blk.words[local[~w], col]))
                    local = local[w]
                blk.words[local, col] = stamp ^ local.astype(np.uint64)
                self.ram.mark_dirty(blk, local)
                nwritten += len(local)
            # Per-thread counters: no lost updates between threads.
            self._written[tid] += nwritten
            self._touched[tid] += len(pages)
            self._iters[tid] += 1
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
