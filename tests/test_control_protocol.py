"""The control-plane message codec and verb schemas, without sockets.

Whatever bytes arrive, decode_request either returns a checked Request or
raises RequestError with a QMP error class and a description: nothing else.
"""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferry_migrate.engine.control import endpoints as E
from ferry_migrate.engine.control import protocol as P
from ferry_migrate.engine.control.driver import default_uri, dialable_uri, parse_cap, parse_param
from ferry_migrate.engine.params import PARAMETERS


def decode_or_error(body: bytes):
    try:
        return P.decode_request(body)
    except P.RequestError as e:
        assert e.klass in P.ERROR_CLASSES
        assert isinstance(e.desc, str) and e.desc
        return e


# --- arbitrary input ---------------------------------------------------------

@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_raise_anything_else(body):
    r = decode_or_error(body)
    if isinstance(r, P.Request):
        assert r.verb in P.VERBS


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20) | st.sampled_from(list(P.VERBS) + ["uri", "execute", "id"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12) | st.sampled_from(["id", "execute", "arguments", "uri"]),
                      children, max_size=4),
    max_leaves=12)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(msgpack_values)
def test_arbitrary_msgpack_values(value):
    r = decode_or_error(msgpack.packb(value, use_bin_type=True))
    if isinstance(r, P.Request):
        # Only maps with a known verb and well-typed arguments get through.
        assert isinstance(value, dict) and value["execute"] in P.VERBS


@settings(max_examples=300)
@given(st.sampled_from(list(P.VERBS)),
       st.dictionaries(st.text(min_size=1, max_size=10), msgpack_values, max_size=3),
       st.one_of(st.none(), st.integers(0, 1 << 40), st.text(max_size=8)))
def test_requests_with_random_arguments(verb, args, rid):
    body = msgpack.packb({"execute": verb, "arguments": args, **({"id": rid} if rid is not None else {})})
    r = decode_or_error(body)
    # The reply always carries the request's id once the id itself was readable.
    assert r.id == rid
    if isinstance(r, P.Request):
        spec = P.VERBS[verb]
        assert spec.open_args or set(args) <= set(spec.args)


@given(st.binary(min_size=1, max_size=64))
def test_truncated_valid_request(suffix):
    body = P.encode_request("migrate", {"uri": "tcp:127.0.0.1:4444"}, 3)
    for cut in range(len(body)):
        r = decode_or_error(body[:cut])
        assert isinstance(r, P.RequestError)
    assert isinstance(decode_or_error(body + suffix), P.RequestError)  # trailing bytes: ExtraData


def test_valid_requests_round_trip():
    r = P.decode_request(P.encode_request("migrate", {"uri": "unix:/tmp/x"}, 42))
    assert (r.id, r.verb, r.args) == (42, "migrate", {"uri": "unix:/tmp/x"})
    r = P.decode_request(P.encode_request("query-status"))
    assert (r.id, r.verb, r.args) == (None, "query-status", {})
    r = P.decode_request(P.encode_request("migrate-set-parameters", {"downtime-limit": 5}, "a"))
    assert r.args == {"downtime-limit": 5}  # open arguments: checked by engine.params in the worker
    caps = {"capabilities": [{"capability": "return-path", "state": False}]}
    assert P.decode_request(P.encode_request("migrate-set-capabilities", caps, 1)).args == caps


# --- each kind of bad input has its own error ------------------------------------

