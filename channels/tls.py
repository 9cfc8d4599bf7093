"""TLS on migration channels: X.509 credentials as QEMU's tls-creds-x509, and a TLS transport.

Credentials (``tls-creds``) are a directory laid out as QEMU's
``tls-creds-x509`` ``dir=``: ``ca-cert.pem``, ``server-cert.pem`` +
``server-key.pem`` (the listening side), ``client-cert.pem`` +
``client-key.pem`` (the connecting side). Both sides verify the peer against
``ca-cert.pem`` (QEMU's ``verify-peer=on``); the connecting side checks the
server certificate's name against ``tls-hostname`` (default: the host of the
migration URI, as QEMU does); the listening side may restrict clients to
``tls-authz``, a comma-separated list of allowed client subject CNs or DNs
(QEMU: an authz object over the client's distinguished name).

:class:`TLSTransport` replaces the plain socket's writev path: an SSL socket
has no sendmsg, so queued iovecs are gathered into one buffer (one
process_vm_readv system call per up to IOV_MAX entries, no Python loop per
page) and encrypted from there. The SSL object is driven non-blocking under
a lock, with a poll per direction, so the return path may read while the
stream writes (OpenSSL forbids concurrent calls on one SSL object) and each
direction keeps its own liveness bound. Kernel TLS is not used: Python 3.11
has no ssl.OP_ENABLE_KTLS (docs/performance.md, "TLS").
"""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import select
import socket
import ssl
import threading
from dataclasses import dataclass

import numpy as np

from .errors import ChannelError
from .transport import IOV_MAX, SocketTransport

CA_CERT = "ca-cert.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
SEND_CHUNK = 256 << 10  # bytes handed to one SSL_write (16 records)
GATHER_BUFFER = 1 << 20  # bytes gathered at once from an iovec array
RECV_BATCH = 256 << 10  # bytes of records one recv_into takes at most (about 16 records)


class TLSError(ChannelError):
    """TLS could not be set up on a migration channel: credentials, handshake, verification, authz."""


def is_loopback(host: str) -> bool:
    """True for a loopback address or name (127.0.0.0/8, ::1, localhost); unix sockets count as local."""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TLSCreds:
    """Loaded X.509 credentials: ``server`` and ``client`` SSL contexts (None where files are missing)."""

    dir: str
    server: ssl.SSLContext | None
    client: ssl.SSLContext | None


def load_creds(directory: str) -> TLSCreds:
    """Load a tls-creds directory. TLSError names the file that is missing or unreadable.

    Both contexts require a peer certificate signed by ``ca-cert.pem`` (TLS 1.2+).
    """
    ca = os.path.join(directory, CA_CERT)
    if not os.path.isdir(directory):
        raise TLSError(f"tls-creds {directory!r}: not a directory (expected {CA_CERT}, {SERVER_CERT}, ...)")
    if not os.path.exists(ca):
        raise TLSError(f"tls-creds {directory!r}: {CA_CERT} missing (needed to verify the peer)")

    def ctx(cert: str, key: str, server: bool) -> ssl.SSLContext | None:
        cp, kp = os.path.join(directory, cert), os.path.join(directory, key)
        if not (os.path.exists(cp) and os.path.exists(kp)):
            return None
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        c.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            c.load_cert_chain(cp, kp)
            c.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as e:
            raise TLSError(f"tls-creds {directory!r}: cannot load {cert}/{key}/{CA_CERT}: {e}") from None
        c.verify_mode = ssl.CERT_REQUIRED  # verify-peer=on, both sides
        return c

    return TLSCreds(directory, ctx(SERVER_CERT, SERVER_KEY, True),
                    ctx(CLIENT_CERT, CLIENT_KEY, False))


def _subject(cert: dict) -> tuple[str, str]:
    """(CN, DN as 'CN=..,O=..') of a getpeercert() dict."""
    parts = [(k, v) for rdn in cert.get("subject", ()) for k, v in rdn]
    names = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
             "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}
    cn = next((v for k, v in parts if k == "commonName"), "")
    return cn, ",".join(f"{names.get(k, k)}={v}" for k, v in parts)


