"""The migration state machine, written down once for both sides.

Two rules, as in h11's ``_state.py``:

* every piece of state that decides a transition lives in this module, and
* the table does not depend on which side uses it except where a row says so
  (the ``source_guest_may_run`` column is about the source's copy of the guest,
  ``dest_guest_may_run`` about the destination's), so source and destination
  obey the same transitions.

States are QEMU's ``MigrationStatus`` names (qapi/migration.json). Events are
what happened; :meth:`MigrationStateMachine.fire` maps (state, event) to the
next state with a compare-and-set under a lock, as QEMU's
``migrate_set_state(&state, old, new)`` does, so a thread that lost a race
cannot move a migration out of a state it is no longer in. An event that has
no row for the current state is a :class:`StateError` naming both.

The point of no return: once the package carrying POSTCOPY_RUN may have
reached the destination, the source enters ``postcopy-active`` and from then on
no row leads to a state where the source's guest may run, but one: the
destination's own word, during a recovery, that it failed before it processed
RUN (event ``never-ran``). A failure there is the FAIL event like any other: the
table sends it to ``postcopy-paused`` instead of ``failed`` (see
docs/reliability.md).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from .callbacks import weak_callback

# --- states (QEMU's MigrationStatus) ---
NONE = "none"
SETUP = "setup"
ACTIVE = "active"
DEVICE = "device"
POSTCOPY_ACTIVE = "postcopy-active"
POSTCOPY_PAUSED = "postcopy-paused"
POSTCOPY_RECOVER = "postcopy-recover"
COMPLETED = "completed"
FAILED = "failed"
CANCELLING = "cancelling"
CANCELLED = "cancelled"

# --- events ---
START = "start"                  # migrate / migrate-incoming
CONNECTED = "connected"          # the main channel is up
STOP_AND_COPY = "stop-and-copy"  # source: guest stopped for the last pass; destination: load done, awaiting verdict
SWITCHOVER = "switchover"        # source: about to send the package with RUN; destination: RUN processed
COMPLETE = "complete"            # the outcome is decided: success
FAIL = "fail"                    # any fault: link, protocol, integrity, peer, liveness
CANCEL = "cancel"                # migrate-cancel
CANCEL_DONE = "cancel-done"      # the cancelled migration thread has stopped
PAUSE = "pause"                  # migrate-pause (a fault the user asks for)
RECOVER = "recover"              # a new main channel of a recovery is connected
RESUMED = "resumed"              # POSTCOPY_RESUME / RESUME_ACK exchanged
GUEST_LOST = "guest-lost"        # destination: the guest itself died (its process); nothing to recover
NEVER_RAN = "never-ran"          # source, recovering: the destination proved it failed before RUN


class StateError(RuntimeError):
    """An event that the table does not allow in the current state.

    The message names the event, the state, and the events allowed there.
    """


@dataclass(frozen=True)
class StateInfo:
    """One row group of the table: what holds while a migration is in ``name``.

    ``final``: nothing moves it any more (a new migration starts a new machine).
    ``source_guest_may_run``: the source's copy of the guest may run; the source
    resumes its paused guest on entering such a state, and never otherwise.
    ``dest_guest_may_run``: the destination's copy may run (or runs already).
    ``source_verbs`` / ``dest_verbs``: control verbs about the migration that a
    worker of that role accepts in this state (queries are always accepted).
    """

    name: str
    final: bool
    source_guest_may_run: bool
    dest_guest_may_run: bool
    source_verbs: frozenset
    dest_verbs: frozenset
    doc: str


def _v(*verbs: str) -> frozenset:
    return frozenset(verbs)


_NEW_SRC = _v("migrate", "migrate-set-capabilities", "migrate-set-parameters")
_NEW_DST = _v("migrate-incoming", "migrate-set-capabilities", "migrate-set-parameters")
_LIVE_PARAMS = "migrate-set-parameters"  # live ones only; engine/params.py LIVE_PARAMETERS

STATES: dict[str, StateInfo] = {s.name: s for s in [
    StateInfo(NONE, False, True, False, _NEW_SRC, _NEW_DST,
              "no migration yet"),
    StateInfo(SETUP, False, True, False,
              _v("migrate-cancel", "migrate-start-postcopy", _LIVE_PARAMS), _v("migrate-cancel", _LIVE_PARAMS),
              "connecting channels"),
    StateInfo(ACTIVE, False, True, False,
              _v("migrate-cancel", "migrate-start-postcopy", _LIVE_PARAMS), _v("migrate-cancel", _LIVE_PARAMS),
              "precopy: pages move while the guest runs on the source"),
    StateInfo(DEVICE, False, False, False,
              _v("migrate-cancel", _LIVE_PARAMS), _v("migrate-cancel"),
              "source: guest stopped, last pass and device state going out; destination: "
              "everything loaded and verified, waiting for the source's verdict"),
    StateInfo(POSTCOPY_ACTIVE, False, False, True,
              _v("migrate-pause", _LIVE_PARAMS), _v("migrate-pause"),
              "the guest runs on the destination; pages it lacks are requested from the source"),
    StateInfo(POSTCOPY_PAUSED, False, False, True,
              _v("migrate", _LIVE_PARAMS), _v("migrate-recover"),
              "a fault after the point of no return: the destination's guest waits for pages, "
              "the source keeps them; recovery (migrate-recover, then migrate with resume) goes on"),
    StateInfo(POSTCOPY_RECOVER, False, False, True,
              _v("migrate-pause", _LIVE_PARAMS), _v("migrate-pause"),
              "a recovery's channels are up; the source rebuilds what is left from the destination's "
              "received bitmaps"),
    StateInfo(COMPLETED, True, False, True, _v(), _v(),
              "every page arrived and both sides agreed; the guest belongs to the destination"),
    StateInfo(FAILED, True, True, False, _NEW_SRC, _NEW_DST,
              "a fault before the point of no return: the guest stays (or runs again) on the source"),
    StateInfo(CANCELLING, False, True, False, _v(), _v(),
              "migrate-cancel: channels are being closed"),
    StateInfo(CANCELLED, True, True, False, _NEW_SRC, _NEW_DST,
              "cancelled before the point of no return: the guest runs on the source"),
]}

# (state, event) -> next state. Both sides use this one table.
TRANSITIONS: dict[tuple[str, str], str] = {
    (NONE, START): SETUP,
    (FAILED, START): SETUP,
    (CANCELLED, START): SETUP,
    (SETUP, CONNECTED): ACTIVE,
    (SETUP, FAIL): FAILED,
    (SETUP, CANCEL): CANCELLING,
    (ACTIVE, STOP_AND_COPY): DEVICE,
    (ACTIVE, SWITCHOVER): POSTCOPY_ACTIVE,
    (ACTIVE, COMPLETE): COMPLETED,  # return-path-less precopy and file: streams
    (ACTIVE, FAIL): FAILED,
    (ACTIVE, CANCEL): CANCELLING,
    (DEVICE, COMPLETE): COMPLETED,
    (DEVICE, FAIL): FAILED,
    (DEVICE, CANCEL): CANCELLING,
    (CANCELLING, FAIL): CANCELLED,
    (CANCELLING, CANCEL_DONE): CANCELLED,
    (CANCELLING, CANCEL): CANCELLING,
    # The point of no return is behind us: every fault pauses, nothing resumes the source.
    (POSTCOPY_ACTIVE, COMPLETE): COMPLETED,
    (POSTCOPY_ACTIVE, FAIL): POSTCOPY_PAUSED,
    (POSTCOPY_ACTIVE, PAUSE): POSTCOPY_PAUSED,
    (POSTCOPY_PAUSED, FAIL): POSTCOPY_PAUSED,
    (POSTCOPY_PAUSED, PAUSE): POSTCOPY_PAUSED,
    (POSTCOPY_PAUSED, RECOVER): POSTCOPY_RECOVER,
    (POSTCOPY_RECOVER, RESUMED): POSTCOPY_ACTIVE,
    (POSTCOPY_RECOVER, FAIL): POSTCOPY_PAUSED,
    (POSTCOPY_RECOVER, PAUSE): POSTCOPY_PAUSED,
    # The one way back for the source's guest after the point of no return: the
    # destination answered a recovery with the word that it failed before it
    # processed RUN (the package never arrived), so its guest never ran.
    (POSTCOPY_RECOVER, NEVER_RAN): FAILED,
    # The destination's guest died: no recovery can bring it back. The source
    # stays in postcopy-paused (its own table row); it never resumes the guest.
    **{(s, GUEST_LOST): FAILED for s in (SETUP, ACTIVE, DEVICE, POSTCOPY_ACTIVE, POSTCOPY_PAUSED, POSTCOPY_RECOVER)},
}

FINAL_STATES = tuple(n for n, s in STATES.items() if s.final)
IN_PROGRESS = tuple(n for n, s in STATES.items() if not s.final and n != NONE)


def next_state(state: str, event: str) -> str:
    """The state ``event`` leads to from ``state``.

    Raises StateError when the table has no such row.
    """
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        allowed = sorted(e for (s, e) in TRANSITIONS if s == state)
        raise StateError(f"event {event!r} is not allowed in state {state!r} "
                         f"(allowed there: {', '.join(allowed) or 'none'})") from None


def verb_allowed(role: str, state: str, verb: str) -> bool:
    """Whether a worker of ``role`` ("source"/"destination") accepts ``verb`` in ``state``."""
    info = STATES[state]
    return verb in (info.source_verbs if role == "source" else info.dest_verbs)


def allowed_verbs(role: str, state: str) -> list[str]:
    info = STATES[state]
    return sorted(info.source_verbs if role == "source" else info.dest_verbs)


class MigrationStateMachine:
    """The state of one migration on one side; transitions only through the table.

    ``on_change(old, new, reason)`` is called after each change, outside the
    lock, in the thread that fired the event. Thread-safe.
    """

    def __init__(self, on_change: Callable[[str, str, str | None], None] | None = None,
                 state: str = NONE):
        self._state = state
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # Held weakly when it is the owner's bound method: no owner <-> machine cycle.
        self._on_change = weak_callback(on_change) if on_change else (lambda old, new, reason: None)
        self.history: list[tuple[str, str, str]] = []  # (event, old, new)

    @property
    def state(self) -> str:
        return self._state

    @property
    def info(self) -> StateInfo:
        return STATES[self._state]

    def can(self, event: str) -> bool:
        return (self._state, event) in TRANSITIONS

    def fire(self, event: str, expect: str | tuple[str, ...] | None = None, reason: str | None = None) -> str:
        """Apply ``event``; returns the new state.

        ``expect``: the state(s) the caller believes the migration is in; if it
        moved meanwhile, StateError (compare-and-set). Raises StateError for an
        event the table does not allow in the current state.
        """
        with self._lock:
            old = self._state
            if expect is not None:
                exp = (expect,) if isinstance(expect, str) else expect
                if old not in exp:
                    raise StateError(f"event {event!r}: migration is {old!r}, expected {' or '.join(exp)}")
            new = next_state(old, event)
            self._state = new
            self.history.append((event, old, new))
            self._changed.notify_all()
        if new != old:
            self._on_change(old, new, reason)
        return new

    def try_fire(self, event: str, reason: str | None = None) -> str | None:
        """Apply ``event`` if the table allows it now; returns the new state or None."""
        with self._lock:
            old = self._state
            new = TRANSITIONS.get((old, event))
            if new is None:
                return None
            self._state = new
            self.history.append((event, old, new))
            self._changed.notify_all()
        if new != old:
            self._on_change(old, new, reason)
        return new

    def wait_for(self, states: str | tuple[str, ...], timeout: float | None = None) -> str:
        """Block until the state is one of ``states`` (or ``timeout`` s); returns the state then."""
        want = (states,) if isinstance(states, str) else states
        with self._changed:
            self._changed.wait_for(lambda: self._state in want, timeout)
            return self._state