@pytest.mark.parametrize("body, klass, words", [
    (b"\xc1", P.GENERIC_ERROR, ["not valid msgpack"]),
    (b"", P.GENERIC_ERROR, ["not valid msgpack"]),
    (msgpack.packb([1, 2]), P.GENERIC_ERROR, ["must be a map", "list"]),
    (msgpack.packb("migrate"), P.GENERIC_ERROR, ["must be a map"]),
    (msgpack.packb({"id": 1}), P.GENERIC_ERROR, ["'execute' is missing"]),
    (msgpack.packb({"execute": 5}), P.GENERIC_ERROR, ["'execute' must be a string"]),
    (msgpack.packb({"execute": "nope", "id": 9}), P.COMMAND_NOT_FOUND, ["nope", "has not been found"]),
    (msgpack.packb({"execute": "migrate"}), P.GENERIC_ERROR, ["Parameter 'uri' is missing"]),
    (msgpack.packb({"execute": "migrate", "arguments": {"uri": 5}}), P.GENERIC_ERROR,
     ["Invalid parameter type for 'uri'", "string", "5"]),
    (msgpack.packb({"execute": "migrate", "arguments": {"uri": True}}), P.GENERIC_ERROR, ["'uri'", "string"]),
    (msgpack.packb({"execute": "migrate", "arguments": {"uri": "tcp:h:1", "detach": True}}), P.GENERIC_ERROR,
     ["Parameter 'detach' is unexpected"]),
    (msgpack.packb({"execute": "query-status", "arguments": {"x": 1}}), P.GENERIC_ERROR, ["'x' is unexpected"]),
    (msgpack.packb({"execute": "quit", "arguments": [1]}), P.GENERIC_ERROR, ["'arguments' must be a map"]),
    (msgpack.packb({"execute": "quit", "extra": 1}), P.GENERIC_ERROR, ["'extra' is unexpected"]),
    (msgpack.packb({"execute": "quit", "id": [1]}), P.GENERIC_ERROR, ["'id' must be an integer or a string"]),
    (msgpack.packb({"execute": "quit", "id": True}), P.GENERIC_ERROR, ["'id'"]),
    (msgpack.packb({"execute": "migrate-set-parameters", "arguments": {1: 2}}), P.GENERIC_ERROR,
     ["argument names must be strings"]),
    (msgpack.packb({"execute": "migrate-set-capabilities", "arguments": {"capabilities": {}}}), P.GENERIC_ERROR,
     ["'capabilities'", "array"]),
    (msgpack.packb({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [1]}}), P.GENERIC_ERROR,
     ["capabilities[0]"]),
    (msgpack.packb({"execute": "migrate-set-capabilities",
                    "arguments": {"capabilities": [{"capability": "xbzrle"}]}}), P.GENERIC_ERROR,
     ["capabilities[0].state' is missing"]),
    (msgpack.packb({"execute": "migrate-set-capabilities",
                    "arguments": {"capabilities": [{"capability": "xbzrle", "state": "on"}]}}), P.GENERIC_ERROR,
     ["capabilities[0].state", "boolean"]),
    (msgpack.packb({"execute": "migrate-set-capabilities",
                    "arguments": {"capabilities": [{"capability": "x", "state": True, "y": 1}]}}), P.GENERIC_ERROR,
     ["is unexpected"]),
    (msgpack.packb({"execute": "migrate", "arguments": {"uri": msgpack.ExtType(5, b"x")}}), P.GENERIC_ERROR,
     ["'uri'"]),
    (b"\xa3\xff\xfe\xfd", P.GENERIC_ERROR, ["not valid msgpack"]),  # str with invalid UTF-8
    (b"\x80" * 2, P.GENERIC_ERROR, ["not valid msgpack"]),  # ExtraData
    (b"\x91" * 100_000, P.GENERIC_ERROR, ["not valid msgpack"]),  # nesting deeper than msgpack allows
    (b"\x00" * (P.MAX_REQUEST_BYTES + 1), P.GENERIC_ERROR, ["larger than"]),
])
def test_bad_requests(body, klass, words):
    with pytest.raises(P.RequestError) as ei:
        P.decode_request(body)
    assert ei.value.klass == klass
    for w in words:
        assert w in ei.value.desc, (w, ei.value.desc)


def test_error_keeps_the_id_once_readable():
    with pytest.raises(P.RequestError) as ei:
        P.decode_request(msgpack.packb({"id": "abc", "execute": "migrate", "arguments": {}}))
    assert ei.value.id == "abc"
    with pytest.raises(P.RequestError) as ei:
        P.decode_request(msgpack.packb({"id": {"x": 1}, "execute": "quit"}))
    assert ei.value.id is None  # an id we cannot echo safely


def test_reply_and_event_shapes():
    assert P.ok_reply(1, None) == {"id": 1, "return": {}}
    assert P.error_reply(2, P.GENERIC_ERROR, "bad") == {"id": 2, "error": {"class": "GenericError", "desc": "bad"}}
    ev = P.event("MIGRATION", {"status": "active"}, t=1700000000.25)
    assert ev == {"event": "MIGRATION", "data": {"status": "active"},
                  "timestamp": {"seconds": 1700000000, "microseconds": 250000}}
    assert P.event_time(ev) == pytest.approx(1700000000.25)


