"""Run one migration between two workers through their control planes, and verify it.

What a controller does, in order: check roles and guest shapes, set
capabilities (both sides) and parameters (both), a fresh ``migration-secret``
(both: it proves every migration channel, docs/protocol.md "Channel hello"), subscribe to both event
streams, ``migrate-incoming`` on the destination, ``migrate`` on the source
with the uri the destination really listens on, follow events and progress
until both sides reach a final state, then compare both sides'
``query-migrate`` digests.

The workers do not need the controller once ``migrate`` returned: if it goes
away, the migration carries on.

A postcopy migration that pauses (a fault after the switch) ends the run with
both sides ``postcopy-paused`` (``Outcome.paused``); ``resume=True`` drives its
recovery: ``migrate-recover`` on the destination, then ``migrate`` with
``resume: true`` on the source. On ``timeout`` the ``timeout_action`` applies,
as libvirt's ``virsh migrate --timeout`` does: ``cancel`` (precopy only: a
postcopy migration cannot be cancelled, it is followed on), ``postcopy``
(switch to postcopy; needs postcopy-ram) or ``pause`` (postcopy: migrate-pause;
precopy: cancel).
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass, field
from typing import Callable

from .. import states as ST
from .. import stats as S
from . import endpoints
from .client import CommandFailed, ControlClient, ControlError, EventStream

POLL = 0.2  # s between query-migrate polls for progress
DEST_GRACE = 3.0  # s a destination gets to notice that its source gave up
EVENT_DRAIN = 1.0  # s to wait for the last MIGRATION events after the final query


class DriverError(ControlError):
    """The two workers cannot migrate to each other as asked (wrong roles, shapes, uri)."""


@dataclass
class Outcome:
    """Everything a report needs about one migration."""

    uri: str
    source: dict  # final query-migrate of each side
    destination: dict
    events: dict = field(default_factory=lambda: {"source": [], "destination": []})
    status_before: dict = field(default_factory=dict)  # query-status of each side before
    status_after: dict = field(default_factory=dict)
    caps: list = field(default_factory=list)
    params: dict = field(default_factory=dict)
    wall_time: float = 0.0
    timed_out: bool = False
    unreachable: list = field(default_factory=list)  # endpoints that stopped answering during the migration
    timeout_action: str | None = None  # what was done when the timeout expired
    resumed: bool = False  # this run was a recovery of a paused migration

    @property
    def paused(self) -> bool:
        """The source is postcopy-paused, and so is the destination (or it stopped answering, or it
        failed before it ran the guest: ``dest_never_ran``)."""
        return (self.source.get("status") == S.POSTCOPY_PAUSED
                and (self.destination.get("status") == S.POSTCOPY_PAUSED or bool(self.destination.get("unreachable"))
                     or self.dest_never_ran))

    @property
    def dest_never_ran(self) -> bool:
        """The destination failed before it processed POSTCOPY_RUN (its query-migrate says never-ran):
        a resume gives the guest back to the source (engine/never_ran.py)."""
        return _never_ran(self.destination)

    @property
    def completed(self) -> bool:
        return self.source.get("status") == S.COMPLETED and self.destination.get("status") == S.COMPLETED

    @property
    def digests_match(self) -> bool:
        a, b = self.source.get("digests"), self.destination.get("digests")
        return bool(a) and a == b

    @property
    def verified(self) -> bool:
        """Both sides completed and the controller saw the same per-block digests on both."""
        return self.completed and self.digests_match

    def states(self, side: str) -> list[str]:
        return [e["data"].get("status") for e in self.events[side] if e.get("event") == "MIGRATION"]

    def passes(self) -> list[int]:
        return [e["data"].get("pass") for e in self.events["source"] if e.get("event") == "MIGRATION_PASS"]

    def to_dict(self) -> dict:
        result = ("verified" if self.verified else "completed" if self.completed
                  else "postcopy-paused" if self.paused else "failed")
        return {"result": result, "timeout-action": self.timeout_action, "resumed": self.resumed,
                "verified": self.verified, "digests-match": self.digests_match, "uri": self.uri,
                "timed-out": self.timed_out, "unreachable": self.unreachable, "wall-time": round(self.wall_time, 3),
                "capabilities": self.caps, "parameters": self.params,
                "states": {"source": self.states("source"), "destination": self.states("destination")},
                "source": self.source, "destination": self.destination, "events": self.events,
                "status-before": self.status_before, "status-after": self.status_after}


def default_uri(destination_control: str) -> str:
    """Where the destination listens when no uri is given: its control host, any free port."""
    if destination_control.startswith("tcp://"):
        host, _ = endpoints.split_tcp(destination_control)
        if host not in endpoints.WILDCARD_HOSTS:
            return f"tcp:[{host}]:0" if ":" in host else f"tcp:{host}:0"
    return "tcp:127.0.0.1:0"


def dialable_uri(listening: str, destination_control: str) -> str:
    """A destination listening on a wildcard address is reached at its control host."""
    for wild in ("0.0.0.0", "[::]", "::"):
        prefix = f"tcp:{wild}:"
        if listening.startswith(prefix):
            host = "127.0.0.1"
            if destination_control.startswith("tcp://"):
                h, _ = endpoints.split_tcp(destination_control)
                if h not in endpoints.WILDCARD_HOSTS:
                    host = f"[{h}]" if ":" in h else h
            return f"tcp:{host}:{listening[len(prefix):]}"
    return listening


def _shape(status: dict) -> list:
    return [(b["idstr"], b["length"], b["page-size"]) for b in status["guest"]["blocks"]]


async def prepare(src: ControlClient, dst: ControlClient, caps: dict | None, params: dict | None) -> tuple[dict, dict]:
    """Check both workers and apply capabilities and parameters; returns their query-status."""
    s_status, d_status = await asyncio.gather(src.call("query-status"), dst.call("query-status"))
    for st, want, ep in ((s_status, "source", src.endpoint), (d_status, "destination", dst.endpoint)):
        if st.get("role") != want:
            raise DriverError(f"{ep} is a {st.get('role')} worker, expected the {want}")
    for st, side, ep in ((s_status, "source", src.endpoint), (d_status, "destination", dst.endpoint)):
        # Before any setting changes: a busy worker would refuse them one by one, half applied.
        m = st.get("migration")
        if m in ST.IN_PROGRESS:
            how = ("`ferry migrate --resume` recovers it" if m in (ST.POSTCOPY_PAUSED, ST.POSTCOPY_RECOVER)
                   else f"wait for its end, or end it with `ferry call {ep} migrate-cancel`")
            raise DriverError(f"the {side} {ep} already has a migration in {m}: {how}")
    if _shape(s_status) != _shape(d_status):
        raise DriverError(f"the guests differ: source RAM blocks {_shape(s_status)}, destination "
                          f"{_shape(d_status)}; start both workers with the same --size/--page-size/--blocks")
    if caps:
        arg = {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]}
        # Both sides: the destination must expect what the source will send.
        await src.call("migrate-set-capabilities", arg)
        await dst.call("migrate-set-capabilities", arg)
    if params:
        # Both sides too: most parameters act on the source, some on the
        # destination (precopy-rcvbuf); each side uses those that concern it.
        await src.call("migrate-set-parameters", params)
        await dst.call("migrate-set-parameters", params)
    if not (params or {}).get("migration-secret"):
        # A fresh per-migration secret, over the (CURVE-protected) control plane only:
        # every migration channel's hello proves it with an HMAC (channels/hello.py).
        secret = {"migration-secret": secrets.token_hex(32)}
        await src.call("migrate-set-parameters", secret)
        await dst.call("migrate-set-parameters", secret)
    return s_status, d_status


async def _collect(stream: EventStream, into: list, side: str,
                   on_event: Callable[[str, dict], None] | None) -> None:
    async for ev in stream:
        into.append(ev)
        if on_event is not None:
            on_event(side, ev)


@contextlib.asynccontextmanager
async def _following_events(src: ControlClient, dst: ControlClient, out: Outcome, on_event):
    """Both workers' event streams collected into ``out.events`` while the block runs."""
    s_events, d_events = await asyncio.gather(src.events(), dst.events())
    tasks = [asyncio.ensure_future(_collect(s_events, out.events["source"], "source", on_event)),
             asyncio.ensure_future(_collect(d_events, out.events["destination"], "destination", on_event))]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        s_events.close()
        d_events.close()


