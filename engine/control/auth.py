"""CURVE keys for the control plane: create them, and put them on sockets.

``ferry keys DIR`` writes one key directory holding both key pairs::

    DIR/server.key            worker's public key        (clients need it)
    DIR/server.key_secret     worker's secret key        (worker hosts only)
    DIR/client.key            client's public key
    DIR/client.key_secret     client's secret key        (controller hosts only)
    DIR/authorized_clients/   public keys a worker accepts (client.key to start with)

A worker started with ``--curve-dir DIR`` is a CURVE server on both its
sockets and runs a ZAP authenticator that admits only the client keys in
``DIR/authorized_clients``; a client with ``--curve-dir DIR`` uses
``client.key_secret`` and pins ``server.key``. A client without keys, or with
keys not in ``authorized_clients``, never completes the handshake.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

SERVER = "server"
CLIENT = "client"
AUTHORIZED = "authorized_clients"
ZAP_DOMAIN = b"ferry"
SECRET_MODE = 0o600  # secret key files: owner read/write only


class CurveKeyError(ValueError):
    """A key directory that is missing or incomplete, with what to do about it."""


def create_keys(directory: str | os.PathLike, force: bool = False) -> dict[str, str]:
    """Create the server and client key pairs in ``directory``; returns the file paths."""
    d = Path(directory)
    if not zmq.has("curve"):
        raise CurveKeyError("this libzmq was built without CURVE support")
    existing = [p.name for p in (d / "server.key", d / "client.key") if p.exists()]
    if existing and not force:
        raise CurveKeyError(f"{d} already holds keys ({', '.join(existing)}); use --force to replace them "
                        "(every worker and client using them will need the new ones)")
    d.mkdir(parents=True, exist_ok=True)
    (d / AUTHORIZED).mkdir(exist_ok=True)
    out = {}
    for name in (SERVER, CLIENT):
        # Secret keys are created owner-only (no moment at the umask's mode);
        # a file replaced with --force keeps no wider mode either.
        old_umask = os.umask(0o077)
        try:
            pub, sec = zmq.auth.create_certificates(d, name)
        finally:
            os.umask(old_umask)
        os.chmod(sec, SECRET_MODE)
        os.chmod(pub, 0o644)  # public keys are meant to be copied
        out[f"{name}-public"], out[f"{name}-secret"] = pub, sec
    # The worker admits the client key it was created with; add more public
    # keys to this directory to admit other controllers.
    authorized = d / AUTHORIZED / "client.key"
    authorized.write_bytes(Path(out["client-public"]).read_bytes())
    out["authorized"] = str(authorized)
    return out


def check_secret_mode(path: str | os.PathLike) -> None:
    """Refuse a secret key file that anyone but its owner may read or write (as ssh does).

    Raises CurveKeyError naming the file, its mode and the fix (``chmod 600``).
    """
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise CurveKeyError(f"CURVE secret key file {path} has mode {mode:04o}: it is readable or writable by "
                            f"others, so the key may be known to them; run `chmod 600 {path}` (or create new "
                            "keys with `ferry keys DIR --force`)")


def _load(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    if not path.exists():
        raise CurveKeyError(f"CURVE key file {path} not found; create keys with `ferry keys DIR` and copy the "
                        "directory (see docs/multi-host.md)")
    if need_secret:
        check_secret_mode(path)
    try:
        pub, sec = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise CurveKeyError(f"CURVE key file {path}: {e}") from None
    if need_secret and not sec:
        raise CurveKeyError(f"CURVE key file {path} has no secret key")
    return pub, sec


@dataclass(frozen=True)
class ServerKeys:
    """What a worker needs: its own key pair and the directory of admitted client keys."""

    public: bytes
    secret: bytes
    authorized_dir: str

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ServerKeys":
        d = Path(directory)
        pub, sec = _load(d / "server.key_secret", True)
        auth = d / AUTHORIZED
        if not auth.is_dir() or not any(auth.glob("*.key")):
            raise CurveKeyError(f"{auth} holds no client public keys (*.key): no client could connect")
        return cls(pub, sec, str(auth))

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server (call before bind)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN


@dataclass(frozen=True)
class ClientKeys:
    """What a controller needs: its key pair and the worker's public key."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ClientKeys":
        d = Path(directory)
        pub, sec = _load(d / "client.key_secret", True)
        spub, _ = _load(d / "server.key", False)
        return cls(pub, sec, spub)

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the worker (call before connect)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public


def start_authenticator(ctx: zmq.Context, keys: ServerKeys):
    """Run a ZAP handler in the current asyncio loop admitting only authorized client keys."""
    from zmq.auth.asyncio import AsyncioAuthenticator

    auth = AsyncioAuthenticator(ctx)
    auth.start()
    # pyzmq matches the ZAP domain exactly ("*" only stands for an empty domain).
    auth.configure_curve(domain=ZAP_DOMAIN.decode(), location=keys.authorized_dir)
    return auth
