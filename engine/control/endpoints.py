"""Control endpoints: which need CURVE, where a worker's event stream is.

A worker has two ZeroMQ endpoints: the control endpoint (requests and
replies) given on its command line, and the event endpoint (PUB stream),
by default the next TCP port, or ``PATH.events`` for ``ipc://PATH``.
"""
from __future__ import annotations

import ipaddress

WILDCARD_HOSTS = ("*", "0.0.0.0", "::", "[::]")


class EndpointError(ValueError):
    """A control endpoint that Ferry cannot use, with the reason."""


def split_tcp(endpoint: str) -> tuple[str, str]:
    """``tcp://HOST:PORT`` -> (HOST, PORT); PORT may be ``*`` or ``0``."""
    rest = endpoint[len("tcp://"):]
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
    else:
        host, sep, port = rest.rpartition(":")
    if not sep or not host or not port:
        raise EndpointError(f"control endpoint {endpoint!r}: expected tcp://HOST:PORT")
    if port != "*" and not (port.isdigit() and 0 <= int(port) <= 65535):
        raise EndpointError(f"control endpoint {endpoint!r}: port {port!r} is not 0..65535 or *")
    return host, port


def join_tcp(host: str, port: str | int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def check(endpoint: str) -> str:
    """Validate a control endpoint (tcp:// or ipc://); returns it unchanged."""
    if not isinstance(endpoint, str):
        raise EndpointError(f"control endpoint {endpoint!r}: expected tcp://HOST:PORT or ipc://PATH")
    if endpoint.startswith("tcp://"):
        split_tcp(endpoint)
        return endpoint
    if endpoint.startswith("ipc://"):
        if len(endpoint) == len("ipc://"):
            raise EndpointError(f"control endpoint {endpoint!r}: empty path")
        return endpoint
    raise EndpointError(f"control endpoint {endpoint!r}: expected tcp://HOST:PORT or ipc://PATH "
                        "(the migration stream uses tcp:H:P, unix:PATH, file:PATH; the control plane "
                        "uses ZeroMQ endpoints)")


def is_loopback(endpoint: str) -> bool:
    """True for ipc:// and for tcp:// on a loopback address (or localhost)."""
    if endpoint.startswith("ipc://") or endpoint.startswith("inproc://"):
        return True
    host, _ = split_tcp(endpoint)
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # A host name or interface other than the above may reach other hosts.
        return False


def requires_curve(endpoint: str) -> bool:
    """Workers on anything but loopback or ipc must authenticate their clients."""
    return not is_loopback(endpoint)


def refuse_without_curve(endpoint: str) -> None:
    """Raise EndpointError if a worker may not bind ``endpoint`` without CURVE keys."""
    if requires_curve(endpoint):
        raise EndpointError(
            f"endpoint {endpoint} is reachable from other hosts: CURVE authentication is required. "
            "Create keys with `ferry keys DIR` and pass --curve-dir DIR (see docs/multi-host.md), "
            "or bind to 127.0.0.1 or ipc://")


def default_events_endpoint(control: str) -> str:
    """The event stream next to a control endpoint: port + 1 (or any port), or PATH.events."""
    if control.startswith("ipc://"):
        return control + ".events"
    host, port = split_tcp(control)
    if port in ("*", "0"):
        return join_tcp(host, port)
    p = int(port)
    if p == 65535:
        raise EndpointError(f"control endpoint {control!r}: no port left for the event stream; "
                            "give --events explicitly")
    return join_tcp(host, p + 1)


def reachable(bound: str, via: str) -> str:
    """A worker's bound endpoint as a client should dial it.

    A worker bound to a wildcard (``tcp://0.0.0.0:5556``) is dialled at the host
    the client used for its control endpoint (``via``).
    """
    if not bound.startswith("tcp://") or not via.startswith("tcp://"):
        return bound
    host, port = split_tcp(bound)
    if host in WILDCARD_HOSTS:
        vhost, _ = split_tcp(via)
        return join_tcp(vhost, port)
    return bound


def ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None