def _final_seen(events: list) -> bool:
    return any(e.get("event") == "MIGRATION" and e["data"].get("status") in S.FINAL_STATES for e in events)


TIMEOUT_ACTIONS = ("cancel", "postcopy", "pause")


async def run_migration(src: ControlClient, dst: ControlClient, uri: str | None = None,
                        caps: dict | None = None, params: dict | None = None, timeout: float = 300.0,
                        on_progress: Callable[[dict, dict], None] | None = None,
                        on_event: Callable[[str, dict], None] | None = None,
                        on_started: Callable[[str], None] | None = None,
                        timeout_action: str = "cancel", resume: bool = False) -> Outcome:
    """Migrate from ``src`` to ``dst`` and wait for the end; see the module docstring.

    Raises DriverError for workers that cannot migrate to each other (or, with
    ``resume``, a migration that is not paused on both), ControlError when a
    worker does not answer, CommandFailed when a verb is refused.
    """
    if timeout_action not in TIMEOUT_ACTIONS:
        raise DriverError(f"timeout action {timeout_action!r}: expected one of {', '.join(TIMEOUT_ACTIONS)}")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    if resume:
        return await _resume(src, dst, uri, timeout, on_progress, on_event, timeout_action, t0)
    s_status, d_status = await prepare(src, dst, caps, params)
    out = Outcome(uri="", source={}, destination={}, status_before={"source": s_status, "destination": d_status})
    async with _following_events(src, dst, out, on_event):
        out.caps = await src.call("query-migrate-capabilities")
        out.params = await src.call("query-migrate-parameters")
        if uri is not None and uri.startswith("file:"):
            # A file is written first and loaded after: the destination can
            # only open it once the source has completed writing it.
            sq, dq = await _via_file(src, dst, uri, t0 + timeout, on_progress, on_started, out)
        else:
            listening = (await dst.call("migrate-incoming", {"uri": uri or default_uri(dst.endpoint)}))["uri"]
            out.uri = dialable_uri(listening, dst.endpoint)
            try:
                await src.call("migrate", {"uri": out.uri})
            except CommandFailed:
                await dst.call("migrate-cancel")
                raise
            if on_started is not None:
                on_started(out.uri)
            sq, dq = await _follow(src, dst, t0 + timeout, on_progress, out, timeout_action)
        # The last MIGRATION events may still be on their way.
        drain_until = loop.time() + EVENT_DRAIN
        while loop.time() < drain_until and not (_final_seen(out.events["source"])
                                                  and _final_seen(out.events["destination"])):
            await asyncio.sleep(0.02)
        out.source, out.destination = sq, dq
        dead = set(out.unreachable)
        out.status_after = {"source": await _quietly(src, "query-status", dead) or {},
                            "destination": await _quietly(dst, "query-status", dead) or {}}
    out.wall_time = loop.time() - t0
    return out


