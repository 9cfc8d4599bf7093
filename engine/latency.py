"""Latency recording: per-request times and a log2 histogram in microseconds.

Bucket N holds latencies in [2^N, 2^(N+1)) us, as QEMU 10.1 reports
postcopy request latencies. Requests are per host page, not per target
page, so a plain list of floats is cheap enough.
"""
from __future__ import annotations

import threading

import numpy as np

HIST_BUCKETS = 32


class LatencyRecorder:
    """Thread-safe collector of latencies (seconds in, microseconds out)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._samples: list[float] = []

    def add(self, seconds: float) -> None:
        with self._lock:
            self._samples.append(seconds)

    def __len__(self) -> int:
        return len(self._samples)

    def samples_us(self) -> np.ndarray:
        with self._lock:
            return np.asarray(self._samples, dtype=np.float64) * 1e6

    def summary(self) -> dict:
        """count, avg, p50, p90, p99, max (microseconds) and the log2 histogram."""
        us = self.samples_us()
        return summarize_us(us)


def summarize_us(us: np.ndarray) -> dict:
    if len(us) == 0:
        return {"count": 0, "avg": 0, "p50": 0, "p90": 0, "p99": 0, "max": 0, "histogram": [0] * HIST_BUCKETS}
    p50, p90, p99 = np.percentile(us, [50, 90, 99])
    return {
        "count": int(len(us)),
        "avg": round(float(us.mean()), 1),
        "p50": round(float(p50), 1),
        "p90": round(float(p90), 1),
        "p99": round(float(p99), 1),
        "max": round(float(us.max()), 1),
        "histogram": log2_histogram(us),
    }


def log2_histogram(us: np.ndarray) -> list[int]:
    """Counts per bucket N = [2^N, 2^(N+1)) us; below 1 us goes to bucket 0."""
    b = np.floor(np.log2(np.maximum(us, 1.0))).astype(np.int64)
    b = np.minimum(b, HIST_BUCKETS - 1)
    return np.bincount(b, minlength=HIST_BUCKETS).tolist()
