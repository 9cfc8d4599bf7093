"""The human-readable migration report (rich markup), from a driver Outcome.

Every figure comes with a few words saying what it means, so a first-time
user can read the report without the docs.
"""
from __future__ import annotations

from .. import stats as S
from ..ram import format_size
from .driver import Outcome

ARROW = " -> "


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def mbps_to_mib(mbps: float) -> float:
    """QEMU's ``mbps`` (megabits per second) in MiB/s, the unit of every rate Ferry prints."""
    return mbps * 1e6 / 8 / (1 << 20)


def rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / (1 << 20):.1f} MiB/s"


# Figures in "more" lines that need their unit: key -> formatter.
UNITS = {"precopy-pacing-rate": lambda v: rate(v) if v else "0 (none)"}


def seconds(ms: float) -> str:
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.0f} ms"


def _cpu(u: dict | None) -> float:
    return (u or {}).get("cpu-user", 0.0) + (u or {}).get("cpu-system", 0.0)


def _worker_line(side: str, out: Outcome) -> str:
    before = (out.status_before.get(side) or {}).get("worker") or {}
    after = (out.status_after.get(side) or {}).get("worker") or getattr(out, side).get("worker") or {}
    during = _cpu(after) - _cpu(before)
    return (f"pid {after.get('pid', '?')}: {during:.2f} s CPU during the migration "
            f"({_cpu(after):.2f} s since start), {mib(after.get('rss', 0))} RSS, {after.get('threads', '?')} threads")


def _failure(side: str, q: dict) -> str:
    err = q.get("error-desc")
    return f"{side} {q.get('status', '?')}" + (f" ({err})" if err else "")


KNOWN = {"status", "total-time", "setup-time", "downtime", "expected-downtime", "ram", "channels", "digests",
         "error-desc", "passes", "role", "worker", "transfer-time", "verify-time", "guest-state",
         "postcopy-requests", "postcopy-faults", "postcopy-blocktime", "postcopy-bytes", "preemptions",
         "restores", "requests-already-sent", "requests-dropped-in-flight", "postcopy-latency-dist",
         "unreachable", "downtime-limit", "downtime-exceeded", "downtime-phases"}


def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def _postcopy_lines(s: dict, d: dict, w: int) -> list[str]:
    """Requests, their latency and blocktime (destination); preemption counters (source)."""
    lat = d.get("postcopy-latency") or {}
    lines = [f"  {'postcopy':<{w}} {d.get('postcopy-requests', 0)} pages requested by the destination's guest "
             f"({d.get('postcopy-faults', 0)} faults), {mib(d.get('postcopy-bytes', 0))} received after the switch"]
    if lat.get("count"):
        lines.append(f"  {'':<{w}} request latency avg {_ms(lat['avg'])} ms, p50 {_ms(lat['p50'])}, "
                     f"p99 {_ms(lat['p99'])}, max {_ms(lat['max'])} ms  (request sent -> host page placed)")
        for ch, cl in sorted((d.get("postcopy-latency-by-channel") or {}).items()):
            lines.append(f"  {'':<{w}}   placed via {ch:<10} {cl['count']} requests, p50 {_ms(cl['p50'])} ms, "
                         f"p99 {_ms(cl['p99'])} ms")
    lines.append(f"  {'':<{w}} blocktime {d.get('postcopy-blocktime', 0)} ms  (guest threads blocked on pages "
                 "not yet there)")
    if "preemptions" in s:
        lines.append(f"  {'':<{w}} preemptions {s.get('preemptions', 0)}, restores {s.get('restores', 0)}  "
                     "(a huge page on the PRECOPY channel interrupted for a request, then resumed); "
                     f"requests already sent {s.get('requests-already-sent', 0)}, dropped as in flight "
                     f"{s.get('requests-dropped-in-flight', 0)}")
    return lines


def more_lines(s: dict, d: dict, w: int) -> list[str]:
    """The "more" lines: the figures the engine adds beyond QEMU's, per side, from both sides'
    query-migrate. A figure not measured (null, e.g. multifd-sync-ms before any sync round)
    is left out rather than printed as a placeholder."""
    lines = []
    for side, q in (("source", s), ("destination", d)):
        other = {k: v for k, v in q.items() if k not in KNOWN and v is not None and not isinstance(v, (dict, list))}
        if other:
            lines.append(f"  {'more':<{w}} {side:<12} "
                         + ", ".join(f"{k} {UNITS.get(k, str)(v)}" for k, v in sorted(other.items())))
    return lines


