"""Transports under a QEMUFile: TCP, Unix socket, plain file; and migration URIs.

A migration URI is ``tcp:HOST:PORT``, ``unix:PATH`` or ``file:PATH`` as in QEMU.

Liveness (see docs/reliability.md, "Liveness"): a socket transport made with a
``liveness`` timeout T (seconds) gets, on TCP, SO_KEEPALIVE with
TCP_KEEPIDLE/TCP_KEEPINTVL/TCP_KEEPCNT adding up to about T and
TCP_USER_TIMEOUT = T, so the kernel gives up on a dead or unreachable peer;
and on every socket, SO_SNDTIMEO/SO_RCVTIMEO set by the QEMUFile writer and
reader above it, so a blocking send or recv that makes no progress for T
fails (channels.errors.PeerTimeout). Both cost nothing per call.
"""
from __future__ import annotations

import errno
import fcntl
import math
import os
import socket
import struct
import termios
from dataclasses import dataclass

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
UNIX_SOCKET_BUFFER = 4 << 20  # SO_SNDBUF of unix stream sockets (capped by net.core.wmem_max)
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)  # linux/tcp.h
TCP_CLOSE = 7  # tcpi_state of a connection the kernel tore down (linux/tcp_states.h)
KEEPALIVE_MAX = 32767  # s, the kernel's bound on TCP_KEEPIDLE and TCP_KEEPINTVL
# errno of a send or recv that ran into a liveness bound: EAGAIN from
# SO_SNDTIMEO/SO_RCVTIMEO on a blocking socket; from the kernel giving up on
# an established TCP connection (TCP_USER_TIMEOUT, keepalive, retransmissions)
# ETIMEDOUT, or the last soft error it saw meanwhile (an unreachable route or
# host: on an established connection those are only reported when it gives up).
KERNEL_TIMEOUT_ERRNOS = (errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN,
                         errno.ENETDOWN)
TIMEOUT_ERRNOS = (errno.EAGAIN, errno.EWOULDBLOCK, *KERNEL_TIMEOUT_ERRNOS)


def keepalive_settings(seconds: float) -> tuple[int, int, int]:
    """(TCP_KEEPIDLE s, TCP_KEEPINTVL s, TCP_KEEPCNT) for a liveness timeout of ``seconds``.

    A third of the time idle before the first probe, then probes every ninth
    until about ``seconds`` have passed: a dead peer is noticed within the
    timeout, a live one answers the first probe. Whole seconds (the kernel's
    unit), at least 1 each. TCP_USER_TIMEOUT, set alongside, bounds the total.
    """
    if seconds <= 0:
        raise ValueError(f"liveness timeout {seconds!r}: expected a positive number of seconds")
    idle = min(KEEPALIVE_MAX, max(1, int(seconds / 3)))
    intvl = min(KEEPALIVE_MAX, max(1, int(seconds / 9)))
    cnt = max(1, min(127, math.ceil((seconds - idle) / intvl)))
    return idle, intvl, cnt


def _timeval(seconds: float | None) -> bytes:
    """struct timeval for SO_SNDTIMEO/SO_RCVTIMEO; None or 0 = block forever."""
    if not seconds:
        return struct.pack("ll", 0, 0)
    sec = int(seconds)
    usec = int(round((seconds - sec) * 1e6))
    if sec == 0 and usec == 0:
        usec = 1  # a zero timeval would mean "no timeout"
    return struct.pack("ll", sec, usec)


@dataclass(frozen=True)
class MigrationURI:
    """A parsed migration URI."""

    scheme: str  # "tcp", "unix" or "file"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        return f"{self.scheme}:{self.path}"


