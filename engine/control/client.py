"""An asyncio client for a worker's control plane: requests with ids, and the event stream.

    async with ControlClient("ipc:///tmp/src.ctl") as c:
        events = await c.events()              # subscribed and in sync before returning
        await c.call("migrate", {"uri": "tcp:127.0.0.1:4444"})
        async for ev in events:
            print(ev["event"], ev["data"])

A DEALER socket carries requests; every request gets a fresh id and replies
are matched by id, so several calls may be in flight at once. Errors come back
as CommandFailed with the QMP error class and description.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import endpoints
from . import protocol as P
from .auth import ClientKeys

DEFAULT_TIMEOUT = 10.0
_HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed (security mechanism mismatch or protocol error)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication refused by the worker",
}


class ControlError(Exception):
    """The control plane could not carry out a request."""


class CommandFailed(ControlError):
    """The worker answered with an error reply."""

    def __init__(self, verb: str, klass: str, desc: str):
        super().__init__(f"{verb}: {klass}: {desc}")
        self.verb = verb
        self.klass = klass
        self.desc = desc


class ControlTimeout(ControlError):
    """No reply in time (worker down, wrong endpoint, or CURVE keys missing/refused)."""


class ControlClient:
    """Talks to one worker. Use as ``async with`` or call ``close()``."""

    def __init__(self, endpoint: str, curve_dir: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        self.endpoint = endpoints.check(endpoint)
        self.keys = ClientKeys.load(curve_dir) if curve_dir else None
        self.timeout = timeout
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if self.keys is not None:
            self.keys.apply(self.sock)
        self._monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        if endpoint.startswith("tcp://") and ":" in endpoints.split_tcp(endpoint)[0]:
            self.sock.ipv6 = True
        self.sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._unmatched: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._streams: list[EventStream] = []
        self.handshake_error: str | None = None
        self._closed = False

    async def __aenter__(self) -> "ControlClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _ensure_tasks(self) -> None:
        if not self._tasks:
            self._unmatched = asyncio.Queue()
            self._tasks = [asyncio.ensure_future(self._read_replies()),
                           asyncio.ensure_future(self._watch_handshakes())]

    async def _read_replies(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            try:
                reply = P.unpack(frames[-1])
            except Exception:  # noqa: BLE001 - not from a Ferry worker; ignore
                continue
            fut = self._pending.pop(reply.get("id"), None) if isinstance(reply, dict) else None
            if fut is not None and not fut.done():
                fut.set_result(reply)
            else:
                self._unmatched.put_nowait(reply)

    async def _watch_handshakes(self) -> None:
        while True:
            ev = parse_monitor_message(await self._monitor.recv_multipart())
            what = ev["event"]
            if what == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshake_error = None
            elif what in _HANDSHAKE_FAILED:
                self.handshake_error = _HANDSHAKE_FAILED[what]
                for fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(ControlError(self._refused_message()))
                self._pending.clear()

    def _refused_message(self) -> str:
        hint = ("the worker requires CURVE keys: pass --curve-dir DIR with the key directory "
                "from `ferry keys`" if self.keys is None else
                "the worker does not accept this key pair (check that both sides use the same key directory)")
        return f"{self.endpoint}: {self.handshake_error}; {hint}"

    async def request(self, verb: str, args: dict | None = None, timeout: float | None = None) -> dict:
        """Send one request and return the whole reply ({"id", "return"} or {"id", "error"})."""
        self._ensure_tasks()
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        await self.sock.send(P.encode_request(verb, args, rid))
        t = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(fut, t)
        except asyncio.TimeoutError:
            self._pending.pop(rid, None)
            if self.handshake_error:
                raise ControlError(self._refused_message()) from None
            raise ControlTimeout(f"{self.endpoint}: no reply to {verb} within {t:g} s (is the worker running "
                                 "there? does it require CURVE keys, --curve-dir?)") from None

    async def call(self, verb: str, args: dict | None = None, timeout: float | None = None) -> Any:
        """Run a verb; returns its ``return`` value or raises CommandFailed."""
        reply = await self.request(verb, args, timeout)
        if "error" in reply:
            err = reply["error"]
            raise CommandFailed(verb, err.get("class", "?"), err.get("desc", "?"))
        return reply.get("return")

    async def send_raw(self, frames: list[bytes], timeout: float | None = None) -> dict:
        """Send arbitrary frames (tests, debugging); returns the next reply that matches no request."""
        self._ensure_tasks()
        await self.sock.send_multipart(frames)
        t = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(self._unmatched.get(), t)
        except asyncio.TimeoutError:
            raise ControlTimeout(f"{self.endpoint}: no reply within {t:g} s") from None

    async def events(self, timeout: float | None = None) -> "EventStream":
        """Subscribe to the worker's events; returns once the subscription is live."""
        status = await self.call("query-status", timeout=timeout)
        ep = endpoints.reachable(status["events"], self.endpoint)
        stream = EventStream(self, ep)
        self._streams.append(stream)
        await stream.sync(self.timeout if timeout is None else timeout)
        return stream

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self._streams:
            s.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(0)
        self.sock.close(0)
        self.ctx.destroy(0)


class EventStream:
    """The worker's events in publication order (async iterator of event dicts)."""

    def __init__(self, client: ControlClient, endpoint: str):
        self.endpoint = endpoint
        self.sock = client.ctx.socket(zmq.SUB)
        self.sock.linger = 0
        if client.keys is not None:
            client.keys.apply(self.sock)
        if endpoint.startswith("tcp://") and ":" in endpoints.split_tcp(endpoint)[0]:
            self.sock.ipv6 = True
        self.sock.subscribe(b"")
        self._token = P.HELLO_PREFIX + f"{os.getpid()}-{uuid.uuid4().hex}".encode()
        self.sock.subscribe(self._token)
        self.sock.connect(endpoint)
        self._early: list[dict] = []

    async def sync(self, timeout: float) -> None:
        """Wait for our hello: from then on no event is missed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0 or not await self.sock.poll(int(left * 1000)):
                raise ControlTimeout(f"event stream {self.endpoint}: no hello within {timeout:g} s")
            topic, body = await self._recv()
            if topic == self._token:
                self.sock.unsubscribe(self._token)
                return
            if not topic.startswith(b"\x00"):
                self._early.append(P.unpack(body))

    async def _recv(self) -> tuple[bytes, bytes]:
        frames = await self.sock.recv_multipart()
        if len(frames) != 2:
            return b"\x00bad", b""
        return frames[0], frames[1]

    async def next(self, timeout: float | None = None) -> dict | None:
        """The next event, or None after ``timeout`` seconds."""
        if self._early:
            return self._early.pop(0)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0 or not await self.sock.poll(max(1, int(left * 1000))):
                    return None
            topic, body = await self._recv()
            if topic.startswith(b"\x00"):
                continue  # hellos of other clients
            try:
                return P.unpack(body)
            except Exception:  # noqa: BLE001
                continue

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        return await self.next()

    def close(self) -> None:
        if not self.sock.closed:
            self.sock.close(0)
