"""Control-plane messages: msgpack bodies shaped like QMP, and the verb schemas.

Pure functions, no sockets, so every rule here is testable on its own.

Request   ``{"id": 7, "execute": "migrate", "arguments": {"uri": "tcp:10.0.0.2:4444"}}``
Reply     ``{"id": 7, "return": {...}}`` or
          ``{"id": 7, "error": {"class": "GenericError", "desc": "..."}}``
Event     ``{"event": "MIGRATION", "data": {"status": "active"},
             "timestamp": {"seconds": 1700000000, "microseconds": 12345}}``

``id`` is optional (as in QMP) and is echoed back; clients that keep several
requests in flight need it to match replies. A request that cannot be decoded
at all still gets a reply, with ``"id": None``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

# QMP error classes. QEMU itself only still uses the first two for commands;
# Ferry keeps to them so QMP-speaking tools understand every reply.
GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
ERROR_CLASSES = (GENERIC_ERROR, COMMAND_NOT_FOUND)

MAX_REQUEST_BYTES = 1 << 20  # larger requests get an error reply
REQUEST_MEMBERS = ("id", "execute", "arguments")

# Topics of the event stream are the event names; these are reserved for the
# stream's own plumbing and never shown to users.
HELLO_PREFIX = b"\x00hello-"


class RequestError(Exception):
    """A request that gets an error reply: QMP error class, description and the request's id."""

    def __init__(self, klass: str, desc: str, id: Any = None):
        super().__init__(desc)
        self.klass = klass
        self.desc = desc
        self.id = id


@dataclass(frozen=True)
class Arg:
    """One argument of a verb: accepted Python types (after msgpack) and a type name for errors."""

    types: tuple
    type_name: str
    required: bool = True
    check: Callable[[str, Any], None] | None = None  # deeper structure checks; raise RequestError


@dataclass(frozen=True)
class Verb:
    """A control-plane command."""

    name: str
    doc: str
    args: dict[str, Arg] = field(default_factory=dict)
    roles: tuple[str, ...] = ("source", "destination")
    open_args: bool = False  # arguments are checked by the handler (migrate-set-parameters)
    implemented: bool = True
    returns: str = "{}"


def _check_capability_list(name: str, value: list) -> None:
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise RequestError(GENERIC_ERROR, f"Invalid parameter type for '{where}', expected: object "
                                              "with members 'capability' and 'state'")
        extra = [k for k in item if k not in ("capability", "state")]
        if extra:
            raise RequestError(GENERIC_ERROR, f"Parameter '{where}.{_show(extra[0])}' is unexpected")
        for member, typ, tname in (("capability", str, "string"), ("state", bool, "boolean")):
            if member not in item:
                raise RequestError(GENERIC_ERROR, f"Parameter '{where}.{member}' is missing")
            if not isinstance(item[member], typ):
                raise RequestError(GENERIC_ERROR, f"Invalid parameter type for '{where}.{member}', "
                                                  f"expected: {tname}, got {_show(item[member])}")


_SOURCE = ("source",)
_DEST = ("destination",)