def render(out: Outcome) -> list[str]:
    """Report lines (rich markup)."""
    s, d = out.source, out.destination
    ram = s.get("ram", {})
    lines: list[str] = []
    nblocks = len(s.get("digests") or {})
    if out.verified:
        lines.append("[bold green]Result: VERIFIED[/] - the destination holds exactly the source's memory")
        lines.append(f"        (per-block sha256 digests: the source compared them before letting go of the "
                     f"guest, and this controller compared both sides' again: {nblocks} of {nblocks} "
                     f"block(s) match)")
    elif out.completed:
        lines.append("[bold red]Result: DIGESTS DIFFER[/] - both sides completed but report different memory")
    elif out.paused and out.dest_never_ran:
        lines.append("[bold yellow]Result: POSTCOPY-PAUSED[/] - the source passed the point of no return but the "
                     "destination failed before it ran the guest: the guest is on the source, stopped; --resume "
                     "lets it run there again")
    elif out.paused:
        lines.append("[bold yellow]Result: POSTCOPY-PAUSED[/] - a fault after the switch: the guest is on the "
                     "destination and waits there for the pages the source keeps; recover with --resume")
    else:
        why = "timed out, cancelled by the controller; " if out.timed_out else ""
        lines.append(f"[bold red]Result: FAILED[/] - {why}{_failure('source', s)}, {_failure('destination', d)}")
    lines.append("")
    w = 12
    rp = any(c.get("capability") == "return-path" and c.get("state") for c in out.caps or [])
    rp_text = ", with a return path for the destination's confirmation" if rp and out.uri[:5] != "file:" else ""
    lines.append(f"  {'stream':<{w}} {out.uri or '-'}  (QEMU's stream format{rp_text})")
    lines.append(f"  {'states':<{w}} source       {ARROW.join(out.states('source')) or '-'}")
    lines.append(f"  {'':<{w}} destination  {ARROW.join(out.states('destination')) or '-'}")
    passes = s.get("passes") or []
    live = [p for p in passes if not p.get("guest-paused")]
    paused = [p for p in passes if p.get("guest-paused")]
    dirty = ", ".join(str(p.get("dirty-pages")) for p in live[:12]) + (", ..." if len(live) > 12 else "")
    if paused:
        # The last sync, with the guest stopped: what the final phase had to send.
        when = "at the switch to postcopy" if "postcopy-active" in out.states("source") else "once the guest paused"
        dirty += f"; {paused[-1].get('dirty-pages')} {when}"
    npasses = ram.get("dirty-sync-count", len(passes))
    lines.append(f"  {'passes':<{w}} {npasses}  (pass 1 sends every page; each later pass re-sends the pages the "
                 "guest wrote meanwhile)")
    if dirty:
        lines.append(f"  {'':<{w}} pages to send at each pass: {dirty}")
    if "total-time" in s:
        lines.append(f"  {'total time':<{w}} {seconds(s['total-time'])}  (from migrate to completed; "
                     f"setup {seconds(s.get('setup-time', 0))})")
    if "downtime" in s:
        limit = (out.params or {}).get("downtime-limit")
        lim = f"; downtime-limit {limit} ms" if limit is not None else ""
        if "postcopy-active" in out.states("source"):
            why = "for the switch to the destination, where it then ran while the rest of RAM followed"
        else:
            why = "for the last dirty pages, its device state and the destination's confirmation"
        lines.append(f"  {'downtime':<{w}} {seconds(s['downtime'])}  (the guest was paused this long {why}{lim})")
        over = s.get("downtime-exceeded", 0)
        if over:
            phases = s.get("downtime-phases") or {}
            where = ", ".join(f"{k} {v} ms" for k, v in phases.items())
            lines.append(f"  {'':<{w}} [bold yellow]over the downtime-limit by {over} ms[/] (estimated "
                         f"{s.get('expected-downtime', '?')} ms when the guest stopped"
                         + (f"; spent in {where}" if where else "") + ")")
    tt = s.get("total-time") or 0
    transferred = ram.get("transferred", 0)
    if tt:
        lines.append(f"  {'throughput':<{w}} {transferred / (1 << 20) / (tt / 1000):.1f} MiB/s on average, "
                     f"{mbps_to_mib(ram.get('mbps', 0)):.1f} MiB/s in the last 100 ms window")
    total = ram.get("total", 0)
    lines.append(f"  {'sent':<{w}} {mib(transferred)} for a {format_size(total) if total else '?'} guest: "
                 f"{ram.get('normal', 0)} pages with data, {ram.get('duplicate', 0)} zero pages "
                 "(sent as 8-byte headers)")
    # PRECOPY first, then postcopy-1, postcopy-2, ...
    for name, ch in sorted((s.get("channels") or {}).items(), key=lambda kv: (kv[0] != "precopy", kv[0])):
        lines.append(f"  {'':<{w}} channel {name:<10} {mib(ch.get('bytes', 0))}, {ch.get('normal', 0)} pages, "
                     f"{ch.get('duplicate', 0)} zero")
    if "postcopy-active" in out.states("source"):
        lines += _postcopy_lines(s, d, w)
    lines += more_lines(s, d, w)
    lines.append(f"  {'workers':<{w}} source       {_worker_line('source', out)}")
    lines.append(f"  {'':<{w}} destination  {_worker_line('destination', out)}")
    if s.get("digests"):
        first = next(iter(s["digests"].items()))
        lines.append(f"  {'digests':<{w}} {first[0]} sha256 {first[1][:16]}... "
                     f"({'same' if out.digests_match else 'DIFFERENT'} on the destination)")
    if s.get("status") == S.FAILED or d.get("status") == S.FAILED:
        for side, q in (("source", s), ("destination", d)):
            if q.get("error-desc"):
                lines.append(f"  [red]{side} error[/]: {q['error-desc']}")
    return lines


_HANG = __import__("re").compile(r"^( *)(\S[^ ]*(?: [^ ]+)*?  +)?")


def print_wrapped(console, line: str) -> None:
    """Print a report line (rich markup) wrapped to the console's width, continuation lines
    indented under the value: ``  label      value ...`` continues below ``value``.
    """
    from rich.text import Text

    text = Text.from_markup(line)
    plain = text.plain
    m = _HANG.match(plain)
    indent = len(m.group(0)) if m and m.group(2) and len(m.group(0)) <= 40 else len(m.group(1)) + 2 if m else 2
    width = max(40, console.width)
    if len(plain) <= width or indent >= width - 20:
        console.print(text, soft_wrap=True)
        return
    head, body = text.divide([indent])
    lines = body.wrap(console, width - indent)
    for i, part in enumerate(lines):
        part.rstrip()
        console.print(Text.assemble(head if i == 0 else " " * indent, part), soft_wrap=True)