def test_pack_never_fails_on_engine_values():
    import numpy as np

    body = P.pack({"a": np.int64(5), "b": np.float32(1.5), "c": {1, 2}, "d": (1, 2), "e": object()})
    out = P.unpack(body)
    assert out["a"] == 5 and out["b"] == 1.5 and sorted(out["c"]) == [1, 2] and out["d"] == [1, 2]
    assert isinstance(out["e"], str)


def test_every_verb_is_documented():
    for v in P.VERBS.values():
        assert v.doc and set(v.roles) <= {"source", "destination"}


# --- endpoints -----------------------------------------------------------------------

@pytest.mark.parametrize("ep, curve", [
    ("ipc:///tmp/x.ctl", False), ("tcp://127.0.0.1:5555", False), ("tcp://127.9.9.9:0", False),
    ("tcp://localhost:5555", False), ("tcp://[::1]:5555", False),
    ("tcp://0.0.0.0:5555", True), ("tcp://*:5555", True), ("tcp://10.0.0.2:5555", True),
    ("tcp://[::]:5555", True), ("tcp://worker-b.example:5555", True), ("tcp://eth0:5555", True),
])
def test_curve_required_off_loopback(ep, curve):
    assert E.requires_curve(ep) is curve
    if curve:
        with pytest.raises(E.EndpointError, match="CURVE"):
            E.refuse_without_curve(ep)
    else:
        E.refuse_without_curve(ep)


@pytest.mark.parametrize("bad", ["udp://1.2.3.4:5", "tcp://nohost", "tcp://h:70000", "tcp://h:x", "ipc://",
                                 "tcp:127.0.0.1:5", 5])
def test_bad_endpoints(bad):
    with pytest.raises(E.EndpointError):
        E.check(bad)


def test_event_endpoints():
    assert E.default_events_endpoint("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5556"
    assert E.default_events_endpoint("tcp://127.0.0.1:0") == "tcp://127.0.0.1:0"
    assert E.default_events_endpoint("tcp://[::1]:7") == "tcp://[::1]:8"
    assert E.default_events_endpoint("ipc:///run/w.ctl") == "ipc:///run/w.ctl.events"
    with pytest.raises(E.EndpointError):
        E.default_events_endpoint("tcp://127.0.0.1:65535")
    assert E.reachable("tcp://0.0.0.0:5556", "tcp://10.1.2.3:5555") == "tcp://10.1.2.3:5556"
    assert E.reachable("tcp://10.9.9.9:5556", "tcp://10.1.2.3:5555") == "tcp://10.9.9.9:5556"
    assert E.reachable("ipc:///a.events", "ipc:///a") == "ipc:///a.events"


def test_migration_uris_for_the_destination():
    assert default_uri("tcp://10.0.0.2:5555") == "tcp:10.0.0.2:0"
    assert default_uri("tcp://0.0.0.0:5555") == "tcp:127.0.0.1:0"
    assert default_uri("ipc:///x") == "tcp:127.0.0.1:0"
    assert dialable_uri("tcp:0.0.0.0:4444", "tcp://10.0.0.2:5555") == "tcp:10.0.0.2:4444"
    assert dialable_uri("tcp:127.0.0.1:4444", "ipc:///x") == "tcp:127.0.0.1:4444"
    assert dialable_uri("unix:/tmp/m.sock", "tcp://10.0.0.2:5555") == "unix:/tmp/m.sock"


def test_cli_cap_and_param_values():
    assert parse_cap("return-path") == ("return-path", True)
    assert parse_cap("return-path=off") == ("return-path", False)
    with pytest.raises(ValueError, match="not on or off"):
        parse_cap("return-path=maybe")
    assert parse_param("downtime-limit=100") == ("downtime-limit", 100)
    assert parse_param("max-bandwidth=64M") == ("max-bandwidth", 64 << 20)
    # Not a number: passed on as text, for engine.params to name the field and the range.
    assert parse_param("downtime-limit=soon") == ("downtime-limit", "soon")
    with pytest.raises(ValueError):
        parse_param("downtime-limit")
    assert "downtime-limit" in PARAMETERS
