"""The live progress display of `ferry migrate` / `ferry demo`, fed by query-migrate.

What `virsh domjobinfo` and QEMU's `info migrate` users look for, in two lines
that fit 80 columns::

      active, pass 3      ━━━━━━━━━━━━━━━━━━━━  62%  97.3 MiB left, ETA 0:03
      dirty 31.9 MiB/s, expected downtime 25 ms, sent 158.7 MiB at 812.4 MiB/s

``progress_figures`` (pure) computes the figures; ``ProgressView`` draws them
with rich, with the workers' events printed above.
"""
from __future__ import annotations

import heapq
import time

from .. import stats as S

PAGE = 4096  # query-migrate's page-size: dirty-pages-rate counts target pages


def mib(n: float) -> str:
    """Bytes in MiB below 10 GiB (the unit of the report), then GiB or TiB: at most 9 characters."""
    for unit, shift in (("MiB", 20), ("GiB", 30), ("TiB", 40)):
        if n < 10240 << shift or unit == "TiB":
            return f"{n / (1 << shift):.1f} {unit}"
    raise AssertionError("unreachable")


def progress_figures(sq: dict) -> dict:
    """Figures of a source's query-migrate ``sq`` for the progress display.

    Returns ``total``, ``done`` (bytes of RAM not dirty), ``remaining`` (bytes),
    ``rate`` (bytes/s sent in the last window), ``dirty-rate`` (bytes/s the
    guest dirties), ``expected-downtime`` (ms or None), ``eta`` (seconds or
    None: none while precopy does not converge, i.e. the guest dirties memory
    as fast as it is sent).
    """
    ram = sq.get("ram") or {}
    status = sq.get("status")
    total = ram.get("total") or 0
    remaining = ram.get("remaining", total) if status not in (S.NONE, S.SETUP) else total
    if status == S.COMPLETED:
        remaining = 0
    page = ram.get("page-size") or PAGE
    rate = ram.get("mbps", 0) * 1e6 / 8
    dirty = ram.get("dirty-pages-rate", 0) * page if status == S.ACTIVE else 0
    eta = None
    if remaining == 0:
        eta = 0.0
    elif rate > dirty:
        eta = remaining / (rate - dirty)
    return {"total": total, "done": max(0, total - remaining), "remaining": remaining, "rate": rate,
            "dirty-rate": dirty, "expected-downtime": sq.get("expected-downtime"), "eta": eta,
            "transferred": ram.get("transferred", 0), "pass": ram.get("dirty-sync-count", 0), "status": status}


def _eta(s: float | None) -> str:
    if s is None:
        return "--:--"
    s = int(round(s))
    if s >= 100 * 3600:
        return ">99 h"
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_lines(f: dict) -> tuple[str, str, str]:
    """(label, after-bar text, detail line) for figures ``f``; each fits 80 columns with the bar."""
    label = f"{f['status']}, pass {f['pass']}"
    right = f"{mib(f['remaining'])} left, ETA {_eta(f['eta'])}"
    dt = f["expected-downtime"]
    detail = (f"dirty {mib(f['dirty-rate'])}/s, "
              + (f"expected downtime {dt} ms, " if dt is not None else "")
              + f"sent {mib(f['transferred'])} at {mib(f['rate'])}/s")
    return label, right, detail


class ProgressView:
    """Progress lines (rich Live) fed by query-migrate results, and event lines above them.

    Events of the two workers come on two streams: each is held ``HOLD``
    seconds and printed in timestamp order, so the lines read in time order
    and relative times never go negative.
    """

    BAR = 20
    HOLD = 0.3  # s an event waits for earlier ones from the other worker

    def __init__(self, console, enabled: bool, fmt_event=None):
        self.console = console
        self.enabled = enabled
        self.t0: float | None = None
        self._fmt_event = fmt_event
        self._pending: list = []  # (time, seq, side, event)
        self._seq = 0
        self._newest = 0.0
        self._live = None
        if enabled and console.is_terminal:
            from rich.live import Live

            self._live = Live(console=console, transient=True, refresh_per_second=4)

    def __enter__(self):
        if self._live is not None:
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        self.flush()
        if self._live is not None:
            self._live.__exit__(*exc)

    def on_event(self, side: str, ev: dict) -> None:
        from .protocol import event_time

        if not self.enabled:
            return
        t = event_time(ev)
        self._seq += 1
        heapq.heappush(self._pending, (t, self._seq, side, ev))
        self._newest = max(self._newest, t)
        self.flush(self._newest - self.HOLD)

    def flush(self, before: float | None = None) -> None:
        """Print held events older than ``before`` (all when None), oldest first."""
        while self._pending and (before is None or self._pending[0][0] <= before):
            t, _, side, ev = heapq.heappop(self._pending)
            if self.t0 is None:
                self.t0 = t
            self.console.print(self._fmt_event(ev, self.t0, f"{side:<11}"), highlight=False)

    def renderable(self, sq: dict):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        f = progress_figures(sq)
        label, right, detail = progress_lines(f)
        row = Table.grid(padding=(0, 1))
        row.add_row(Text(f"  {label:<18}"), ProgressBar(total=f["total"] or 1, completed=f["done"], width=self.BAR),
                    Text(f"{100 * f['done'] / (f['total'] or 1):3.0f}%  {right}"))
        return Group(row, Text(f"  {detail}"))

    def on_progress(self, sq: dict, dq: dict) -> None:
        self.flush(time.time() - self.HOLD)
        if self._live is not None:
            self._live.update(self.renderable(sq))
