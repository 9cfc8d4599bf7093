"""The channel hello between Ferry workers: identity and the version/feature handshake.

Every migration connection between Ferry workers opens with a hello from the
connecting side (the source) naming the migration, the channel's role and
index, the wire version and the features that change the stream's format,
authenticated with HMAC-SHA256 keyed by the per-migration secret (the
``migration-secret`` parameter, handed to both workers over the control
plane). The listening side answers with a reply, authenticated the same way
over the hello's HMAC, that accepts the channel or names a mismatch. Bytes
are laid out in channels/constants.py; docs/protocol.md, "Channel hello".

The codec here is sans-I/O (encode/parse of bytes); :func:`send_hello` and
:func:`read_hello` / :func:`read_reply` do the blocking exchange over a
Transport. QEMU has no such hello: with ``peer=qemu`` none is sent (QEMU
tells channels apart by arrival order).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from . import constants as C
from .errors import ChannelError, ProtocolError

_FIXED = struct.Struct(f">8sHBB{C.FERRY_HELLO_ID_SIZE}s{C.FERRY_HELLO_NONCE_SIZE}sH")
_REPLY = struct.Struct(">8sBH")
assert _FIXED.size == C.FERRY_HELLO_FIXED_SIZE


class HelloError(ProtocolError):
    """A channel hello or its reply was malformed, unauthenticated or refused."""


class HelloRefused(HelloError):
    """A connection could not prove it belongs to this migration (magic, id, HMAC, role, index, replay)."""


class WireMismatch(HelloError):
    """The two workers differ in wire version or in a feature that changes the stream's format.

    ``differences``: ``{name: (source value, destination value)}``.
    """

    def __init__(self, message: str, differences: dict | None = None):
        super().__init__(message)
        self.differences = differences or {}


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``migration-secret`` (any text; empty = no proof, identity only)."""
    return secret.encode("utf-8")


def migration_id(secret: str) -> bytes:
    """The 16-byte migration id a secret names (a digest: the id does not reveal the secret)."""
    return hashlib.sha256(b"ferry-migration-id\0" + secret_key(secret)).digest()[:C.FERRY_HELLO_ID_SIZE]


def encode_features(features: dict) -> bytes:
    """``{name: value}`` as sorted UTF-8 ``name=value`` lines (bool as on/off)."""
    lines = []
    for k in sorted(features):
        v = features[k]
        v = ("on" if v else "off") if isinstance(v, bool) else str(v)
        if "\n" in k or "=" in k or "\n" in v:
            raise ValueError(f"hello feature {k!r}={v!r}: names hold no '=' or newline, values no newline")
        lines.append(f"{k}={v}")
    data = "\n".join(lines).encode("utf-8")
    if len(data) > C.FERRY_HELLO_MAX_FEATURES:
        raise ValueError(f"hello features: {len(data)} bytes, at most {C.FERRY_HELLO_MAX_FEATURES}")
    return data