def check_authz(cert: dict, authz: str) -> None:
    """TLSError unless the client certificate's CN or DN is allowed by ``authz`` ('' = any client).

    ``authz``: CNs separated by ',' (``src1,src2``), or DNs separated by ';'
    (``CN=src1,O=ferry;CN=src2,O=ferry``).
    """
    if not authz:
        return
    allowed = [a.strip() for a in (authz.split(";") if ";" in authz or "=" in authz else authz.split(","))]
    cn, dn = _subject(cert)
    if cn not in allowed and dn not in allowed:
        raise TLSError(f"tls-authz: client certificate {dn or '(no subject)'} is not allowed "
                       f"(allowed: {', '.join(allowed)})")


def client_wrap(transport: SocketTransport, creds: TLSCreds, hostname: str, timeout: float | None) -> "TLSTransport":
    """TLS client handshake on a connected transport; TLSError names what failed."""
    if creds.client is None:
        raise TLSError(f"tls-creds {creds.dir!r}: {CLIENT_CERT}/{CLIENT_KEY} missing (needed to connect)")
    sock = transport.sock
    sock.settimeout(timeout or None)
    try:
        ss = creds.client.wrap_socket(sock, server_side=False, server_hostname=hostname or None,
                                      do_handshake_on_connect=False)
        ss.do_handshake()
    except ssl.SSLCertVerificationError as e:
        sock.close()
        raise TLSError(f"TLS to {transport.name}: the destination's certificate does not verify: "
                       f"{e.verify_message} (tls-creds {creds.dir!r}, tls-hostname {hostname!r})") from None
    except (OSError, ssl.SSLError) as e:
        sock.close()
        raise TLSError(f"TLS handshake to {transport.name} failed: {_ssl_why(e)}") from None
    return TLSTransport(ss, transport.name, transport.liveness)


def server_wrap(transport: SocketTransport, creds: TLSCreds, authz: str, timeout: float | None) -> "TLSTransport":
    """TLS server handshake on an accepted transport, client verified and authorised; TLSError."""
    if creds.server is None:
        raise TLSError(f"tls-creds {creds.dir!r}: {SERVER_CERT}/{SERVER_KEY} missing (needed to listen)")
    sock = transport.sock
    sock.settimeout(timeout or None)
    try:
        ss = creds.server.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        ss.do_handshake()
        check_authz(ss.getpeercert() or {}, authz)
    except TLSError:
        sock.close()
        raise
    except ssl.SSLCertVerificationError as e:
        sock.close()
        raise TLSError(f"TLS from a client: its certificate does not verify: {e.verify_message}") from None
    except (OSError, ssl.SSLError) as e:
        sock.close()
        raise TLSError(f"TLS handshake from a client failed: {_ssl_why(e)}") from None
    return TLSTransport(ss, transport.name, transport.liveness)


def _ssl_why(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "no answer within the handshake bound (liveness-timeout)"
    reason = getattr(e, "reason", None)
    text = str(e)
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNSUPPORTED_PROTOCOL") or "wrong version" in text:
        return f"{text} (the peer does not speak TLS: is tls-creds set on one side only?)"
    if isinstance(e, (ssl.SSLEOFError, ConnectionResetError)) or "EOF" in text:
        return f"{text} (the peer closed the connection: it refused our certificate, or does not use TLS)"
    return text


# --- gathering iovecs for the buffered send path ---

class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_pvr = getattr(_libc, "process_vm_readv", None)
if _pvr is not None:
    _pvr.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                     ctypes.c_ulong)
    _pvr.restype = ctypes.c_ssize_t
_use_pvr = _pvr is not None


def gather(iov: np.ndarray, out: memoryview) -> int:
    """Copy the bytes an iovec array (channels.iovec.IOVEC) describes into ``out``; returns the count.

    ``out`` must hold the sum of the lengths. One process_vm_readv on our
    own process per IOV_MAX entries (the kernel gathers, no Python per entry);
    ctypes.memmove per entry where that system call is refused (seccomp).
    """
    global _use_pvr
    total = int(iov["len"].sum())
    if total > len(out):
        raise ValueError(f"gather: {total} bytes into a {len(out)}-byte buffer")
    dst = np.frombuffer(out, dtype=np.uint8).ctypes.data if total else 0
    pid = os.getpid()
    done = 0
    i = 0
    while _use_pvr and i < len(iov):
        chunk = np.ascontiguousarray(iov[i:i + IOV_MAX])
        want = int(chunk["len"].sum())
        local = _IOVec(dst + done, want)
        r = _pvr(pid, ctypes.byref(local), 1, chunk.ctypes.data, len(chunk), 0)
        if r < 0:
            e = ctypes.get_errno()
            if e in (errno.EPERM, errno.ENOSYS, errno.EACCES) and done == 0:
                _use_pvr = False
                break
            raise OSError(e, f"gather: process_vm_readv: {os.strerror(e)}")
        if r != want:
            raise OSError(errno.EFAULT, f"gather: process_vm_readv copied {r} of {want} bytes")
        done += want
        i += len(chunk)
    if not _use_pvr:
        for base, n in iov.tolist():
            ctypes.memmove(dst + done, base, n)
            done += n
    return done