async def _via_file(src: ControlClient, dst: ControlClient, uri: str, deadline: float,
                    on_progress, on_started, out: Outcome) -> tuple[dict, dict]:
    """Save to ``file:PATH`` on the source, then load it on the destination (as QEMU's file: migration)."""
    loop = asyncio.get_running_loop()
    out.uri = uri
    await src.call("migrate", {"uri": uri})
    if on_started is not None:
        on_started(uri)
    idle = {"status": S.NONE}
    while True:
        sq = await src.call("query-migrate")
        if on_progress is not None:
            on_progress(sq, idle)
        if sq["status"] in S.FINAL_STATES:
            break
        if loop.time() > deadline:
            out.timed_out = True
            await src.call("migrate-cancel")
        await asyncio.sleep(POLL)
    if sq["status"] != S.COMPLETED:
        return sq, await dst.call("query-migrate")
    await dst.call("migrate-incoming", {"uri": uri})
    return await _follow(src, dst, deadline, on_progress, out)


async def _resume(src, dst, uri, timeout, on_progress, on_event, timeout_action, t0) -> Outcome:
    """Recover a postcopy-paused migration and follow it to its end."""
    loop = asyncio.get_running_loop()
    sq, dq = await asyncio.gather(src.call("query-migrate"), dst.call("query-migrate"))
    if sq["status"] != S.POSTCOPY_PAUSED or (dq["status"] != S.POSTCOPY_PAUSED and not _never_ran(dq)):
        raise DriverError(f"nothing to resume: the source is {sq['status']} and the destination "
                          f"{dq['status']}; --resume needs a postcopy-paused source, and a destination that is "
                          "postcopy-paused too or failed before it ran the guest")
    out = Outcome(uri="", source={}, destination={}, resumed=True)
    async with _following_events(src, dst, out, on_event):
        listening = (await dst.call("migrate-recover", {"uri": uri or default_uri(dst.endpoint)}))["uri"]
        out.uri = dialable_uri(listening, dst.endpoint)
        await src.call("migrate", {"uri": out.uri, "resume": True})
        # The source connects in its migration thread: until it has, both sides
        # still read postcopy-paused, which _follow would take for the end.
        await _recovery_started(src, sq.get("error-desc"), out, t0 + timeout)
        out.source, out.destination = await _follow(src, dst, t0 + timeout, on_progress, out, timeout_action)
        out.status_after = {"source": await src.call("query-status"),
                            "destination": await dst.call("query-status")}
    out.wall_time = loop.time() - t0
    return out


