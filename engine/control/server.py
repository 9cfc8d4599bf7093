"""The worker side of the control plane: a ROUTER for requests, an XPUB for events.

All socket work happens in one asyncio loop (zmq.asyncio). The migration
itself runs in engine threads; they report through ``emit``, which hands
the event to the loop with ``call_soon_threadsafe`` (ZeroMQ sockets are not
thread-safe, so only the loop thread ever touches them).

Requests are handled one at a time, in arrival order: every handler is quick
(starting a migration only starts its thread), and a worker has few clients.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import sys
import traceback
from typing import Any, Protocol

import zmq
import zmq.asyncio

from . import endpoints
from . import protocol as P
from .auth import ServerKeys, start_authenticator

log = logging.getLogger("ferry.control")

REPLY_LINGER_MS = 1000  # let the reply to `quit` (and last events) leave before the socket closes
MAX_FRAME_BYTES = 64 << 20  # libzmq disconnects a peer sending more than this in one message
EVENT_HWM = 100_000  # events queued per subscriber before PUB drops (it never blocks)


class Handler(Protocol):
    """What the server dispatches to (the Worker)."""

    def handle(self, verb: str, args: dict) -> Any:
        """Run a verb; return its result or raise protocol.RequestError. May return an awaitable."""


class ControlServer:
    """Serves one handler on a control endpoint and publishes its events."""

    def __init__(self, handler: Handler, control: str, events: str | None = None,
                 keys: ServerKeys | None = None):
        self.handler = handler
        self.control_requested = endpoints.check(control)
        self.events_requested = endpoints.check(events) if events else endpoints.default_events_endpoint(control)
        self.events_implicit = not events
        self.keys = keys
        self.control = ""  # bound endpoints (real port when 0 was asked)
        self.events = ""
        self.ctx: zmq.asyncio.Context | None = None
        self.router = None
        self.xpub = None
        self._auth = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._stopping: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._ipc_files: list[str] = []
        self.requests_served = 0
        self.listeners: list = []  # callables given every published event dict (in the loop's thread)

    # --- life cycle ---
    async def start(self) -> None:
        """Bind both sockets (and start the authenticator when CURVE is on)."""
        for ep in (self.control_requested, self.events_requested):
            if self.keys is None:
                endpoints.refuse_without_curve(ep)
            _refuse_live_ipc(ep)
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._stopping = asyncio.Event()
        self.ctx = zmq.asyncio.Context()
        if self.keys is not None:
            self._auth = start_authenticator(self.ctx, self.keys)
        try:
            self.router = self._socket(zmq.ROUTER)
            # Requests over MAX_REQUEST_BYTES get an error reply; only absurd
            # sizes make libzmq drop the peer, so memory stays bounded.
            self.router.maxmsgsize = MAX_FRAME_BYTES
            self.control = self._bind(self.router, self.control_requested)
            self.xpub = self._socket(zmq.XPUB)
            self.xpub.sndhwm = EVENT_HWM
            try:
                self.events = self._bind(self.xpub, self.events_requested)
            except endpoints.EndpointError as e:
                if self.events_implicit:
                    raise endpoints.EndpointError(
                        f"{e} (the event stream's endpoint, next to the control endpoint by default: give "
                        "--events ENDPOINT to put it elsewhere)") from None
                raise
        except BaseException:
            self._close_sockets(0)
            raise
        self._tasks = [asyncio.ensure_future(self._publisher()),
                       asyncio.ensure_future(self._subscriptions())]

    def _socket(self, kind: int):
        s = self.ctx.socket(kind)
        s.linger = REPLY_LINGER_MS
        if self.keys is not None:
            self.keys.apply(s)
        return s

    def _bind(self, sock, ep: str) -> str:
        if ep.startswith("tcp://") and ":" in endpoints.split_tcp(ep)[0]:
            sock.ipv6 = True
        try:
            sock.bind(ep)
        except zmq.ZMQError as e:
            raise endpoints.EndpointError(f"cannot bind {ep}: {e.strerror}") from None
        path = endpoints.ipc_path(ep)
        if path:
            self._ipc_files.append(path)
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def stop(self) -> None:
        """Leave ``serve`` after the current request (thread-safe only from the loop)."""
        if self._stopping is not None:
            self._stopping.set()

    async def serve(self) -> None:
        """Answer requests until ``stop``."""
        stop = asyncio.ensure_future(self._stopping.wait())
        recv = None
        try:
            while not self._stopping.is_set():
                if recv is None:
                    recv = asyncio.ensure_future(self.router.recv_multipart())
                done, _ = await asyncio.wait({recv, stop}, return_when=asyncio.FIRST_COMPLETED)
                if recv in done:
                    frames, recv = recv.result(), None
                    await self._serve_one(frames)
        finally:
            for f in (recv, stop):
                if f is not None and not f.done():
                    f.cancel()

    async def close(self) -> None:
        """Flush queued events, close sockets, remove ipc files."""
        if self._queue is not None:
            self._queue.put_nowait(None)
            if self._tasks:
                try:
                    await asyncio.wait_for(self._tasks[0], 2.0)
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    pass
        for t in self._tasks:
            t.cancel()
        self._close_sockets(REPLY_LINGER_MS)

    def _close_sockets(self, linger: int) -> None:
        for s in (self.router, self.xpub):
            if s is not None and not s.closed:
                s.close(linger)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
        # libzmq removes its ipc files on close, but not if it was killed;
        # make sure nothing is left behind either way.
        for path in self._ipc_files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._ipc_files.clear()

    # --- requests ---
    async def _serve_one(self, frames: list[bytes]) -> None:
        ident, rest = frames[0], frames[1:]
        envelope = []
        if len(rest) >= 2 and rest[0] == b"":
            envelope, rest = [b""], rest[1:]  # a REQ client's delimiter: send it back
        if len(rest) != 1:
            reply = P.error_reply(None, P.GENERIC_ERROR,
                                  f"a request is one msgpack frame, got {len(rest)} frames")
        else:
            reply = await self._dispatch(rest[0])
        self.requests_served += 1
        try:
            body = P.pack(reply)
        except Exception as e:  # noqa: BLE001 - the client must get an answer
            body = P.pack(P.error_reply(reply.get("id"), P.GENERIC_ERROR, f"reply could not be encoded: {e}"))
        # A client that went away is not an error: ROUTER drops the reply.
        await self.router.send_multipart([ident, *envelope, body])

    async def _dispatch(self, body: bytes) -> dict:
        try:
            req = P.decode_request(body)
        except P.RequestError as e:
            return P.error_reply(e.id, e.klass, e.desc)
        try:
            result = self.handler.handle(req.verb, req.args)
            if inspect.isawaitable(result):
                result = await result
            return P.ok_reply(req.id, result)
        except P.RequestError as e:
            return P.error_reply(req.id, e.klass, e.desc)
        except Exception as e:  # noqa: BLE001 - bad input never takes a worker down
            traceback.print_exc(file=sys.stderr)
            return P.error_reply(req.id, P.GENERIC_ERROR, f"{req.verb}: internal error: {type(e).__name__}: {e}")

    # --- events ---
    def emit(self, name: str, data: dict | None = None) -> None:
        """Publish an event; callable from any thread. The timestamp is taken here, at the change."""
        ev = P.event(name, data)
        loop = self._loop
        if loop is None or self._queue is None:
            return
        try:
            loop.call_soon_threadsafe(self._queue.put_nowait, (name.encode(), ev))
        except RuntimeError:
            pass  # loop already closed: the worker is exiting

    async def _publisher(self) -> None:
        # The only task that sends on the XPUB, so events leave in emit order.
        while True:
            item = await self._queue.get()
            if item is None:
                return
            topic, ev = item
            await self.xpub.send_multipart([topic, P.pack(ev)])
            if not topic.startswith(b"\x00"):
                for listener in self.listeners:
                    listener(ev)  # e.g. the QMP listener's clients, in the same order

    async def _subscriptions(self) -> None:
        # PUB/SUB joins are asynchronous: a client subscribes to everything and
        # to one unique hello topic, and waits for the hello. The hello goes
        # through the same queue as events, so once a client sees it, it has
        # every event published after it.
        while True:
            msg = await self.xpub.recv()
            if msg[:1] == b"\x01" and msg[1:].startswith(P.HELLO_PREFIX):
                self._queue.put_nowait((bytes(msg[1:]), {"event": "HELLO"}))


def _refuse_live_ipc(ep: str) -> None:
    """libzmq silently takes over an ipc path in use; refuse instead of stealing another worker's."""
    path = endpoints.ipc_path(ep)
    if not path or not os.path.exists(path):
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(path)
    except OSError:
        return  # stale file left by a dead process: libzmq replaces it
    finally:
        s.close()
    raise endpoints.EndpointError(f"{ep} is in use by another process (another worker?)")