class TLSTransport(SocketTransport):
    """A migration channel over TLS (an SSLSocket after its handshake); see the module docstring.

    ``send_all(buf)`` and ``send_iovec(iov)`` write (the QEMUFile writer uses
    them instead of writev); ``recv_into`` reads. Send and recv timeouts
    (liveness) are separate, as on a plain socket: a wait that sees no
    progress for that long raises OSError(EAGAIN), which the QEMUFile layer
    turns into PeerTimeout.
    """

    buffered = True

    def __init__(self, ssock: ssl.SSLSocket, name: str, liveness: float | None):
        super().__init__(ssock, name=f"{name} (tls)", liveness=liveness)
        ssock.setblocking(False)
        self._lock = threading.Lock()
        self._send_to: float | None = None
        self._recv_to: float | None = None
        self._gbuf: bytearray | None = None
        self.cipher = ssock.cipher()
        self.peer_cert = ssock.getpeercert()

    def set_send_timeout(self, seconds: float | None) -> None:
        self._send_to = seconds or None

    def set_recv_timeout(self, seconds: float | None) -> None:
        self._recv_to = seconds or None

    def _wait(self, events: int, timeout: float | None) -> None:
        p = select.poll()
        p.register(self.sock.fileno(), events)
        if not p.poll(None if timeout is None else max(1, int(timeout * 1000))):
            raise OSError(errno.EAGAIN, f"no progress for {timeout:g} s")

    def recv_into(self, buf) -> int:
        # SSL_read returns one record (16 KiB at most): take every record already
        # here in one call, as a plain recv returns everything the socket holds.
        # At most RECV_BATCH per call: the lock also serves the writer (a request on the return path).
        mv = memoryview(buf).cast("B")
        size = min(len(mv), RECV_BATCH)
        while True:
            got = 0
            with self._lock:
                if self._shut:
                    return 0
                try:
                    while got < size:
                        n = self.sock.recv_into(mv[got:])
                        if n == 0:
                            break
                        got += n
                    return got
                except ssl.SSLWantReadError:
                    if got:
                        return got
                    ev = select.POLLIN
                except ssl.SSLWantWriteError:
                    if got:
                        return got
                    ev = select.POLLOUT
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return got
            self._wait(ev, self._recv_to)

    def send_all(self, data) -> None:
        """Send every byte of ``data`` (a buffer); OSError on failure or timeout."""
        mv = memoryview(data).cast("B")
        off, n = 0, len(mv)
        while off < n:
            with self._lock:
                if self._shut:
                    raise OSError(errno.EPIPE, "channel shut down")
                try:
                    off += self.sock.send(mv[off:off + SEND_CHUNK])
                    continue
                except ssl.SSLWantWriteError:
                    ev = select.POLLOUT
                except ssl.SSLWantReadError:
                    ev = select.POLLIN
            self._wait(ev, self._send_to)

    def send_iovec(self, iov: np.ndarray) -> None:
        """Gather an iovec array into one buffer (GATHER_BUFFER at a time) and send it encrypted."""
        if self._gbuf is None:
            self._gbuf = bytearray(GATHER_BUFFER)
        buf = memoryview(self._gbuf)
        lens = iov["len"]
        i, n = 0, len(iov)
        while i < n:
            # As many whole entries as fit; an entry bigger than the buffer goes alone, directly.
            cum = np.cumsum(lens[i:], dtype=np.uint64)
            k = int(np.searchsorted(cum, GATHER_BUFFER, side="right"))
            if k == 0:
                base, length = int(iov["base"][i]), int(lens[i])
                self.send_all((ctypes.c_char * length).from_address(base))
                i += 1
                continue
            got = gather(iov[i:i + k], buf)
            self.send_all(buf[:got])
            i += k

    def shutdown(self) -> None:
        if not self._shut:
            self._shut = True
            try:
                # socket.shutdown itself: SSLSocket.shutdown drops its SSL object under a concurrent call.
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def shutdown_write(self) -> None:
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_WR)
        except OSError:
            pass