async def _recovery_started(src: ControlClient, error_before: str | None, out: Outcome, deadline: float) -> None:
    """Wait until the source acted on ``migrate`` with ``resume``: it entered postcopy-recover
    (its MIGRATION event, or a status other than postcopy-paused), or the try already
    failed (a new error while paused); returns at ``deadline`` at the latest."""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        if any(e.get("event") == "MIGRATION" and e["data"].get("status") == S.POSTCOPY_RECOVER
               for e in out.events["source"]):
            return
        q = await src.call("query-migrate")
        if q["status"] != S.POSTCOPY_PAUSED or q.get("error-desc") != error_before:
            return
        await asyncio.sleep(0.02)


async def _on_timeout(src: ControlClient, dst: ControlClient, sq: dict, action: str, dead: set) -> str:
    """Apply the timeout action to the migration's state now; returns what was done."""
    st = sq["status"]
    if st in (S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER):
        if action == "pause" and st != S.POSTCOPY_PAUSED:
            await _quietly(src, "migrate-pause", dead)
            return "paused"
        return "none: past the switch to postcopy a migration cannot be cancelled; followed to its end"
    if action == "postcopy":
        try:
            await src.call("migrate-start-postcopy")
            return "switched to postcopy"
        except CommandFailed as e:
            return f"none: {e}"
    await _quietly(src, "migrate-cancel", dead)
    await _quietly(dst, "migrate-cancel", dead)
    return "cancelled"


def _never_ran(dq: dict) -> bool:
    """A destination's query-migrate: failed (or cancelled) before its guest ran, postcopy advised."""
    return dq.get("status") in (S.FAILED, S.CANCELLED) and bool(dq.get("never-ran"))


def _unreachable(ep: str, last: dict | None) -> dict:
    """A query-migrate stand-in for a worker that stopped answering (its last answer, failed)."""
    q = dict(last or {})
    q.update({"status": S.FAILED, "unreachable": True,
              "error-desc": f"the worker at {ep} stopped answering the control plane (exited or hung)"})
    return q


async def _quietly(client: ControlClient, verb: str, dead: set) -> dict | None:
    """``verb`` on a worker that may have gone away: None (and remembered) if it does not answer."""
    if client.endpoint in dead:
        return None
    try:
        return await client.call(verb)
    except CommandFailed:
        return None
    except ControlError:
        dead.add(client.endpoint)
        return None


