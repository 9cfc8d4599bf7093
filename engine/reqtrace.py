"""The request trace: when each step of one postcopy page request happened.

A requested host page passes through eleven stages, four on the destination
before and after the source's, and two taken from the kernel:

===============  ===========  ===============================================
stage            side         taken when
===============  ===========  ===============================================
fault            destination  a guest thread found the page missing
request-written  destination  REQ_PAGES(_ID) about to be written to the return path
request-arrived  source       the kernel received it (SO_TIMESTAMPNS, engine/rxstamp.py)
request-read     source       the return-path thread decoded that message
queued           source       the page was queued (or claimed) for sending
send-start       source       its first record was handed to the channel writer
flushed          source       its last byte was handed to the socket (flush returned)
arrived          destination  the kernel received the last bytes read before the
                              run completing it was decoded (POSTCOPY channels)
decoded          destination  the run completing it was read and decoded
placed           destination  the host page was placed (memcpy or UFFDIO_COPY)
woken            destination  the waiting guest thread ran on (uffd: placed)
===============  ===========  ===============================================

The two kernel stages split a step into the link and the reading thread's
wake-up (scheduler and GIL): ``request-written>request-arrived`` is the
return path's link, ``request-arrived>request-read`` the source's
return-path thread waking; ``send-start>arrived`` the POSTCOPY channel's
link, ``arrived>decoded`` the destination's loader waking. They exist only
on plain TCP (not TLS, not Unix sockets); the undivided steps
``request-written>request-read`` and ``send-start>decoded`` are always given.

Every time is ``time.monotonic()`` in seconds. On Linux that is
CLOCK_MONOTONIC, one clock for every process of a host, so source and
destination times compare when both workers run on one host (as in the
benchmarks); across hosts they do not, and only the steps within one side
mean anything.

Each side keeps a :class:`RequestTrace` (bounded: the first MAX_REQUESTS
requests of a migration; a few floats per request, nothing per background
page, so it stays on). :func:`join` matches both sides' records by (block
index, first target page of the host page) and :func:`step_summary` gives
the median and p99 of each step.
"""
from __future__ import annotations

import threading
import time

import numpy as np

STAGES = ("fault", "request-written", "request-arrived", "request-read", "queued", "send-start", "flushed",
          "arrived", "decoded", "placed", "woken")
_INDEX = {s: i for i, s in enumerate(STAGES)}
# The causal chain: each stage happens after the one before it. "flushed" is
# aside: the destination may decode (even place) a page before the source's
# flush call returns.
CHAIN = ("fault", "request-written", "request-arrived", "request-read", "queued", "send-start", "arrived",
         "decoded", "placed", "woken")
# Steps reported: consecutive stages of the chain; the two steps the kernel stages
# split, whole (a request without those stages still has them); the source's own
# send; and the whole chain.
STEPS = tuple(f"{a}>{b}" for a, b in zip(CHAIN, CHAIN[1:])) + (
    "request-written>request-read", "send-start>decoded", "send-start>flushed", "fault>woken")
MAX_REQUESTS = 100_000  # per migration and side: at most ~8 MB


class RequestTrace:
    """Stage times of requested host pages on one side, keyed by (block, host page).

    ``mark`` keeps the first time a stage is seen for a key (a request asked
    twice keeps its first fault). Thread-safe.
    """

    def __init__(self, max_requests: int = MAX_REQUESTS):
        self.max_requests = max_requests
        self._rows: dict[tuple[int, int], list] = {}
        self._lock = threading.Lock()
        self.dropped = 0  # requests past max_requests, not traced

    def mark(self, block: int, host_page: int, stage: str, t: float | None = None) -> None:
        """Stage ``stage`` (one of STAGES) of the request for (block, host_page) at ``t`` (default: now)."""
        if t is None:
            t = time.monotonic()
        i = _INDEX[stage]
        key = (block, host_page)
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                if len(self._rows) >= self.max_requests:
                    self.dropped += 1
                    return
                row = self._rows[key] = [None] * len(STAGES)
            if row[i] is None:
                row[i] = t

    def has(self, block: int, host_page: int) -> bool:
        return (block, host_page) in self._rows

    def to_dict(self) -> dict:
        """{"stages": STAGES, "rows": [[block, host page, t per stage or None, ...], ...], "dropped": n}."""
        with self._lock:
            rows = [[b, hp, *r] for (b, hp), r in self._rows.items()]
        return {"stages": list(STAGES), "rows": rows, "dropped": self.dropped}


def join(*sides: dict) -> np.ndarray:
    """Both sides' ``to_dict()`` merged: an (n, len(STAGES)) float array, NaN where unknown.

    Rows are matched by (block, host page); a stage known on several sides
    keeps the first non-null time found.
    """
    merged: dict[tuple[int, int], np.ndarray] = {}
    for side in sides:
        if not side:
            continue
        # A stage this version does not know (another version's record) is left out.
        idx = [_INDEX.get(s) for s in side.get("stages", STAGES)]
        for row in side.get("rows", ()):
            key = (row[0], row[1])
            m = merged.get(key)
            if m is None:
                m = merged[key] = np.full(len(STAGES), np.nan)
            for i, v in zip(idx, row[2:]):
                if i is not None and v is not None and np.isnan(m[i]):
                    m[i] = v
    if not merged:
        return np.empty((0, len(STAGES)))
    return np.stack(list(merged.values()))


def step_summary(times: np.ndarray) -> dict:
    """Per step of STEPS: {"count", "p50", "p99", "max"} in microseconds over the rows that have both ends.

    "a>b" is the time from stage a to stage b of one request, p50 and p99 over requests.

    Rows are requests; a step is missing for a request that skipped it (e.g.
    a page already on its way is never queued) and then left out.
    """
    out = {}
    for step in STEPS:
        a, b = step.split(">")
        d = (times[:, _INDEX[b]] - times[:, _INDEX[a]]) * 1e6 if len(times) else np.empty(0)
        d = d[~np.isnan(d)]
        if len(d) == 0:
            out[step] = {"count": 0, "p50": None, "p99": None, "max": None}
            continue
        out[step] = {"count": int(len(d)), "p50": round(float(np.percentile(d, 50)), 1),
                     "p99": round(float(np.percentile(d, 99)), 1), "max": round(float(d.max()), 1)}
    return out