def parse_features(data: bytes) -> dict:
    """Inverse of encode_features (values stay text). HelloError names a malformed line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HelloError(f"hello features: not UTF-8 ({e})") from None
    out = {}
    for line in text.split("\n") if text else []:
        k, sep, v = line.partition("=")
        if not sep or not k:
            raise HelloError(f"hello features: malformed line {line!r}, expected name=value")
        out[k] = v
    return out


def compare_features(source: dict, dest: dict) -> dict:
    """``{name: (source value, destination value)}`` for every feature that differs ('-' = absent)."""
    return {k: (source.get(k, "-"), dest.get(k, "-")) for k in sorted(set(source) | set(dest))
            if source.get(k, "-") != dest.get(k, "-")}


@dataclass(frozen=True)
class Hello:
    """A parsed hello: ``mac`` is its HMAC (the reply authenticates over it)."""

    version: int
    role: int
    index: int
    migration: bytes
    nonce: bytes
    features: dict
    mac: bytes

    @property
    def channel(self) -> str:
        """``main`` or ``postcopy-N``, for messages."""
        name = C.FERRY_HELLO_ROLE_NAMES.get(self.role, f"role {self.role}")
        return name if self.role == C.FERRY_HELLO_ROLE_MAIN else f"{name}-{self.index}"


def encode_hello(secret: str, role: int, index: int, features: dict, nonce: bytes | None = None,
                 version: int = C.FERRY_WIRE_VERSION) -> bytes:
    """The hello bytes (FERRY_HELLO_FIXED_SIZE + features + 32). ``nonce``: 16 bytes, random if None."""
    nonce = os.urandom(C.FERRY_HELLO_NONCE_SIZE) if nonce is None else nonce
    feats = encode_features(features)
    body = _FIXED.pack(C.FERRY_HELLO_MAGIC, version, role, index, migration_id(secret), nonce, len(feats)) + feats
    return body + hmac.new(secret_key(secret), body, hashlib.sha256).digest()


def parse_hello_fixed(head: bytes) -> tuple[int, int, int, bytes, bytes, int]:
    """(version, role, index, migration id, nonce, features length) of the fixed part.

    HelloRefused when the magic is wrong (it names what the bytes look like:
    a TLS ClientHello, QEMU's stream header), HelloError for a length over the bound.
    """
    magic, version, role, index, mid, nonce, flen = _FIXED.unpack(head)
    if magic != C.FERRY_HELLO_MAGIC:
        raise HelloRefused(f"not a Ferry channel hello: first bytes {bytes(head[:8]).hex()}{_looks_like(head)}")
    if flen > C.FERRY_HELLO_MAX_FEATURES:
        raise HelloError(f"hello features length {flen}: at most {C.FERRY_HELLO_MAX_FEATURES}")
    return version, role, index, mid, nonce, flen


def _looks_like(head: bytes) -> str:
    if head[:1] == b"\x16" and head[1:2] == b"\x03":
        return " (a TLS handshake: the peer uses tls-creds and this side does not)"
    if head[:4] == C.QEMU_VM_FILE_MAGIC.to_bytes(4, "big"):
        return " (QEMU's stream header: the peer sends no hello; is it a QEMU, peer=qemu?)"
    return ""


def verify_hello(secret: str, head: bytes, feats: bytes, mac: bytes) -> Hello:
    """Check a whole hello (fixed part, features, HMAC) against ``secret``. HelloRefused says why."""
    version, role, index, mid, nonce, _ = parse_hello_fixed(head)
    want = hmac.new(secret_key(secret), bytes(head) + bytes(feats), hashlib.sha256).digest()
    if mid != migration_id(secret):
        raise HelloRefused(f"hello for migration {mid.hex()}, this is {migration_id(secret).hex()} "
                           "(another migration, or a different migration-secret)")
    if not hmac.compare_digest(want, bytes(mac)):
        raise HelloRefused("hello HMAC does not verify: the connecting side does not hold this migration's "
                           "migration-secret")
    if role not in C.FERRY_HELLO_ROLE_NAMES:
        raise HelloRefused(f"hello role {role}: expected 0 (main), 1 (postcopy) or 2 (multifd)")
    return Hello(version, role, index, mid, nonce, parse_features(feats), bytes(mac))


def encode_reply(secret: str, hello_mac: bytes, status: int, message: str = "") -> bytes:
    """The reply to a verified hello; its HMAC covers the hello's, so it cannot be replayed."""
    msg = message.encode("utf-8")[:C.FERRY_HELLO_MAX_MESSAGE]
    body = _REPLY.pack(C.FERRY_HELLO_REPLY_MAGIC, status, len(msg)) + msg
    return body + hmac.new(secret_key(secret), hello_mac + body, hashlib.sha256).digest()


# --- blocking exchange over a Transport ---

def recv_exact(transport, n: int, what: str) -> bytes:
    """Exactly ``n`` bytes from ``transport``; ChannelError naming ``what`` on a closed connection,
    an error or a timeout (with how many bytes came)."""
    buf = bytearray(n)
    mv = memoryview(buf)
    got = 0
    while got < n:
        try:
            r = transport.recv_into(mv[got:])
        except OSError as e:
            raise ChannelError(f"{what}: {_why(e)} after {got} of {n} bytes") from e
        if r == 0:
            raise ChannelError(f"{what}: the peer closed the connection after {got} of {n} bytes")
        got += r
    return bytes(buf)


def _why(e: OSError) -> str:
    from .transport import TIMEOUT_ERRNOS
    if e.errno in TIMEOUT_ERRNOS:
        return "no byte within the handshake bound (liveness-timeout)"
    return e.strerror or str(e)


def send_bytes(transport, data: bytes) -> None:
    """Send ``data`` whole on a Transport (TLS or plain socket); OSError on failure."""
    send = getattr(transport, "send_all", None)
    if send is not None:
        send(data)
    else:
        transport.sock.sendall(data)


def read_hello(transport, secret: str) -> Hello:
    """Read one hello from ``transport`` and verify it; HelloRefused/HelloError/ChannelError."""
    head = recv_exact(transport, C.FERRY_HELLO_FIXED_SIZE, "channel hello")
    flen = parse_hello_fixed(head)[5]
    feats = recv_exact(transport, flen, "channel hello features") if flen else b""
    mac = recv_exact(transport, C.FERRY_HELLO_MAC_SIZE, "channel hello HMAC")
    return verify_hello(secret, head, feats, mac)


def read_reply(transport, secret: str, hello_bytes: bytes) -> str:
    """Read the reply to ``hello_bytes``; returns its message on FERRY_HELLO_OK.

    Raises WireMismatch (the destination's message) on FERRY_HELLO_MISMATCH,
    HelloRefused when the reply does not verify (not this migration's
    destination), ChannelError when the connection ends first (the
    destination refused the hello: wrong secret, TLS on one side only).
    """
    try:
        head = recv_exact(transport, _REPLY.size, "channel hello reply")
    except ChannelError as e:
        raise ChannelError(f"{e} (the destination refused the channel hello: is migration-secret the same on "
                           "both sides, and tls-creds set on both or neither?)") from e
    magic, status, mlen = _REPLY.unpack(head)
    if magic != C.FERRY_HELLO_REPLY_MAGIC:
        raise HelloRefused(f"not a Ferry hello reply: first bytes {head[:8].hex()}{_looks_like(head)}")
    if mlen > C.FERRY_HELLO_MAX_MESSAGE:
        raise HelloError(f"hello reply message length {mlen}: at most {C.FERRY_HELLO_MAX_MESSAGE}")
    msg = recv_exact(transport, mlen, "channel hello reply") if mlen else b""
    mac = recv_exact(transport, C.FERRY_HELLO_MAC_SIZE, "channel hello reply HMAC")
    hello_mac = hello_bytes[-C.FERRY_HELLO_MAC_SIZE:]
    want = hmac.new(secret_key(secret), hello_mac + head + msg, hashlib.sha256).digest()
    text = msg.decode("utf-8", "replace")
    if not hmac.compare_digest(want, mac):
        raise HelloRefused("hello reply HMAC does not verify: the listening side does not hold this "
                           "migration's migration-secret")
    if status == C.FERRY_HELLO_MISMATCH:
        raise WireMismatch(f"destination refused the migration: {text}")
    if status != C.FERRY_HELLO_OK:
        raise HelloError(f"hello reply status {status}: expected 0 (ok) or 1 (mismatch)")
    return text