async def _follow(src: ControlClient, dst: ControlClient, deadline: float,
                  on_progress, out: Outcome, timeout_action: str = "cancel") -> tuple[dict, dict]:
    loop = asyncio.get_running_loop()
    src_final_at = None
    dead: set = set()
    last: dict = {}
    while True:
        # A worker that died takes its migration with it: what the other side
        # saw (its error) is the cause worth showing, so keep following that one.
        sq, dq = await asyncio.gather(_quietly(src, "query-migrate", dead), _quietly(dst, "query-migrate", dead))
        if sq is None and dq is None:
            raise ControlError(f"neither worker answers any more ({src.endpoint}, {dst.endpoint})")
        sq = sq if sq is not None else _unreachable(src.endpoint, last.get("source"))
        dq = dq if dq is not None else _unreachable(dst.endpoint, last.get("destination"))
        last = {"source": sq, "destination": dq}
        out.unreachable = sorted(dead)
        if on_progress is not None:
            on_progress(sq, dq)
        s_done, d_done = sq["status"] in S.FINAL_STATES, dq["status"] in S.FINAL_STATES
        if s_done and d_done:
            return sq, dq
        if sq["status"] == S.POSTCOPY_PAUSED and (dq["status"] == S.POSTCOPY_PAUSED or dq.get("unreachable")
                                                  or _never_ran(dq)):
            return sq, dq  # a recovery is the user's call (ferry migrate --resume)
        if sq.get("unreachable") and dq["status"] == S.POSTCOPY_PAUSED:
            # The source died after the switch: the destination waits, paused, for pages only a
            # source with the same memory could send. Nothing will change by waiting here.
            return sq, dq
        if sq["status"] == S.POSTCOPY_PAUSED and d_done:
            return sq, dq  # the destination lost the guest (its process died): the source keeps the memory
        now = loop.time()
        if s_done and src_final_at is None:
            src_final_at = now
        if s_done and sq["status"] != S.COMPLETED and now - src_final_at > DEST_GRACE:
            # The source gave up before the destination heard from it (e.g. it
            # could not connect): stop the destination listening.
            await _quietly(dst, "migrate-cancel", dead)
        if now > deadline and not out.timed_out:
            out.timed_out = True
            out.timeout_action = await _on_timeout(src, dst, sq, timeout_action, dead)
            if out.timeout_action == "cancelled":
                deadline = now + 10  # let both report their final state
        elif out.timed_out and now > deadline and out.timeout_action == "cancelled":
            return sq, dq
        await asyncio.sleep(POLL)


def parse_cap(text: str) -> tuple[str, bool]:
    """``postcopy-ram`` or ``postcopy-ram=on|off`` -> (name, state)."""
    name, sep, val = text.partition("=")
    if not sep:
        return name, True
    v = val.strip().lower()
    if v in ("on", "true", "yes", "1"):
        return name, True
    if v in ("off", "false", "no", "0"):
        return name, False
    raise ValueError(f"capability {name!r}: state {val!r} is not on or off")


def parse_param(text: str):
    """``downtime-limit=100`` -> ("downtime-limit", 100); sizes like 64M are allowed for byte values.

    Range and type checks are engine.params's: a value that is not a number is
    passed through as a string so its error names the field and the range.
    """
    from ..params import PARAMETERS
    from ..ram import parse_size

    name, sep, val = text.partition("=")
    if not sep or not name:
        raise ValueError(f"parameter {text!r}: expected NAME=VALUE")
    val = val.strip()
    spec = PARAMETERS.get(name)
    if spec is not None and spec.kind is bool:
        low = val.lower()
        if low in ("on", "true", "yes", "1"):
            return name, True
        if low in ("off", "false", "no", "0"):
            return name, False
        return name, val
    if spec is not None and spec.kind is str:
        return name, val
    try:
        return name, int(val)
    except ValueError:
        pass
    if spec is not None and "bytes" in spec.unit:
        try:
            return name, parse_size(val)
        except ValueError:
            pass
    if spec is not None and spec.kind is float:
        try:
            return name, float(val)
        except ValueError:
            pass
    return name, val


__all__ = ["Outcome", "DriverError", "run_migration", "prepare", "parse_cap", "parse_param",
           "default_uri", "dialable_uri"]