def parse_uri(uri: str) -> MigrationURI:
    """Parse ``tcp:H:P``, ``unix:PATH`` or ``file:PATH``; ValueError names what is wrong."""
    if not isinstance(uri, str) or ":" not in uri:
        raise ValueError(f"migration uri {uri!r}: expected tcp:HOST:PORT, unix:PATH or file:PATH")
    scheme, rest = uri.split(":", 1)
    if scheme == "tcp":
        if rest.startswith("//"):
            rest = rest[2:]
        if rest.startswith("["):
            host, sep, port = rest[1:].partition("]:")
            if not sep:
                raise ValueError(f"migration uri {uri!r}: bad IPv6 address, expected tcp:[ADDR]:PORT")
        else:
            host, sep, port = rest.rpartition(":")
            if not sep:
                raise ValueError(f"migration uri {uri!r}: missing port, expected tcp:HOST:PORT")
        try:
            portn = int(port)
        except ValueError:
            raise ValueError(f"migration uri {uri!r}: port {port!r} is not a number") from None
        if not 0 <= portn <= 65535:
            raise ValueError(f"migration uri {uri!r}: port {portn} out of range 0..65535")
        return MigrationURI("tcp", host=host or "127.0.0.1", port=portn)
    if scheme in ("unix", "file"):
        if not rest:
            raise ValueError(f"migration uri {uri!r}: empty path")
        return MigrationURI(scheme, path=rest)
    raise ValueError(f"migration uri {uri!r}: unknown scheme {scheme!r} (tcp, unix or file)")


class Transport:
    """Byte transport under a QEMUFile: a file descriptor to write to, recv_into, shutdown.

    ``liveness`` is the liveness timeout in seconds this transport was made
    with (None: none); the QEMUFile writer and reader on it take it as their
    default bound (see set_send_timeout, set_recv_timeout).
    """

    name = "transport"
    liveness: float | None = None
    # The OSError a send or recv on this transport got. Both directions share
    # the connection, and the kernel reports its error to one call only.
    aborted: OSError | None = None

    def torn_down(self) -> bool:
        """True when an end of stream is really the kernel tearing the connection down (reset, timeout)."""
        return False

    def set_send_timeout(self, seconds: float | None) -> None:
        """Bound a blocking send that makes no progress (None: block forever). No-op where sends never block."""

    def set_recv_timeout(self, seconds: float | None) -> None:
        """Bound a blocking recv that gets no byte (None: block forever). No-op where reads never block."""

    def recv_into(self, buf) -> int:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Unblock any thread stuck in send or recv on this transport."""

    def close(self) -> None:
        raise NotImplementedError

    def fileno(self) -> int:
        raise NotImplementedError

    def outq(self) -> int:
        """Bytes not yet delivered to the peer (0 where the transport cannot tell)."""
        return 0


class SocketTransport(Transport):
    """A connected stream socket (TCP or Unix). Blocking; calls release the GIL.

    ``liveness`` (seconds, None or 0 = off): on TCP, keepalive and
    TCP_USER_TIMEOUT from it (keepalive_settings); on any socket it is the
    default of the send and recv timeouts the QEMUFile writer and reader set.
    """

    def __init__(self, sock: socket.socket, name: str = "socket", liveness: float | None = None):
        sock.setblocking(True)
        self.sock = sock
        self.name = name
        self._shut = False
        self.liveness = liveness or None
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.liveness:
                self._tcp_liveness(self.liveness)
        elif sock.family == socket.AF_UNIX:
            # The default (~208 KiB) caps what one recv returns, so the
            # receiver pays its per-read work 5000 times a GiB; 4 MiB doubles
            # throughput (tools/bench_precopy.py). precopy-sndbuf overrides it.
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SOCKET_BUFFER)
            except OSError:
                pass

    def _tcp_liveness(self, seconds: float) -> None:
        """SO_KEEPALIVE + TCP_KEEPIDLE/INTVL/CNT and TCP_USER_TIMEOUT (ms) for ``seconds``."""
        s = self.sock
        idle, intvl, cnt = keepalive_settings(seconds)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, intvl)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cnt)
        s.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, max(1, int(seconds * 1000)))

    def torn_down(self) -> bool:
        # A peer's FIN leaves us in CLOSE_WAIT; a reset or TCP_USER_TIMEOUT
        # makes it CLOSE, and the thread that did not get the error reads EOF.
        if self._shut or self.sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        try:
            return self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE
        except OSError:
            return False

    def set_send_timeout(self, seconds: float | None) -> None:
        # SO_SNDTIMEO on a blocking socket: writev returns what it sent, or
        # EAGAIN when nothing could be sent for this long. The socket stays
        # blocking for Python, so nothing is added per call.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(seconds))

    def set_recv_timeout(self, seconds: float | None) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))

    def recv_into(self, buf) -> int:
        return self.sock.recv_into(buf)

    def shutdown(self) -> None:
        if not self._shut:
            self._shut = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def tune(self, sndbuf: int = 0, rcvbuf: int = 0, notsent_lowat: int = 0, pacing_rate: int = 0) -> None:
        """Bound the kernel's buffering on this socket (0 = leave the system default).

        Bytes queued in socket buffers sit in front of anything sent later on
        the same socket; a postcopy request competes with them on a shared link.
        ``pacing_rate`` (bytes/s, SO_MAX_PACING_RATE) makes the kernel space
        this socket's packets out, so it does not fill a bottleneck's queue
        that urgent pages on another connection must then wait behind.
        """
        s = self.sock
        if pacing_rate and s.family in (socket.AF_INET, socket.AF_INET6):
            # The kernel takes a u64 (u32 before Linux 4.20); a Python int above
            # 2^31 would not fit setsockopt's int form.
            opt = getattr(socket, "SO_MAX_PACING_RATE", 47)
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, struct.pack("Q", pacing_rate))
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, opt, struct.pack("I", min(pacing_rate, 0xFFFFFFFF)))
        if sndbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if notsent_lowat and s.family in (socket.AF_INET, socket.AF_INET6):
            s.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_NOTSENT_LOWAT", 25), notsent_lowat)

    def outq(self) -> int:
        """Bytes this socket still holds to send, or sent and not yet acknowledged (SIOCOUTQ)."""
        try:
            buf = fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return 0
        return struct.unpack("i", buf)[0]

    def shutdown_write(self) -> None:
        """Half-close: the peer reads EOF, we can still read."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()