VERBS: dict[str, Verb] = {v.name: v for v in [
    Verb("migrate-set-capabilities",
         "Enable or disable migration capabilities (all or nothing; not during a migration).",
         {"capabilities": Arg((list,), "array", check=_check_capability_list)}),
    Verb("migrate-set-parameters",
         "Set migration parameters given as arguments, e.g. {\"downtime-limit\": 100} "
         "(validated against QEMU's ranges; during a migration only the live ones: max-bandwidth, "
         "downtime-limit, max-postcopy-bandwidth, postcopy-after-passes, postcopy-after-percent, which "
         "take effect at once).",
         open_args=True),
    Verb("query-migrate-capabilities", "List every capability and its state.",
         returns="[{capability, state}]"),
    Verb("query-migrate-parameters", "Every parameter and its value.", returns="{name: value}"),
    Verb("migrate", "Start migrating the guest to a destination that listens on uri "
                    "(tcp:HOST:PORT, unix:PATH or file:PATH); returns at once, follow the events. "
                    "With resume: true, recover a postcopy-paused migration over uri (the destination "
                    "listens there after migrate-recover).",
         {"uri": Arg((str,), "string"), "resume": Arg((bool,), "boolean", required=False)}, roles=_SOURCE),
    Verb("migrate-incoming", "Listen for an incoming migration on uri (tcp port 0 picks a free port); "
                             "returns the uri actually listened on.",
         {"uri": Arg((str,), "string")}, roles=_DEST, returns="{uri}"),
    Verb("migrate-start-postcopy", "Switch a running migration to postcopy (needs postcopy-ram).",
         roles=_SOURCE),
    Verb("migrate-pause", "Cut the channels of a postcopy migration on purpose: both sides enter "
                          "postcopy-paused; recover with migrate-recover and migrate with resume."),
    Verb("migrate-recover", "On a postcopy-paused destination: listen on uri for the source's recovery "
                            "(migrate with resume: true); returns the uri actually listened on.",
         {"uri": Arg((str,), "string")}, roles=_DEST, returns="{uri}"),
    Verb("query-migrate", "State and statistics of the current or last migration, plus the worker's "
                          "resource use.", returns="{status, ram, ..., worker}"),
    Verb("query-guest-progress", "The guest workload's progress series: wall-clock times, ms per GiB touched "
                                 "in each interval (null: no progress) and pause/resume marks. On a source "
                                 "it covers the guest until it stopped there; on a destination, from "
                                 "POSTCOPY_RUN on (empty after a precopy migration or without a workload).",
         returns="{interval, t, ms_per_gib, marks, pages_touched, running}"),
    Verb("query-postcopy-latency", "Raw postcopy request latencies in microseconds (request sent -> host page "
                                   "placed), all of them and per channel that placed the page, for CDF "
                                   "plots; empty before postcopy.",
         returns="{all: [us], CHANNEL: [us]}"),
    Verb("stop", "Pause the guest where it runs (QMP stop); event STOP."),
    Verb("cont", "Run the guest here if it belongs here (QMP cont): a source's guest before or after a "
                 "failed migration, a destination's after its migration completed (or, by the user's "
                 "decision, when the source's verdict was lost); event RESUME."),
    Verb("migrate-cancel", "Cancel the migration; a source's guest goes on running where it is."),
    Verb("query-status", "Run state of the guest, the worker's role, guest shape, endpoints and "
                         "resource use.", returns="{status, running, role, ...}"),
    Verb("query-commands", "List the verbs this worker knows.", returns="[{name}]"),
    Verb("quit", "Cancel any migration, close the sockets and exit."),
    Verb("x-query-guest-fingerprints",
         "Page fingerprints (uint64 little-endian, all blocks in order) of pages start.. (count of them) as "
         "this worker's memory holds them: a source's guest after it migrated, for the destination's guest "
         "check. Not on a destination whose incoming migration is under way. Binary: for the ZeroMQ "
         "control plane (msgpack), not QMP.",
         {"start": Arg((int,), "int", required=False), "count": Arg((int,), "int", required=False)},
         returns="{fingerprints, start, total}"),
    Verb("x-guest-check",
         "A guest process (--guest process) compares the fingerprint of each page it read first with the "
         "source's fingerprints of pages start.. (from x-query-guest-fingerprints): a page read before it "
         "was migrated, or placed wrong, is a mismatch.",
         {"fingerprints": Arg((bytes,), "binary"), "start": Arg((int,), "int", required=False)},
         returns="{pages-checked, mismatches, first-mismatches}"),
]}


