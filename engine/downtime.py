"""Precopy's stop decision as a pure function: what the stop-and-copy will cost, and whether it fits.

QEMU (migration_iteration_run / migration_update_counters in
migration/migration.c) stops the guest once the bytes still to send fit
``bandwidth * downtime-limit``. With multifd the stop also pays for work
that does not scale with bytes: a sync round over every channel at the pause
and another before the channels' FIN (a wake-up and a packet per channel on
each side, engine/multifd_send.py). That cost is measured at every pass end
(MultifdSender.sync_round) and counted here as a fixed part of the downtime:
a pass still ends (the dirty log is synced) when the bytes alone fit, but the
guest stops only when the bytes *and* the fixed part fit the limit, and
``expected-downtime`` reports both (docs/performance.md, "Multifd").
"""
from __future__ import annotations


def stop_estimate(remaining: int, bandwidth: float, limit: float, fixed: float = 0.0) -> tuple[float | None, bool]:
    """(expected downtime in s, whether to stop now) for a precopy pass end.

    ``remaining``: bytes still to send once the guest is paused (dirty pages
    and pages queued but not sent); ``bandwidth``: the measured rate, bytes/s
    (0 while unknown); ``limit``: downtime-limit in s; ``fixed``: s the stop
    costs beyond its bytes (multifd sync rounds, >= 0).

    The expected downtime is ``remaining / bandwidth + fixed`` (None while
    the bandwidth is unknown and bytes are left; ``fixed`` when nothing is
    left). The stop fits when ``remaining <= bandwidth *
    (limit - fixed)``: with an unknown bandwidth only when nothing is left
    and the fixed part fits, and never when the fixed part alone is over the
    limit (the expected downtime then says by how much).
    """
    if fixed < 0:
        raise ValueError(f"fixed downtime {fixed} s: must be >= 0")
    budget = limit - fixed
    fits = budget >= 0 and remaining <= bandwidth * budget
    if bandwidth <= 0:
        return (fixed if remaining <= 0 else None), fits
    return remaining / bandwidth + fixed, fits
