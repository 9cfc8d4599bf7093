"""Process-level settings for Ferry's worker processes."""
from __future__ import annotations

import os
import sys

# A thread waiting for the GIL gets it after at most this long. Postcopy
# latency is a chain of wake-ups across threads (request sent, page read from
# a channel, faulting thread woken), each of which can wait this long behind
# a thread that is busy moving bulk pages: CPython's 5 ms default would add
# up to milliseconds per request.
SWITCH_INTERVAL = 0.0002


def configure_worker_process() -> None:
    """Call once at the start of a worker process.

    FERRY_GIL_SWITCH_INTERVAL (seconds) overrides the interval, for experiments.
    """
    sys.setswitchinterval(float(os.environ.get("FERRY_GIL_SWITCH_INTERVAL", SWITCH_INTERVAL)))
