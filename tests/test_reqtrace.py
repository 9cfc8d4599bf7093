"""The request trace (engine/reqtrace.py): marks, the join of both sides, step figures;
and end to end, the trace of a postcopy migration with preemption on both workers."""
import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ferry_migrate.engine.local import GuestConfig, run_local_migration
from ferry_migrate.engine.reqtrace import CHAIN, STAGES, STEPS, RequestTrace, join, step_summary
from ferry_migrate.engine.workload import WorkloadConfig


def test_mark_keeps_the_first_time_of_a_stage():
    t = RequestTrace()
    t.mark(0, 512, "fault", 1.0)
    t.mark(0, 512, "fault", 2.0)  # asked again: the first fault counts
    t.mark(0, 512, "placed", 3.0)
    rows = t.to_dict()["rows"]
    assert rows == [[0, 512, 1.0] + [None] * 8 + [3.0, None]]
    assert STAGES.index("placed") == 9


def test_bounded_past_max_requests():
    t = RequestTrace(max_requests=2)
    for hp in range(5):
        t.mark(0, hp, "fault", float(hp))
    t.mark(0, 1, "placed", 9.0)  # a traced request still gets its later stages
    d = t.to_dict()
    assert len(d["rows"]) == 2 and d["dropped"] == 3
    assert d["rows"][1][2 + STAGES.index("placed")] == 9.0


def test_join_matches_both_sides_by_block_and_host_page():
    dst, src = RequestTrace(), RequestTrace()
    base = {s: float(i) for i, s in enumerate(STAGES)}
    for stage in ("fault", "request-written", "arrived", "decoded", "placed", "woken"):
        dst.mark(1, 1024, stage, base[stage])
    for stage in ("request-arrived", "request-read", "queued", "send-start", "flushed"):
        src.mark(1, 1024, stage, base[stage])
    src.mark(1, 2048, "request-read", 5.0)  # never seen by this destination: a row with gaps
    times = join(dst.to_dict(), src.to_dict())
    assert times.shape == (2, len(STAGES))
    full = times[~np.isnan(times).any(axis=1)]
    assert full.tolist() == [[base[s] for s in STAGES]]
    steps = step_summary(times)
    assert set(steps) == set(STEPS)
    assert steps["fault>request-written"]["p50"] == 1e6  # 1 s apart, in us
    assert steps["send-start>decoded"]["p50"] == 3e6  # "flushed" is aside of the chain
    assert steps["send-start>arrived"]["p50"] == 2e6 and steps["arrived>decoded"]["p50"] == 1e6
    assert steps["request-written>request-read"]["p50"] == 2e6
    assert steps["send-start>flushed"]["p50"] == 1e6
    assert steps["fault>woken"]["p50"] == 10e6
    assert all(v["count"] == 1 for v in steps.values())


def test_step_summary_of_nothing():
    s = step_summary(join({}, None))
    assert all(v["count"] == 0 and v["p99"] is None for v in s.values())


@given(st.lists(st.floats(min_value=0, max_value=1.0, allow_nan=False), min_size=1, max_size=50))
def test_step_percentiles_are_in_range(gaps):
    t = RequestTrace()
    for i, g in enumerate(gaps):
        t.mark(0, i, "send-start", 10.0)
        t.mark(0, i, "decoded", 10.0 + g)
    s = step_summary(join(t.to_dict()))["send-start>decoded"]
    assert s["count"] == len(gaps)
    lo, hi = min(gaps) * 1e6, max(gaps) * 1e6
    assert lo - 1 <= s["p50"] <= s["p99"] <= s["max"] <= hi + 1


def test_trace_of_a_preempt_migration_has_every_step():
    guest = GuestConfig(size=64 << 20, page_size=4096, fill="pattern", workload=None,
                        dest_workload=WorkloadConfig(threads=1, pattern="random", dirty_rate=4 << 20, batch=1))
    src, dst = run_local_migration("tcp:127.0.0.1:0", guest, caps={"postcopy-ram": True, "postcopy-preempt": True},
                                   params={"postcopy-after-percent": 5, "max-postcopy-bandwidth": 16 << 20,
                                           "urgent-pages-from": "return-path"}, timeout=120)
    assert src["status"] == dst["status"] == "completed"
    assert dst["postcopy-requests"] > 0
    times = join(src["postcopy-request-trace"], dst["postcopy-request-trace"])
    assert len(times) == dst["postcopy-requests"]
    whole = times[~np.isnan(times).any(axis=1)]
    assert len(whole) > 0  # at least one request went through every stage
    # One host's CLOCK_MONOTONIC: every stage of the chain comes after the one before.
    chain = whole[:, [STAGES.index(s) for s in CHAIN]]
    assert (np.diff(chain, axis=1) >= 0).all()
    steps = step_summary(times)
    assert all(steps[s]["count"] > 0 and not math.isnan(steps[s]["p99"]) for s in STEPS)
    # TCP: the kernel's receive times split the two link steps (engine/rxstamp.py).
    assert steps["request-written>request-arrived"]["count"] > 0 and steps["send-start>arrived"]["count"] > 0


def test_trace_of_migration_thread_sends_is_causal():
    guest = GuestConfig(size=64 << 20, page_size=4096, fill="pattern", workload=None,
                        dest_workload=WorkloadConfig(threads=1, pattern="random", dirty_rate=4 << 20, batch=1))
    src, dst = run_local_migration("tcp:127.0.0.1:0", guest, caps={"postcopy-ram": True, "postcopy-preempt": True},
                                   params={"postcopy-after-percent": 5, "max-postcopy-bandwidth": 16 << 20},
                                   timeout=120)
    assert src["status"] == dst["status"] == "completed"
    times = join(src["postcopy-request-trace"], dst["postcopy-request-trace"])
    whole = times[~np.isnan(times).any(axis=1)]
    assert len(whole) > 0
    chain = whole[:, [STAGES.index(s) for s in CHAIN]]
    bad = np.argwhere(np.diff(chain, axis=1) < 0)
    assert len(bad) == 0, [f"{CHAIN[j]}>{CHAIN[j + 1]}" for _, j in bad[:5]]
