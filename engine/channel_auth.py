"""Who may use a migration channel: TLS, the channel hello and the version handshake, both sides.

Source side, :func:`open_channel`: connect, TLS client handshake when
``tls-creds`` is set, then (Ferry peer) the hello naming the role and index
and the format-changing features; it waits for the destination's reply
before any stream byte, so a mismatch (WireMismatch) fails the migration
before ``active`` with the guest untouched. The hello is sent when there is
something to prove it with: a ``migration-secret`` (``ferry migrate`` always
sets a fresh one) or TLS. Without either (the engine driven directly, as
tests and local tools do) channels go by arrival order, as with QEMU, and a
``peer=ferry`` destination takes a QEMU source as it comes.

Destination side, :class:`ChannelGate`: every accepted connection gets its
own thread for the TLS handshake and the hello (bounded by
``liveness-timeout``), so a connection that never finishes its handshake
holds nothing up. A connection that cannot prove it belongs (no TLS, a
certificate from another CA, a client not in ``tls-authz``, a wrong
migration or secret, a replayed hello, an index already taken) is refused
and logged; the gate keeps accepting until the expected channel arrives. A
verified hello whose features differ gets a MISMATCH reply and is closed;
the destination's state does not change. With ``peer=qemu`` no hello is
exchanged: QEMU's rule, arrival order, applies (under TLS when set).
"""
from __future__ import annotations

import logging
import threading
import time

from ferry_migrate.channels import constants as C
from ferry_migrate.channels import hello as H
from ferry_migrate.channels import tls as T
from ferry_migrate.channels.errors import ChannelError
from ferry_migrate.channels.transport import MigrationURI, Transport, connect, parse_uri

from .peer import peer_features

log = logging.getLogger("ferry.channels")

HELLO_TIMEOUT = 30.0  # s a handshake may take when liveness-timeout is 0 (off)
ROLE_MAIN = C.FERRY_HELLO_ROLE_MAIN
ROLE_POSTCOPY = C.FERRY_HELLO_ROLE_POSTCOPY
ROLE_MULTIFD = C.FERRY_HELLO_ROLE_MULTIFD


class PlaintextRefused(ValueError):
    """A migration address off loopback without tls-creds, and plaintext-off-loopback not set."""


def handshake_timeout(cfg) -> float:
    """Seconds a TLS handshake or hello may take: liveness-timeout, or HELLO_TIMEOUT when that is off."""
    return cfg.param("liveness-timeout") or HELLO_TIMEOUT


def wire_features(cfg) -> dict:
    """Capabilities and parameters that change the stream's format, as the hello carries them."""
    f = {"postcopy-ram": cfg.cap("postcopy-ram"), "postcopy-preempt": cfg.cap("postcopy-preempt")}
    if cfg.cap("postcopy-preempt"):
        f["postcopy-channels"] = cfg.param("postcopy-channels")
        f["preempt-dialect"] = cfg.param("preempt-dialect")
    if peer_features(cfg.param("peer")).rp_keepalive:
        f["rp-keepalive"] = True  # the source bounds the return path's silence (docs/reliability.md)
    for name in ("page-checksums", "multifd"):  # where this build has them
        if name in cfg.caps:
            f[name] = cfg.cap(name)
    if cfg.caps.get("multifd"):
        f["multifd-channels"] = cfg.param("multifd-channels")
    return f


def check_plaintext(cfg, uri: str | MigrationURI, side: str) -> None:
    """PlaintextRefused for a TCP address off loopback without TLS, unless plaintext-off-loopback."""
    u = parse_uri(uri) if isinstance(uri, str) else uri
    if u.scheme != "tcp" or cfg.param("tls-creds") or cfg.param("plaintext-off-loopback"):
        return
    if not T.is_loopback(u.host):
        raise PlaintextRefused(f"{side} {u}: a migration off loopback needs tls-creds (guest memory would cross "
                               "the network in the clear and anyone could connect); set plaintext-off-loopback "
                               "to true to allow it anyway")