class FileTransport(Transport):
    """A plain file, for ``file:`` migration (a saved stream)."""

    def __init__(self, path: str, mode: str):
        flags = os.O_RDONLY if mode == "r" else (os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self.fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        self.name = f"file:{path}"
        self._shut = False

    def recv_into(self, buf) -> int:
        if self._shut:
            return 0
        return os.readv(self.fd, [buf])

    def shutdown(self) -> None:
        self._shut = True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def fileno(self) -> int:
        return self.fd


def _family_addr(u: MigrationURI):
    if u.scheme == "unix":
        return socket.AF_UNIX, u.path
    infos = socket.getaddrinfo(u.host, u.port, type=socket.SOCK_STREAM)
    fam, _, _, _, addr = infos[0]
    return fam, addr


def connect(uri: str | MigrationURI, timeout: float = 10.0, liveness: float | None = None) -> Transport:
    """Open the source side of a migration URI (connect, or create the file).

    ``timeout``: seconds for the connection to be made; ``liveness``: the
    liveness timeout of the connection (SocketTransport), None or 0 = off.
    Raises ConnectionError naming the URI.
    """
    u = parse_uri(uri) if isinstance(uri, str) else uri
    if u.scheme == "file":
        return FileTransport(u.path, "w")
    fam, addr = _family_addr(u)
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(addr)
    except OSError as e:
        sock.close()
        raise ConnectionError(f"cannot connect to {u}: {e.strerror or e}") from e
    return SocketTransport(sock, name=str(u), liveness=liveness)


class Listener:
    """The destination side of a migration URI: bound and listening at creation.

    ``liveness``: the liveness timeout (seconds, None or 0 = off) of every
    connection accepted (SocketTransport).
    """

    def __init__(self, uri: str | MigrationURI, backlog: int = 4, liveness: float | None = None):
        u = parse_uri(uri) if isinstance(uri, str) else uri
        self.uri = u
        self.liveness = liveness
        self.sock = None
        if u.scheme == "file":
            return
        fam, addr = _family_addr(u)
        sock = socket.socket(fam, socket.SOCK_STREAM)
        if fam == socket.AF_UNIX:
            try:
                os.unlink(u.path)
            except FileNotFoundError:
                pass
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
            sock.listen(backlog)
        except OSError as e:
            sock.close()
            raise ConnectionError(f"cannot listen on {u}: {e.strerror or e}") from e
        self.sock = sock
        if fam != socket.AF_UNIX:
            host, port = sock.getsockname()[:2]
            self.uri = MigrationURI("tcp", host=host, port=port)

    def accept(self, timeout: float | None = None) -> Transport:
        """Wait for the next connection (or open the file for reading)."""
        if self.uri.scheme == "file":
            return FileTransport(self.uri.path, "r")
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        return SocketTransport(conn, name=str(self.uri), liveness=self.liveness)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            if self.uri.scheme == "unix":
                try:
                    os.unlink(self.uri.path)
                except FileNotFoundError:
                    pass