def _show(v: Any, limit: int = 60) -> str:
    """repr() cut short: values from the wire can be huge."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


@dataclass(frozen=True)
class Request:
    """A decoded, schema-checked request."""

    id: Any
    verb: str
    args: dict


def _valid_id(v: Any) -> bool:
    # bool is an int subclass; QMP ids are any JSON value, but a reply has to be
    # matched against it, so keep to values that compare simply.
    return v is None or (isinstance(v, (int, str)) and not isinstance(v, bool))


def decode_request(body: bytes) -> Request:
    """Decode and validate one request body; raises RequestError (never anything else)."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise RequestError(GENERIC_ERROR, "request body must be bytes")
    if len(body) > MAX_REQUEST_BYTES:
        raise RequestError(GENERIC_ERROR, f"request of {len(body)} bytes is larger than the "
                                          f"{MAX_REQUEST_BYTES} bytes allowed")
    try:
        msg = msgpack.unpackb(bytes(body), raw=False, strict_map_key=False)
    except Exception as e:  # noqa: BLE001 - msgpack raises many types for bad input
        detail = f": {_show(str(e), 120)}" if str(e) else ""
        raise RequestError(GENERIC_ERROR, f"request is not valid msgpack ({type(e).__name__}{detail})") from None
    if not isinstance(msg, dict):
        raise RequestError(GENERIC_ERROR, f"request must be a map with 'execute' and optional 'id' and "
                                          f"'arguments', got {type(msg).__name__} {_show(msg)}")
    rid = msg.get("id")
    if not _valid_id(rid):
        raise RequestError(GENERIC_ERROR, f"request member 'id' must be an integer or a string, got {_show(rid)}")
    extra = [k for k in msg if k not in REQUEST_MEMBERS]
    if extra:
        raise RequestError(GENERIC_ERROR, f"request member {_show(extra[0])} is unexpected; "
                                          f"allowed: {', '.join(REQUEST_MEMBERS)}", rid)
    verb = msg.get("execute")
    if verb is None:
        raise RequestError(GENERIC_ERROR, "request member 'execute' is missing", rid)
    if not isinstance(verb, str):
        raise RequestError(GENERIC_ERROR, f"request member 'execute' must be a string, got {_show(verb)}", rid)
    spec = VERBS.get(verb)
    if spec is None:
        raise RequestError(COMMAND_NOT_FOUND, f"The command {_show(verb)} has not been found; "
                                              f"known: {', '.join(VERBS)}", rid)
    args = msg.get("arguments", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RequestError(GENERIC_ERROR, f"request member 'arguments' must be a map, got {_show(args)}", rid)
    try:
        check_arguments(spec, args)
    except RequestError as e:
        e.id = rid
        raise
    return Request(rid, verb, args)


def check_arguments(spec: Verb, args: dict) -> None:
    """Missing, unexpected and wrongly typed arguments, with QMP's wording."""
    for k in args:
        if not isinstance(k, str):
            raise RequestError(GENERIC_ERROR, f"argument names must be strings, got {_show(k)}")
    if spec.open_args:
        return
    for k in args:
        if k not in spec.args:
            allowed = ", ".join(spec.args) or "none"
            raise RequestError(GENERIC_ERROR, f"Parameter '{k[:60]}' is unexpected "
                                              f"({spec.name} takes: {allowed})")
    for name, a in spec.args.items():
        if name not in args:
            if a.required:
                raise RequestError(GENERIC_ERROR, f"Parameter '{name}' is missing ({spec.name} needs it)")
            continue
        v = args[name]
        if isinstance(v, bool) and bool not in a.types or not isinstance(v, a.types):
            raise RequestError(GENERIC_ERROR, f"Invalid parameter type for '{name}', expected: "
                                              f"{a.type_name}, got {_show(v)}")
        if a.check is not None:
            a.check(name, v)


def _default(o: Any) -> Any:
    # numpy scalars and other odd values from engine dicts must never make a
    # reply unencodable (the client would wait forever).
    item = getattr(o, "item", None)
    if callable(item):
        return item()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


def pack(obj: Any) -> bytes:
    """msgpack with a fallback for values msgpack does not know."""
    return msgpack.packb(obj, use_bin_type=True, default=_default)


def unpack(body: bytes) -> Any:
    """Decode a reply or an event (trusted enough: it comes from a worker we chose)."""
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


def encode_request(verb: str, args: dict | None = None, id: Any = None) -> bytes:
    msg: dict = {"execute": verb}
    if id is not None:
        msg["id"] = id
    if args:
        msg["arguments"] = args
    return pack(msg)


def ok_reply(id: Any, value: Any) -> dict:
    return {"id": id, "return": {} if value is None else value}


def error_reply(id: Any, klass: str, desc: str) -> dict:
    return {"id": id, "error": {"class": klass, "desc": desc}}


def timestamp(t: float | None = None) -> dict:
    """QMP's event timestamp: wall-clock seconds and microseconds."""
    t = time.time() if t is None else t
    sec = int(t)
    return {"seconds": sec, "microseconds": int((t - sec) * 1_000_000)}


def event(name: str, data: dict | None = None, t: float | None = None) -> dict:
    return {"event": name, "data": data or {}, "timestamp": timestamp(t)}


def event_time(ev: dict) -> float:
    ts = ev.get("timestamp") or {}
    return ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