def _creds(cfg):
    d = cfg.param("tls-creds")
    return T.load_creds(d) if d else None


def open_channel(uri: str | MigrationURI, cfg, role: int, index: int) -> Transport:
    """Connect one migration channel and prove it (source side); returns its transport.

    Raises ConnectionError (connect), TLSError, ChannelError/HelloRefused
    (the destination refused or is not this migration's), WireMismatch.
    """
    u = parse_uri(uri) if isinstance(uri, str) else uri
    check_plaintext(cfg, u, "connecting to")
    creds = _creds(cfg)
    t = connect(u, liveness=cfg.param("liveness-timeout"))
    try:
        bound = handshake_timeout(cfg)
        if creds is not None and u.scheme != "file":
            t = T.client_wrap(t, creds, cfg.param("tls-hostname") or u.host or "localhost", bound)
        secret = cfg.param("migration-secret")
        if _hello(cfg) and u.scheme != "file" and (secret or creds is not None):
            data = H.encode_hello(secret, role, index, wire_features(cfg))
            t.set_recv_timeout(bound)
            t.set_send_timeout(bound)
            try:
                H.send_bytes(t, data)
            except OSError as e:
                raise ChannelError(f"channel hello to {u}: {e.strerror or e}") from e
            H.read_reply(t, secret, data)
            t.set_recv_timeout(None)
            t.set_send_timeout(None)
    except BaseException:
        t.close()
        raise
    return t


