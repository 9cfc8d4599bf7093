"""A QMP listener for a worker: the QEMU Machine Protocol beside the ZeroMQ control plane.

QEMU and libvirt tooling (qmp-shell, QEMU's Python ``qemu.qmp`` library) speak
QMP: JSON objects on a stream socket (docs/interop/qmp-spec.rst in QEMU)::

    S: {"QMP": {"version": {...}, "capabilities": []}}          greeting
    C: {"execute": "qmp_capabilities"}                            negotiation
    S: {"return": {}}
    C: {"execute": "query-migrate", "id": 1}
    S: {"return": {"status": "active", ...}, "id": 1}
    S: {"event": "MIGRATION", "data": {"status": "completed"}, "timestamp": {...}}

Every Ferry verb runs here with the same checks and the same handler as on
the ZeroMQ control plane, and every event goes to every negotiated client.
Messages from the server end with CRLF, as QEMU's; client messages may be
split or run together anywhere (a streaming JSON parser reads them).

QMP has no authentication: a listener is a Unix socket (created owner-only)
or TCP on a loopback address; anything else is refused.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any

from . import endpoints
from . import protocol as P

QMP_VERSION = {"qemu": {"major": 7, "minor": 2, "micro": 0}}  # the QEMU whose migration semantics Ferry follows
MAX_MESSAGE_BYTES = P.MAX_REQUEST_BYTES  # a client whose message grows beyond this is disconnected
NEGOTIATE = "qmp_capabilities"
MAX_BACKLOG_BYTES = 16 << 20  # unsent replies and events a client may leave behind before it is dropped


class QMPAddressError(endpoints.EndpointError):
    """A QMP listener address Ferry cannot or will not use."""


@dataclass(frozen=True)
class QMPAddress:
    """``unix:PATH`` or ``tcp:HOST:PORT`` (QEMU's ``-qmp`` syntax; ``,server=on,wait=off`` allowed)."""

    scheme: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_qmp_address(text: str) -> QMPAddress:
    """Parse a QMP listener address; QMPAddressError names what is wrong."""
    if not isinstance(text, str):
        raise QMPAddressError(f"QMP address {text!r}: expected unix:PATH or tcp:HOST:PORT")
    base, *opts = text.split(",")
    for o in opts:
        if o not in ("server", "server=on", "wait=off", "nowait"):
            raise QMPAddressError(f"QMP address {text!r}: option {o!r} is not supported (a worker always "
                                  "listens and never waits: server=on,wait=off)")
    if base.startswith("unix:"):
        path = base[5:]
        if not path:
            raise QMPAddressError(f"QMP address {text!r}: empty path")
        return QMPAddress("unix", path=path)
    if base.startswith("tcp:"):
        rest = base[4:]
        if rest.startswith("["):
            host, sep, port = rest[1:].partition("]:")
        else:
            host, sep, port = rest.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise QMPAddressError(f"QMP address {text!r}: expected tcp:HOST:PORT with a port 0..65535")
        if not endpoints.is_loopback(endpoints.join_tcp(host, port)):
            raise QMPAddressError(f"QMP address {text!r}: QMP has no authentication, so a worker listens for it "
                                  "only on loopback (127.0.0.1, ::1, localhost) or a Unix socket; reach it "
                                  "from other hosts through an SSH tunnel")
        return QMPAddress("tcp", host=host, port=int(port))
    raise QMPAddressError(f"QMP address {text!r}: expected unix:PATH or tcp:HOST:PORT")


def greeting(package: str) -> dict:
    return {"QMP": {"version": {**QMP_VERSION, "package": package}, "capabilities": []}}


class JSONStream:
    """Sans-I/O splitter of a byte stream into JSON values (no framing needed between them)."""

    def __init__(self, limit: int = MAX_MESSAGE_BYTES):
        self._buf = ""
        self._pending = b""
        self.limit = limit

    def feed(self, data: bytes) -> list:
        """Values completed by ``data``; a value that is not JSON comes out as a ValueError item.

        Raises ValueError when an unfinished value grows beyond ``limit`` bytes.
        """
        raw = self._pending + data
        try:
            text = raw.decode("utf-8")
            self._pending = b""
        except UnicodeDecodeError as e:
            if e.start >= len(raw) - 3 and e.reason == "unexpected end of data":
                text, self._pending = raw[:e.start].decode("utf-8"), raw[e.start:]
            else:
                self._buf = ""
                self._pending = b""
                return [ValueError(f"message is not UTF-8 ({e.reason} at byte {e.start})")]
        self._buf += text
        out: list = []
        while True:
            s = self._buf.lstrip(" \t\r\n")
            self._buf = s
            if not s:
                break
            if s[0] not in "{[":
                # Not the start of an object: report the stray token, go on after it.
                n = 1
                while n < len(s) and s[n] not in " \t\r\n{[":
                    n += 1
                out.append(ValueError(f"JSON parse error: unexpected {s[:n][:20]!r}; QMP input must be a JSON "
                                      "object"))
                self._buf = s[n:]
                continue
            end = _closing(s)
            if end < 0:
                if len(s.encode()) > self.limit:
                    raise ValueError(f"message longer than {self.limit} bytes")
                break  # wait for the rest
            try:
                out.append(json.loads(s[:end]))
            except ValueError as e:
                out.append(ValueError(f"JSON parse error: {e}"))
            self._buf = s[end:]
        return out


def _closing(s: str) -> int:
    """Index just past the bracket closing the object or array ``s`` starts with; -1 if not there yet."""
    depth, in_str, esc = 0, False, False
    for i, ch in enumerate(s):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def _error(klass: str, desc: str, rid: Any = None, has_id: bool = False) -> dict:
    out: dict = {"error": {"class": klass, "desc": desc}}
    if has_id:
        out["id"] = rid
    return out


class QMPSession:
    """One client connection: greeting, negotiation, commands, events."""

    def __init__(self, server: "QMPServer", reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        self.closed = False

    def send(self, msg: dict) -> None:
        if self.closed:
            return
        try:
            if self.writer.transport.get_write_buffer_size() > MAX_BACKLOG_BYTES:
                # A client that stopped reading: drop it rather than buffer its events forever.
                self.closed = True
                self.writer.close()
                return
            self.writer.write(json.dumps(msg, default=P._default).encode() + b"\r\n")
        except (ConnectionError, RuntimeError):
            self.closed = True

    async def run(self) -> None:
        stream = JSONStream()
        self.send(greeting(self.server.package))
        try:
            while not self.closed:
                data = await self.reader.read(65536)
                if not data:
                    break
                try:
                    values = stream.feed(data)
                except ValueError as e:
                    self.send(_error(P.GENERIC_ERROR, str(e)))
                    break
                for v in values:
                    self.send(await self.handle(v))
                await self.writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed = True
            self.writer.close()

    async def handle(self, msg: Any) -> dict:
        """The reply to one client message (QMP's rules, then the worker's verb)."""
        if isinstance(msg, ValueError):
            return _error(P.GENERIC_ERROR, str(msg))
        if not isinstance(msg, dict):
            return _error(P.GENERIC_ERROR, "QMP input must be a JSON object")
        has_id, rid = "id" in msg, msg.get("id")
        for k in msg:
            if k not in ("execute", "arguments", "id"):
                return _error(P.GENERIC_ERROR, f"QMP input member '{k}' is unexpected", rid, has_id)
        verb = msg.get("execute")
        if not isinstance(verb, str):
            return _error(P.GENERIC_ERROR, "QMP input member 'execute' must be a string" if "execute" in msg
                          else "QMP input lacks member 'execute'", rid, has_id)
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            return _error(P.GENERIC_ERROR, "QMP input member 'arguments' must be an object", rid, has_id)
        if verb == NEGOTIATE:
            if self.negotiated:
                return _error(P.COMMAND_NOT_FOUND, "Capabilities negotiation is already complete, command "
                                                   "ignored", rid, has_id)
            enable = args.get("enable", [])
            extra = [k for k in args if k != "enable"]
            if extra:
                return _error(P.GENERIC_ERROR, f"Parameter '{extra[0]}' is unexpected", rid, has_id)
            if not isinstance(enable, list) or enable:
                what = enable[0] if isinstance(enable, list) else enable
                return _error(P.GENERIC_ERROR, f"Capability '{what}' not available", rid, has_id)
            self.negotiated = True
            return self._ok({}, rid, has_id)
        if not self.negotiated:
            return _error(P.COMMAND_NOT_FOUND, "Expecting capabilities negotiation with 'qmp_capabilities'",
                          rid, has_id)
        spec = P.VERBS.get(verb)
        if spec is None:
            return _error(P.COMMAND_NOT_FOUND, f"The command {verb} has not been found", rid, has_id)
        try:
            P.check_arguments(spec, args)
            result = self.server.handler.handle(verb, args)
            if inspect.isawaitable(result):
                result = await result
        except P.RequestError as e:
            return _error(e.klass, e.desc, rid, has_id)
        except Exception as e:  # noqa: BLE001 - bad input never takes a worker down
            traceback.print_exc(file=sys.stderr)
            return _error(P.GENERIC_ERROR, f"{verb}: internal error: {type(e).__name__}: {e}", rid, has_id)
        return self._ok(result, rid, has_id)

    @staticmethod
    def _ok(value: Any, rid: Any, has_id: bool) -> dict:
        out: dict = {"return": {} if value is None else value}
        if has_id:
            out["id"] = rid
        return out


class QMPServer:
    """QMP listeners of one worker; ``handler.handle(verb, args)`` runs the verbs (as ControlServer's).

    ``start`` binds every address (tcp port 0 picks a free port; ``addresses``
    gives them as bound); ``event`` sends an event dict (protocol.event shape)
    to every negotiated client, from the event loop's thread.
    """

    def __init__(self, handler, addresses: list[str], package: str = "ferry"):
        self.handler = handler
        self.requested = [parse_qmp_address(a) for a in addresses]
        self.package = package
        self.addresses: list[str] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._sessions: set[QMPSession] = set()
        self._paths: list[str] = []

    async def start(self) -> None:
        try:
            for a in self.requested:
                if a.scheme == "unix":
                    if os.path.exists(a.path):
                        _refuse_live_unix(a.path)
                        os.unlink(a.path)
                    old = os.umask(0o077)  # unauthenticated control: owner only
                    try:
                        srv = await asyncio.start_unix_server(self._session, path=a.path)
                    finally:
                        os.umask(old)
                    self._paths.append(a.path)
                    self.addresses.append(str(a))
                else:
                    srv = await asyncio.start_server(self._session, host=a.host, port=a.port)
                    port = srv.sockets[0].getsockname()[1]
                    self.addresses.append(str(QMPAddress("tcp", host=a.host, port=port)))
                self._servers.append(srv)
        except OSError as e:
            await self.close()
            raise QMPAddressError(f"QMP address {a}: cannot listen: {e.strerror or e}") from None

    async def _session(self, reader, writer) -> None:
        s = QMPSession(self, reader, writer)
        self._sessions.add(s)
        try:
            await s.run()
        finally:
            self._sessions.discard(s)

    def event(self, ev: dict) -> None:
        for s in list(self._sessions):
            if s.negotiated:
                s.send(ev)

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        for s in list(self._sessions):
            try:
                await asyncio.wait_for(s.writer.drain(), 1.0)
            except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                pass
            s.closed = True
            s.writer.close()
        for srv in self._servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
        self._servers.clear()
        for p in self._paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self._paths.clear()


def _refuse_live_unix(path: str) -> None:
    """A socket path another process still listens on is not taken over; nor is a file that is no socket."""
    import socket
    import stat

    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise QMPAddressError(f"QMP address unix:{path}: the path exists and is not a socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        return  # stale: nobody listens
    finally:
        s.close()
    raise QMPAddressError(f"QMP address unix:{path} is in use by another process (another worker?)")
