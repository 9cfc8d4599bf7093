"""CPU priority of the urgent path's threads (postcopy page requests).

A requested page's time is mostly threads waking up: the source's
return-path thread reading the request (and, with urgent-pages-from
return-path, sending the page), the destination's POSTCOPY channel loaders
placing it, and the destination's userfaultfd fault thread turning a kernel
fault into a request. On a busy host each wake-up waits for a CPU behind
whatever else runs there (docs/performance.md, "The request trace").

Two parameters, both off by default (the threads then keep the worker's
scheduling, exactly as before):

``urgent-thread-nice``
    nice value (-20..0) of those threads: the kernel's fair scheduler gives
    them a larger share and prefers them when they wake.
``urgent-thread-rt-priority``
    SCHED_FIFO priority (1..99) of those threads: they run the moment they
    wake, ahead of every normal thread of the host. They block between
    requests; the kernel's real-time throttling (sched_rt_runtime_us) still
    bounds them if one did not.

Nice values are per thread on Linux (setpriority on a thread id), as is the
scheduling policy (sched_setscheduler on a thread id). Lowering a nice value
or taking SCHED_FIFO needs CAP_SYS_NICE (or RLIMIT_NICE / RLIMIT_RTPRIO): a
refusal is recorded and the thread goes on with its old priority; it never
fails a migration.
"""
from __future__ import annotations

import os
import threading


class UrgentThreads:
    """Applies urgent-thread-nice / urgent-thread-rt-priority of ``config`` to threads that call :meth:`enter`.

    ``enter()`` is called by the thread itself as it starts. ``metrics()``
    gives {"urgent-threads": {thread name: "nice -10" | "fifo 10" | "refused: ..."}}
    once any thread entered with a priority set, else {}.
    """

    def __init__(self, config):
        self.config = config
        self._lock = threading.Lock()
        self.applied: dict[str, str] = {}

    def settings(self) -> tuple[int, int]:
        """(nice, rt priority) asked for; (0, 0) = leave threads alone."""
        return int(self.config.param("urgent-thread-nice")), int(self.config.param("urgent-thread-rt-priority"))

    def enter(self) -> None:
        """Give the calling thread the urgent priority asked for (nothing if none is)."""
        nice, rt = self.settings()
        if not nice and not rt:
            return
        tid = threading.get_native_id()
        name = threading.current_thread().name
        done = []
        try:
            if nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                done.append(f"nice {nice}")
            if rt:
                os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(rt))
                done.append(f"fifo {rt}")
            what = ", ".join(done)
        except OSError as e:
            what = ", ".join(done + [f"refused: {e.strerror or e} (nice {nice}, rt priority {rt})"])
        with self._lock:
            self.applied[name] = what

    def metrics(self) -> dict:
        with self._lock:
            return {"urgent-threads": dict(self.applied)} if self.applied else {}