class ChannelGate:
    """The destination's door: hands out only connections that proved they belong (module docstring).

    ``refused``: (peer address, reason) of every refused connection, newest
    last (also logged at WARNING on the ``ferry.channels`` logger).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self._cond = threading.Condition()
        self._ready: dict = {}  # (role, index) -> (transport, hello) verified, not yet taken
        self._order: list = []  # verified connections without a hello (QEMU peer), in arrival order
        self._taken: set = set()
        self._nonces: set = set()
        self.refused: list[tuple[str, str]] = []
        self.mismatch: H.WireMismatch | None = None
        self._closed = False

    @property
    def active(self) -> bool:
        """False when connections pass as accepted, by arrival order (no TLS, and a QEMU peer or
        no migration-secret: nothing to prove anything with)."""
        return bool(self.cfg.param("tls-creds")) or (_hello(self.cfg) and bool(self.cfg.param("migration-secret")))

    def accept(self, listener, role: int, index: int, timeout: float) -> Transport:
        """The next verified connection for (role, index), waiting up to ``timeout`` s; TimeoutError."""
        if not self.active or listener.uri.scheme == "file":
            return listener.accept(timeout=timeout)  # a file has no peer to prove anything
        deadline = time.monotonic() + timeout
        if role == ROLE_MAIN:
            with self._cond:
                self._taken.clear()  # a new main channel: a new set of POSTCOPY channels
        while True:
            got = self._take(role, index)
            if got is not None:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no verified connection yet")
            try:
                t = listener.accept(timeout=min(left, 0.05))
            except TimeoutError:
                with self._cond:
                    self._cond.wait(min(max(0.0, deadline - time.monotonic()), 0.05))
                continue
            threading.Thread(target=self._handshake, args=(t,), name="channel-handshake", daemon=True).start()
            # A source opens its channels one after another, each waiting for its reply: wait for
            # this handshake (it notifies) rather than in accept for a connection that cannot come
            # yet, which cost up to the poll interval per channel (seconds for many multifd channels).
            with self._cond:
                self._cond.wait_for(lambda: self._has(role, index) or self._closed,
                                    min(max(0.0, deadline - time.monotonic()), 0.05))

    def _has(self, role: int, index: int) -> bool:
        """A verified connection for (role, index) waits to be taken (call with the lock held)."""
        return bool(self._order) if not _hello(self.cfg) else (role, index) in self._ready

    def _take(self, role: int, index: int):
        with self._cond:
            if not _hello(self.cfg):
                return self._order.pop(0) if self._order else None
            entry = self._ready.pop((role, index), None)
            if entry is None:
                return None
            self._taken.add((role, index))
        t, hello = entry
        secret = self.cfg.param("migration-secret")
        try:
            H.send_bytes(t, H.encode_reply(secret, hello.mac, C.FERRY_HELLO_OK))
        except OSError as e:
            self._refuse(t, f"{hello.channel}: reply failed: {e.strerror or e}")
            return None
        t.set_recv_timeout(None)
        t.set_send_timeout(None)
        log.info("migration channel %s accepted from %s", hello.channel, _peer(t))
        return t

    def _refuse(self, t: Transport, why: str) -> None:
        addr = _peer(t)
        log.warning("migration connection from %s refused: %s", addr, why)
        with self._cond:
            self.refused.append((addr, why))
        t.close()

    def _handshake(self, t: Transport) -> None:
        cfg = self.cfg
        bound = handshake_timeout(cfg)
        try:
            creds = _creds(cfg)
            if creds is not None:
                t = T.server_wrap(t, creds, cfg.param("tls-authz"), bound)
            if not _hello(cfg):
                with self._cond:
                    self._order.append(t)
                    self._cond.notify_all()
                return
            secret = cfg.param("migration-secret")
            t.set_recv_timeout(bound)
            t.set_send_timeout(bound)
            hello = H.read_hello(t, secret)
            ours = wire_features(cfg)
            diff = H.compare_features(hello.features, {k: _text(v) for k, v in ours.items()})
            if hello.version != C.FERRY_WIRE_VERSION:
                diff = {"wire version": (str(hello.version), str(C.FERRY_WIRE_VERSION)), **diff}
            if diff:
                msg = "; ".join(f"{k}: source {a}, destination {b}" for k, (a, b) in diff.items())
                err = H.WireMismatch(f"destination refused the migration: {msg}", diff)
                with self._cond:
                    self.mismatch = err
                try:
                    H.send_bytes(t, H.encode_reply(secret, hello.mac, C.FERRY_HELLO_MISMATCH, msg))
                except OSError:
                    pass
                self._refuse(t, f"{hello.channel}: {msg}")
                return
            with self._cond:
                if hello.nonce in self._nonces:
                    raise H.HelloRefused(f"{hello.channel}: a replayed hello (its nonce was seen before)")
                self._nonces.add(hello.nonce)
                key = (hello.role, hello.index)
                if key in self._taken or key in self._ready:
                    raise H.HelloRefused(f"{hello.channel}: index already taken by a verified connection")
                if self._closed:
                    raise H.HelloRefused(f"{hello.channel}: the incoming migration has ended")
                self._ready[key] = (t, hello)
                self._cond.notify_all()
        except (ChannelError, OSError) as e:  # TLSError, HelloRefused, timeouts, resets
            self._refuse(t, str(e))
        except Exception as e:  # noqa: BLE001 - a bad connection never takes the worker down
            self._refuse(t, f"{type(e).__name__}: {e}")

    def close(self) -> None:
        """Close every verified connection not handed out (the incoming migration ended)."""
        with self._cond:
            self._closed = True
            rest = [t for t, _ in self._ready.values()] + list(self._order)
            self._ready.clear()
            self._order.clear()
        for t in rest:
            t.close()


def _hello(cfg) -> bool:
    """True when the peer speaks the channel hello (a Ferry worker; engine/peer.py)."""
    return peer_features(cfg.param("peer")).channel_hello


def _text(v) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else str(v)


def _peer(t: Transport) -> str:
    try:
        a = t.sock.getpeername()
        return f"{a[0]}:{a[1]}" if isinstance(a, tuple) else (a or "unix")
    except (OSError, AttributeError):
        return "?"
