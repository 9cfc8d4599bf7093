"""The postcopy phase split: where a postcopy migration's time goes, end to end.

Each side keeps a few :class:`PhaseStamps`: named moments (``time.monotonic()``
seconds), and on the source also the migration thread's CPU time
(``time.thread_time()``) and the PRECOPY channel's byte count at each. Nothing
per page: a handful of stamps per migration, so they stay on.

========================  ===========  ==============================================
stamp                     side         taken when
========================  ===========  ==============================================
start                     source       the migration thread began (setup included)
stop                      source       the guest was paused for the switch
package-sent              source       the package (with LISTEN and RUN) was flushed
package-read              destination  the PACKAGED command was read
listen                    destination  POSTCOPY_LISTEN was handled
run                       destination  POSTCOPY_RUN was handled: the guest runs here
first-background          source       the first background order after the switch began
background-done           source       the last background byte and EOF were flushed
confirmed                 source       the destination's confirmation (SHUT) was read
end                       source       the verdict was sent: the migration completed
========================  ===========  ==============================================

:func:`split` joins both sides (CLOCK_MONOTONIC is one clock for every
process of a host: only when both workers run on one host, as in the
benchmarks) into the phases, in milliseconds:

- ``precopy``: start -> stop (setup and the precopy passes);
- ``switch``: stop -> run (sync, discards, the package, LISTEN, the POSTCOPY
  channels if opened at the switch), split at package-sent and package-read;
- ``start``: run -> first-background (negative: the source began before the
  destination handled RUN);
- ``steady``: first-background -> background-done, with the PRECOPY channel's
  rate over it (MiB/s), that of every channel (requested pages too), the migration thread's CPU per GiB sent on it, and the
  PRECOPY channel's write system calls per MiB;
- ``tail``: background-done -> confirmed, and ``verdict``: confirmed -> end.
"""
from __future__ import annotations

import time

MIB = 1 << 20
GIB = 1 << 30
SOURCE_STAMPS = ("start", "stop", "package-sent", "first-background", "background-done", "confirmed", "end")
DEST_STAMPS = ("package-read", "listen", "run")


class PhaseStamps:
    """Named moments of one side: ``{name: [monotonic s, thread CPU s, PRECOPY bytes, PRECOPY writes,
    bytes on every channel]}``.

    ``mark`` keeps the first stamp of a name (a recovery does not move them);
    CPU time is that of the calling thread (on the source: the migration thread).
    """

    __slots__ = ("stamps",)

    def __init__(self):
        self.stamps: dict[str, list] = {}

    def mark(self, name: str, nbytes: int = 0, at: float | None = None, writes: int = 0, total: int = 0) -> None:
        """Stamp ``name`` now (or at monotonic ``at``) unless already stamped; ``nbytes`` and
        ``writes``: the PRECOPY channel's bytes and write system calls so far; ``total``:
        the bytes of every channel (POSTCOPY channels' requested pages too)."""
        if name not in self.stamps:
            self.stamps[name] = [time.monotonic() if at is None else at, time.thread_time(), nbytes, writes, total]

    def has(self, name: str) -> bool:
        return name in self.stamps

    def to_dict(self) -> dict:
        """JSON-ready copy: ``{name: [monotonic s, CPU s, bytes, writes, all bytes]}``."""
        return {k: [round(v[0], 6), round(v[1], 6), *v[2:]] for k, v in self.stamps.items()}


def _ms(a, b) -> float | None:
    return None if a is None or b is None else round((b - a) * 1000, 1)


def split(src: dict | None, dst: dict | None) -> dict:
    """The phases of one postcopy migration from both sides' ``to_dict()`` (see the module doc).

    Any phase whose stamps are missing is None. Returns ``{"precopy-ms", "switch-ms",
    "switch": {"source-ms", "wire-ms", "destination-ms"}, "start-ms", "steady-ms",
    "steady-MiBps", "steady-cpu-s-per-GiB", "precopy-cpu-s-per-GiB", "tail-ms",
    "verdict-ms", "total-ms"}``.
    """
    s = {k: v for k, v in (src or {}).items()}
    d = {k: v for k, v in (dst or {}).items()}

    def t(side, name):
        v = side.get(name)
        return None if v is None else v[0]

    out = {
        "precopy-ms": _ms(t(s, "start"), t(s, "stop")),
        "switch-ms": _ms(t(s, "stop"), t(d, "run")),
        "switch": {"source-ms": _ms(t(s, "stop"), t(s, "package-sent")),
                   "wire-ms": _ms(t(s, "package-sent"), t(d, "package-read")),
                   "destination-ms": _ms(t(d, "package-read"), t(d, "run"))},
        "start-ms": _ms(t(d, "run"), t(s, "first-background")),
        "steady-ms": _ms(t(s, "first-background"), t(s, "background-done")),
        "tail-ms": _ms(t(s, "background-done"), t(s, "confirmed")),
        "verdict-ms": _ms(t(s, "confirmed"), t(s, "end")),
        "total-ms": _ms(t(s, "start"), t(s, "end")),
        "steady-MiBps": None, "steady-all-MiBps": None, "steady-cpu-s-per-GiB": None, "steady-writes-per-MiB": None,
        "precopy-cpu-s-per-GiB": None,
    }
    fb, bd, st, sp = s.get("first-background"), s.get("background-done"), s.get("start"), s.get("stop")
    if fb and bd and bd[2] > fb[2]:
        nbytes = bd[2] - fb[2]
        if bd[0] > fb[0]:
            out["steady-MiBps"] = round(nbytes / MIB / (bd[0] - fb[0]), 1)
        out["steady-cpu-s-per-GiB"] = round((bd[1] - fb[1]) / (nbytes / GIB), 3)
        if len(fb) > 4 and bd[0] > fb[0]:
            out["steady-all-MiBps"] = round((bd[4] - fb[4]) / MIB / (bd[0] - fb[0]), 1)
        if len(fb) > 3 and len(bd) > 3:
            out["steady-writes-per-MiB"] = round((bd[3] - fb[3]) / (nbytes / MIB), 2)
    if st and sp and sp[2] > st[2]:
        out["precopy-cpu-s-per-GiB"] = round((sp[1] - st[1]) / ((sp[2] - st[2]) / GIB), 3)
    return out


SPLIT_KEYS = ("precopy-ms", "switch-ms", "start-ms", "steady-ms", "tail-ms", "verdict-ms", "total-ms",
              "steady-MiBps", "steady-all-MiBps", "steady-cpu-s-per-GiB", "steady-writes-per-MiB", "precopy-cpu-s-per-GiB")


def merge_splits(splits: list[dict]) -> dict:
    """Median and [min, max] of each figure over several runs' :func:`split` (None ones skipped)."""
    import statistics
    out = {}
    for k in SPLIT_KEYS:
        vals = [x[k] for x in splits if x and x.get(k) is not None]
        out[k] = round(statistics.median(vals), 3) if vals else None
        out[k + "-spread"] = [min(vals), max(vals)] if vals else None
    for k in ("source-ms", "wire-ms", "destination-ms"):
        vals = [x["switch"][k] for x in splits if x and x.get("switch", {}).get(k) is not None]
        out.setdefault("switch", {})[k] = round(statistics.median(vals), 3) if vals else None
    return out
