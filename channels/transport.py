"""Transports under a QEMUFile: TCP, Unix socket, plain file; and migration URIs.

A migration URI is ``tcp:HOST:PORT``, ``unix:PATH`` or ``file:PATH`` as in QEMU.
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
from dataclasses import dataclass

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
UNIX_SOCKET_BUFFER = 4 << 20  # SO_SNDBUF of unix stream sockets (capped by net.core.wmem_max)


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
    """Byte transport under a QEMUFile: a file descriptor to write to, recv_into, shutdown."""

    name = "transport"

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
    """A connected stream socket (TCP or Unix). Blocking; calls release the GIL."""

    def __init__(self, sock: socket.socket, name: str = "socket"):
        sock.setblocking(True)
        self.sock = sock
        self.name = name
        self._shut = False
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif sock.family == socket.AF_UNIX:
            # The default (~208 KiB) caps what one recv returns, so the
            # receiver pays its per-read work 5000 times a GiB; 4 MiB doubles
            # throughput (tools/bench_precopy.py). precopy-sndbuf overrides it.
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SOCKET_BUFFER)
            except OSError:
                pass

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


def connect(uri: str | MigrationURI, timeout: float = 10.0) -> Transport:
    """Open the source side of a migration URI (connect, or create the file)."""
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
    return SocketTransport(sock, name=str(u))


class Listener:
    """The destination side of a migration URI: bound and listening at creation."""

    def __init__(self, uri: str | MigrationURI, backlog: int = 4):
        u = parse_uri(uri) if isinstance(uri, str) else uri
        self.uri = u
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
        return SocketTransport(conn, name=str(self.uri))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            if self.uri.scheme == "unix":
                try:
                    os.unlink(self.uri.path)
                except FileNotFoundError:
                    pass
