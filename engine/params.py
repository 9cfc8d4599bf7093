"""Migration capabilities and parameters, with QEMU's names, defaults and ranges.

Validation errors name the field, the value and the allowed range. A
capability or parameter Ferry knows from QEMU but does not implement yet is
refused, never silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass


class ParameterError(ValueError):
    """A capability or parameter was unknown, unimplemented or out of range."""


# name -> (default, implemented, description)
CAPABILITIES: dict[str, tuple[bool, bool, str]] = {
    "return-path": (True, True, "destination answers on the reverse direction of the main stream "
                                "(Ferry enables it by default: the source waits for the destination's "
                                "confirmation before it releases the guest)"),
    "postcopy-ram": (False, True, "switch the guest to the destination early and fetch pages on demand"),
    "postcopy-preempt": (False, True, "send requested pages on separate POSTCOPY channels; a request "
                                      "interrupts a huge page being sent on the PRECOPY channel"),
    "postcopy-blocktime": (False, True, "report time guest threads spend blocked on faults "
                                        "(Ferry measures it always)"),
    "page-checksums": (True, True, "Ferry: a check value per target page, covering its bytes, block and "
                                   "offset, goes before the page; the destination checks it before it places "
                                   "the page and refuses pages (and a stream) without one. Off on both sides "
                                   "for a QEMU peer"),
    "xbzrle": (False, False, "delta-compress repeated pages"),
    "auto-converge": (False, False, "throttle the guest until precopy converges"),
    "multifd": (False, True, "precopy pages travel on multifd-channels further connections, each with its "
                             "own sender and receiver thread; the main channel keeps sections and commands. "
                             "Ferry's own packets: both sides Ferry (docs/protocol.md)"),
    "zero-blocks": (False, False, "skip zero blocks of block devices"),
    "events": (True, True, "emit MIGRATION events (always on in Ferry)"),
    "pause-before-switchover": (False, False, "pause before the switchover"),
}

_MAX_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: object
    lo: int | float | None
    hi: int | float | None
    unit: str
    implemented: bool
    doc: str
    kind: type = int
    choices: tuple = ()
    applies: str = ""  # which side reads it, and when (QEMU's phases: active, postcopy-active, device)
    live: bool = False  # a running migration takes up a change at once (migrate-set-parameters)


PARAMETERS: dict[str, ParamSpec] = {p.name: p for p in [
    ParamSpec("max-bandwidth", 0, 0, _MAX_U64, "bytes/second", True,
              "rate limit of the precopy channel; 0 = unlimited (QEMU's default is 128 MiB/s)",
              applies="source, PRECOPY channel while precopy is active; not while the guest is paused "
                      "(device phase, switch to postcopy), as in QEMU", live=True),
    ParamSpec("downtime-limit", 300, 0, 2_000_000, "milliseconds", True,
              "largest pause of the guest allowed for the stop-and-copy phase",
              applies="source, read at every precopy iteration to decide the stop", live=True),
    ParamSpec("max-postcopy-bandwidth", 0, 0, _MAX_U64, "bytes/second", True,
              "rate limit of the precopy channel once in postcopy; 0 = unlimited",
              applies="source, PRECOPY channel (background pages) from the switch to postcopy on", live=True),
    ParamSpec("postcopy-after-passes", 0, 0, 1000, "passes", True,
              "Ferry: switch to postcopy by itself after this many precopy passes; 0 = never",
              applies="source, checked at every precopy iteration", live=True),
    ParamSpec("postcopy-after-percent", 0, 0, 100, "percent", True,
              "Ferry: switch to postcopy by itself once this share of pages was sent; 0 = never",
              applies="source, checked while precopy sends", live=True),
    ParamSpec("postcopy-channels", 1, 1, 16, "channels", True,
              "Ferry: number of POSTCOPY channels for requested pages (postcopy-preempt); "
              "requests are spread over them",
              applies="both sides, at migrate / migrate-incoming (they must agree)"),
    ParamSpec("urgent-pages-from", "migration-thread", None, None, "", True,
              "Ferry: which thread sends requested pages: the migration thread (QEMU 7.2) or the "
              "return-path thread as soon as the request is read (QEMU 8.0+)", str,
              ("migration-thread", "return-path"),
              applies="source, at migrate"),
    ParamSpec("urgent-thread-nice", 0, -20, 0, "nice value", True,
              "Ferry: nice value of the urgent path's threads (the source's return-path thread, the "
              "destination's POSTCOPY channel loaders and userfaultfd fault thread); 0 = leave them as the "
              "worker runs (engine/urgent.py; needs CAP_SYS_NICE, a refusal is reported in urgent-threads)",
              applies="both sides, as each of those threads starts"),
    ParamSpec("urgent-thread-rt-priority", 0, 0, 99, "priority", True,
              "Ferry: SCHED_FIFO priority of the urgent path's threads (as urgent-thread-nice); 0 = no "
              "real-time scheduling (engine/urgent.py)",
              applies="both sides, as each of those threads starts"),
    ParamSpec("postcopy-receiver", "thread", None, None, "", True,
              "Ferry: what reads and places the pages of a POSTCOPY channel: a thread of the worker, or a "
              "process of its own that places them with UFFDIO_COPY outside the worker's GIL (needs the "
              "guest in its own process and a plain socket; otherwise a thread; engine/urgent_receiver.py)",
              str, ("thread", "process"), applies="destination, as each POSTCOPY channel is accepted"),
    ParamSpec("preempt-break-huge", True, None, None, "", True,
              "Ferry: a request interrupts a huge page being sent on the PRECOPY channel", bool,
              applies="source, at migrate"),
    ParamSpec("preempt-hold-background", True, None, None, "", True,
              "Ferry: hold background pages until requested pages have left the POSTCOPY sockets "
              "(SIOCOUTQ), so they get the whole link", bool,
              applies="source, at the switch to postcopy"),
    ParamSpec("preempt-write-breaks", "step", None, None, "", True,
              "Ferry: with postcopy-preempt, how the migration thread's background writes on the PRECOPY "
              "channel break for requests (engine/send_loop.py, docs/performance.md): 'step' pieces of one "
              "break step (64 KiB - 1 MiB) and 64 KiB small-page runs; 'floor' the same but never below "
              "256 KiB; 'idle' whole records and 1 MiB small-page runs unless a request came in the last "
              "50 ms; 'socket' non-blocking writes as far as the socket takes them, woken by a request "
              "(poll on the socket and an eventfd)", str, ("step", "floor", "idle", "socket"),
              applies="source, at the switch to postcopy"),
    ParamSpec("precopy-notsent-lowat", 128 << 10, 0, 1 << 30, "bytes", True,
              "Ferry: TCP_NOTSENT_LOWAT of the PRECOPY channel from the switch to postcopy on, with "
              "postcopy-preempt: unsent background bytes the kernel may hold ahead of nothing else; "
              "0 = system default",
              applies="source, at the switch to postcopy"),
    ParamSpec("precopy-sndbuf", 0, 0, 1 << 30, "bytes", True,
              "Ferry: SO_SNDBUF of the PRECOPY channel on the source; 0 = system (autotuned)",
              applies="source, when the PRECOPY channel connects"),
    ParamSpec("precopy-rcvbuf", 0, 0, 1 << 30, "bytes", True,
              "Ferry: SO_RCVBUF of the PRECOPY channel on the destination; 0 = system (autotuned)",
              applies="destination, when the PRECOPY channel is accepted"),
    ParamSpec("precopy-pacing-rate", 0, 0, (1 << 63) - 1, "bytes/second", True,
              "Ferry: kernel pacing (SO_MAX_PACING_RATE) of the PRECOPY channel from the switch to "
              "postcopy on, with postcopy-preempt, so background pages leave the bottleneck's queue empty "
              "for requested pages; 0 = automatic (see preempt-pace-background)",
              applies="source, at the switch to postcopy"),
    ParamSpec("preempt-pace-background", True, None, None, "", True,
              "Ferry: with postcopy-preempt and precopy-pacing-rate 0, pace the PRECOPY channel at 90% of "
              "the bandwidth precopy measured (or of max-postcopy-bandwidth; after a switch too early to "
              "measure, of postcopy's first second); not on a loopback connection; false = no pacing", bool,
              applies="source, at the switch to postcopy"),
    ParamSpec("peer", "ferry", None, None, "", True,
              "Ferry: the other end: another Ferry worker, or a real QEMU (CONFIGURATION sent, no "
              "Ferry-only messages, completion on SHUT 0 and the return path closing); see engine/peer.py",
              str, ("ferry", "qemu"), applies="both sides, at migrate / migrate-incoming"),
    ParamSpec("preempt-dialect", "qemu-7.2", None, None, "", True,
              "Ferry: when a source opens its POSTCOPY channels: at setup, ended with EOS (QEMU 7.2), or "
              "at the switch to postcopy, without EOS (QEMU 8.0 and later)", str, ("qemu-7.2", "qemu-8.0"),
              applies="source, at setup and at the switch to postcopy"),
    ParamSpec("machine-type", "pc-i440fx-7.2", None, None, "", True,
              "Ferry: machine type named in the CONFIGURATION record sent to a QEMU peer when the guest "
              "carries none of its own", str, applies="source, at setup (peer qemu)"),
    ParamSpec("liveness-timeout", 30, 0, 86400, "seconds", True,
              "Ferry: a migration channel whose peer accepts or sends no byte for this long fails with "
              "PeerTimeout (socket send/recv timeouts; on TCP also keepalive and TCP_USER_TIMEOUT); "
              "0 = off. See docs/reliability.md, Liveness", float,
              applies="both sides, on every connection as it is made (also those of a recovery)"),
    ParamSpec("tls-creds", "", None, None, "", True,
              "directory of X.509 credentials as QEMU's tls-creds-x509 dir= (ca-cert.pem, server-cert.pem/"
              "server-key.pem, client-cert.pem/client-key.pem; `ferry certs DIR` makes them): every migration "
              "channel runs over TLS, the peer verified on both sides; '' = no TLS", str,
              applies="both sides, on every connection as it is made (also those of a recovery)"),
    ParamSpec("tls-hostname", "", None, None, "", True,
              "name the destination's certificate must carry; '' = the host of the migration URI", str,
              applies="source, on every connection"),
    ParamSpec("tls-authz", "", None, None, "", True,
              "Ferry: client certificates the destination accepts: CNs separated by ',' or DNs separated "
              "by ';'; '' = any certificate the CA signed", str,
              applies="destination, on every connection"),
    ParamSpec("migration-secret", "", None, None, "", True,
              "Ferry: per-migration secret proving every channel's hello (HMAC); `ferry migrate` sets a "
              "fresh one on both workers; never shown by query-migrate-parameters; '' = no proof", str,
              applies="both sides, on every connection between Ferry workers"),
    ParamSpec("plaintext-off-loopback", False, None, None, "", True,
              "Ferry: allow migration channels without TLS on an address off loopback (refused otherwise)",
              bool, applies="both sides, at migrate / migrate-incoming / migrate-recover"),
    ParamSpec("announce-initial", 50, 0, 100_000, "milliseconds", False, "not used by Ferry",
              applies="not implemented"),
    ParamSpec("multifd-channels", 2, 1, 255, "channels", True,
              "connections carrying precopy pages with capability multifd (QEMU's default is 2 too)",
              applies="both sides, at migrate / migrate-incoming (the hello compares them)"),
    ParamSpec("xbzrle-cache-size", 64 << 20, 4096, _MAX_U64, "bytes", False, "XBZRLE cache",
              applies="not implemented"),
    ParamSpec("cpu-throttle-initial", 20, 1, 99, "percent", False, "auto-converge start",
              applies="not implemented"),
    ParamSpec("cpu-throttle-increment", 10, 1, 99, "percent", False, "auto-converge step",
              applies="not implemented"),
]}


# Parameters a running migration takes up at once, as in QEMU (and Ferry's
# switch triggers, read at every iteration); a worker refuses to change the
# others during a migration.
LIVE_PARAMETERS = tuple(n for n, p in PARAMETERS.items() if p.live)


def validate_capability(name: str, value) -> bool:
    if name not in CAPABILITIES:
        raise ParameterError(f"capability {name!r} is unknown; known: {', '.join(sorted(CAPABILITIES))}")
    if not isinstance(value, bool):
        raise ParameterError(f"capability {name!r}: state must be true or false, got {value!r}")
    default, implemented, _ = CAPABILITIES[name]
    if value != default and not implemented:
        raise ParameterError(f"capability {name!r} is not implemented in this version of Ferry")
    return value


def validate_parameter(name: str, value):
    spec = PARAMETERS.get(name)
    if spec is None:
        raise ParameterError(f"parameter {name!r} is unknown; known: {', '.join(sorted(PARAMETERS))}")
    if spec.choices:
        if value not in spec.choices:
            raise ParameterError(f"Parameter {name!r} expects one of {', '.join(map(str, spec.choices))}, "
                                 f"got {value!r}")
    elif spec.kind is bool:
        if not isinstance(value, bool):
            raise ParameterError(f"Parameter {name!r} expects true or false, got {value!r}")
    elif spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParameterError(f"Parameter {name!r} expects an integer in the range of {spec.lo} to "
                                 f"{spec.hi} {spec.unit}, got {value!r}")
    elif spec.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParameterError(f"Parameter {name!r} expects a number in the range of {spec.lo} to "
                                 f"{spec.hi} {spec.unit}, got {value!r}")
    elif not isinstance(value, spec.kind):
        raise ParameterError(f"Parameter {name!r} expects a {spec.kind.__name__}, got {value!r}")
    if spec.lo is not None and spec.kind in (int, float) and (value < spec.lo or value > spec.hi):
        raise ParameterError(f"Parameter {name!r} expects a value in the range of {spec.lo} to "
                             f"{spec.hi} {spec.unit}, got {value}")
    if value != spec.default and not spec.implemented:
        raise ParameterError(f"parameter {name!r} is not implemented in this version of Ferry")
    return value


class MigrationConfig:
    """Capabilities and parameters of one side, with validated updates."""

    def __init__(self):
        self.caps = {n: v[0] for n, v in CAPABILITIES.items()}
        self.params = {n: s.default for n, s in PARAMETERS.items()}

    def set_capabilities(self, caps: dict) -> None:
        """All-or-nothing: nothing changes if one entry is bad."""
        checked = {n: validate_capability(n, v) for n, v in caps.items()}
        self.caps.update(checked)

    def set_parameters(self, params: dict) -> None:
        checked = {n: validate_parameter(n, v) for n, v in params.items()}
        self.params.update(checked)

    def cap(self, name: str) -> bool:
        return self.caps[name]

    def param(self, name: str):
        return self.params[name]
