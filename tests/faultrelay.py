"""Fault injection for tests: a TCP relay between two workers, and signals to workers.

FaultRelay
----------
A relay on loopback placed between a migration source and its destination::

    with FaultRelay(dest_uri) as relay:          # dest_uri: what migrate-incoming returned
        await s.call("migrate", {"uri": relay.uri})
        relay.wait_bytes(0, TO_DST, 1 << 20)     # 1 MiB of the main stream went through
        relay.cut(0, rst=True)                   # then the link dies

The source connects to ``relay.uri``. The relay accepts every connection in
arrival order and, for each, opens one to the real destination before it
accepts the next, so the destination sees them in the same order (it tells
channels apart by that order): connection 0 is the main channel (the
migration stream ``TO_DST``, the return path ``TO_SRC``), connections 1..N
the POSTCOPY channels.

Each connection has two directions, each pumped by its own thread. A
direction forwards by default; faults change that, now (on demand, e.g. when
the test saw ``postcopy-active``) or when a byte count of that direction is
reached (``at=`` offset in the stream as the sender wrote it):

- ``cut``: close both sides of the connection (FIN, or RST with SO_LINGER 0);
- ``truncate``: forward exactly N bytes of a direction, then cut;
- ``stall``: stop forwarding (and reading) for T seconds, sockets open; the
  sender is held back by TCP flow control once the buffers fill;
- ``blackhole``: read and drop every further byte silently, sockets open;
- ``flip``: XOR one byte at stream offset K (default mask 0xFF).

Faults armed for a connection that has not arrived yet apply when it does
(one without a byte offset at its first byte in that direction).
Counters per connection and direction: ``received`` (bytes read from the
sender), ``forwarded`` (written to the receiver), ``dropped`` (black-holed).
``fired`` records each fault as it took effect. Everything is real sockets
and threads; ``close()`` (or leaving the ``with`` block) shuts every socket
and joins every thread.

Process faults
--------------
``sigkill``, ``sigstop``, ``sigcont``, ``stopped`` (a context manager that
always sends SIGCONT) and ``stop_for`` act on a worker started with
engine.control.spawn (its process group when it has its own) or on a pid.
``wait_state`` / ``wait_event_state`` wait for a migration condition over the
control plane (a query-migrate predicate, or a MIGRATION event's status), so a
test signals a worker at a chosen phase::

    await wait_state(s, lambda q: q["status"] == "postcopy-active")
    sigkill(dst)
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

TO_DST = "to-dst"  # source -> destination: the migration stream, POSTCOPY pages
TO_SRC = "to-src"  # destination -> source: the return path
DIRECTIONS = (TO_DST, TO_SRC)
CHUNK = 64 << 10  # bytes read per recv
CONNECT_TIMEOUT = 10.0  # s to reach the destination
FINAL_STATES = ("completed", "failed", "cancelled")


class RelayError(RuntimeError):
    """The relay was asked for something it cannot do (unknown direction, a fault in the past...)."""


def _parse_target(target) -> tuple[str, int]:
    """``tcp:HOST:PORT`` or (host, port) -> (host, port)."""
    if isinstance(target, tuple):
        return target[0], int(target[1])
    if not isinstance(target, str) or not target.startswith("tcp:"):
        raise RelayError(f"relay target {target!r}: expected tcp:HOST:PORT or (host, port)")
    host, _, port = target[4:].lstrip("/").rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class Fault:
    """One fault armed on a direction of a connection.

    ``kind``: "cut", "stall", "blackhole" or "flip"; ``at``: stream offset
    (bytes) where it takes effect, None = as soon as possible; ``rst`` (cut):
    reset instead of FIN; ``seconds`` (stall); ``mask`` (flip).
    """

    kind: str
    at: int | None = None
    rst: bool = False
    seconds: float = 0.0
    mask: int = 0xFF


@dataclass
class Fired:
    """A fault that took effect: where, at which stream offset, when (time.monotonic())."""

    conn: int
    direction: str
    kind: str
    offset: int
    time: float


@dataclass
class _Direction:
    received: int = 0
    forwarded: int = 0
    dropped: int = 0
    faults: list = field(default_factory=list)  # pending Fault, by offset
    stall_until: float = 0.0
    blackhole: bool = False
    eof: bool = False


class RelayConnection:
    """One relayed connection: the source's socket, the destination's, two pump threads."""

    def __init__(self, relay: "FaultRelay", index: int, client: socket.socket, server: socket.socket):
        self.relay = relay
        self.index = index
        self.client = client  # from the source
        self.server = server  # to the destination
        self.dirs = {TO_DST: _Direction(), TO_SRC: _Direction()}
        self.cut_done = threading.Event()  # wakes stalls
        self._threads: list[threading.Thread] = []
        self._left = 2
        self._closed = False

    def start(self) -> None:
        for d, (r, w) in ((TO_DST, (self.client, self.server)), (TO_SRC, (self.server, self.client))):
            t = threading.Thread(target=self._pump, args=(d, r, w), name=f"relay{self.index}-{d}", daemon=True)
            self._threads.append(t)
            t.start()

    # --- faults, from any thread ---
    def cut(self, rst: bool = False) -> None:
        """Close both sides; with ``rst`` the peers get a reset (SO_LINGER 0) rather than FIN."""
        with self.relay._lock:
            if self.cut_done.is_set():
                return
            self.cut_done.set()
        for s in (self.client, self.server):
            try:
                if rst:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.shutdown(socket.SHUT_RD)  # wakes our pump; the close below sends the RST
                else:
                    s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if rst:
            self._close()  # now: the reset is the point, do not wait for the pumps

    def _close(self) -> None:
        with self.relay._lock:
            if self._closed:
                return
            self._closed = True
        for s in (self.client, self.server):
            with contextlib.suppress(OSError):
                s.close()

    def join(self, timeout: float) -> None:
        for t in self._threads:
            t.join(timeout)

    # --- the pump of one direction ---
    def _pump(self, d: str, rsock: socket.socket, wsock: socket.socket) -> None:
        st = self.dirs[d]
        buf = bytearray(CHUNK)
        try:
            while not self.cut_done.is_set():
                self._wait_stall(st)
                if self.cut_done.is_set():
                    return
                try:
                    n = rsock.recv_into(buf)
                except OSError:
                    if not self.cut_done.is_set():
                        self.cut(rst=True)  # the sender reset: so does the relay
                    return
                if n == 0:
                    st.eof = True
                    if self.cut_done.is_set():
                        return  # woken by our own cut: a FIN here would beat its reset
                    with contextlib.suppress(OSError):
                        wsock.shutdown(socket.SHUT_WR)  # pass the end of stream on
                    return
                if not self._forward(d, st, wsock, bytearray(buf[:n])):
                    return
        finally:
            with self.relay._lock:
                self._left -= 1
                last = self._left == 0
            if last:
                self._close()

    def _wait_stall(self, st: _Direction) -> None:
        while True:
            left = st.stall_until - time.monotonic()
            if left <= 0 or self.cut_done.is_set():
                return
            self.cut_done.wait(min(left, 0.05))

    def _forward(self, d: str, st: _Direction, wsock: socket.socket, data: bytearray) -> bool:
        """Send ``data`` (the stream from offset st.received on), applying faults. False: stop pumping."""
        pos = st.received
        st.received += len(data)
        end = pos + len(data)
        i = 0  # bytes of data handled
        while True:
            fault = self._next_fault(d, st, end)
            upto = len(data) if fault is None else max(i, fault.at - pos if fault.at is not None else i)
            if upto > i:
                if not self._send(st, wsock, data[i:upto]):
                    return False
                i = upto
            if fault is None:
                return True
            off = pos + i
            if fault.kind == "flip":
                # fault.at is inside this chunk (``upto`` stopped right before it).
                data[i] ^= fault.mask
                self.relay._record(self.index, d, "flip", off)
                continue
            self.relay._record(self.index, d, fault.kind, off)
            if fault.kind == "cut":
                self.cut(fault.rst)
                return False
            if fault.kind == "blackhole":
                st.blackhole = True
            elif fault.kind == "stall":
                st.stall_until = time.monotonic() + fault.seconds
                self._wait_stall(st)
                if self.cut_done.is_set():
                    return False

    def _next_fault(self, d: str, st: _Direction, end: int) -> Fault | None:
        """The first pending fault due before ``end``, removed from the list."""
        with self.relay._lock:
            # A fault at offset K acts once K bytes went through (before byte K
            # arrives, which may never happen: the end of what the sender writes);
            # a flip needs byte K itself.
            due = [f for f in st.faults if f.at is None or f.at < end or (f.at == end and f.kind != "flip")]
            if not due:
                return None
            f = min(due, key=lambda f: -1 if f.at is None else f.at)
            st.faults.remove(f)
            return f

    def _send(self, st: _Direction, wsock: socket.socket, data) -> bool:
        self._wait_stall(st)  # an on-demand stall also holds what was read already
        if st.blackhole:
            st.dropped += len(data)
            return True
        try:
            wsock.sendall(data)
        except OSError:
            if not self.cut_done.is_set():
                self.cut(rst=True)
            return False
        st.forwarded += len(data)
        return True


class FaultRelay:
    """A TCP relay on loopback between a source and ``target`` (``tcp:HOST:PORT``), with faults.

    ``uri`` is where the source connects. Connections are numbered in arrival
    order (0 = main channel). See the module docstring for the faults.
    """

    def __init__(self, target, listen: tuple[str, int] = ("127.0.0.1", 0)):
        self.target = _parse_target(target)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self.connections: list[RelayConnection] = []
        self.fired: list[Fired] = []
        self._armed: dict[tuple[int, str], list[Fault]] = {}
        self._closing = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(listen)
        self.sock.listen(16)
        host, port = self.sock.getsockname()[:2]
        self.uri = f"tcp:{host}:{port}"
        self._accept_thread = threading.Thread(target=self._accept_loop, name="relay-accept", daemon=True)
        self._accept_thread.start()

    # --- context ---
    def __enter__(self) -> "FaultRelay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, close every connection, join every thread."""
        with self._lock:
            self._closing = True
            conns = list(self.connections)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._accept_thread.join(timeout)
        with contextlib.suppress(OSError):
            self.sock.close()
        for c in conns:
            c.cut()
        for c in conns:
            c.join(timeout)
            c._close()

    # --- accepting ---
    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                if self._closing:
                    client.close()
                    return
            # Connected before the next accept: the destination sees our order.
            try:
                server = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                conn = RelayConnection(self, len(self.connections), client, server)
                for d in DIRECTIONS:
                    conn.dirs[d].faults.extend(self._armed.pop((conn.index, d), []))
                self.connections.append(conn)
                self._cond.notify_all()
            conn.start()

    # --- looking ---
    def conn(self, index: int) -> RelayConnection:
        with self._lock:
            if index >= len(self.connections):
                raise RelayError(f"connection {index} has not arrived ({len(self.connections)} so far)")
            return self.connections[index]

    def counters(self) -> dict:
        """{conn: {direction: {"received", "forwarded", "dropped"}}} in bytes."""
        with self._lock:
            return {c.index: {d: {"received": st.received, "forwarded": st.forwarded, "dropped": st.dropped}
                              for d, st in c.dirs.items()} for c in self.connections}

    def received(self, index: int, direction: str) -> int:
        """Bytes the relay read on that connection and direction (0 before it arrived)."""
        _check_dir(direction)
        with self._lock:
            if index >= len(self.connections):
                return 0
            return self.connections[index].dirs[direction].received

    def wait_connections(self, n: int, timeout: float = 30.0) -> None:
        """Block until ``n`` connections arrived; RelayError on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.connections) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RelayError(f"{len(self.connections)} of {n} connections after {timeout:g} s")
                self._cond.wait(left)

    def wait_bytes(self, index: int, direction: str, n: int, timeout: float = 60.0) -> int:
        """Block until ``n`` bytes were read on that connection and direction; returns the count."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.received(index, direction)
            if got >= n:
                return got
            if time.monotonic() > deadline:
                raise RelayError(f"connection {index} {direction}: {got} of {n} bytes after {timeout:g} s")
            time.sleep(0.01)

    def wait_fired(self, kind: str, index: int | None = None, timeout: float = 60.0) -> Fired:
        """Block until a fault of ``kind`` took effect (on connection ``index`` if given)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for f in self.fired:
                    if f.kind == kind and (index is None or f.conn == index):
                        return f
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RelayError(f"no {kind} fault fired after {timeout:g} s (fired: {self.fired})")
                self._cond.wait(left)

    def _record(self, index: int, direction: str, kind: str, offset: int) -> None:
        with self._cond:
            self.fired.append(Fired(index, direction, kind, offset, time.monotonic()))
            self._cond.notify_all()

    # --- arming ---
    def _arm(self, index: int, direction: str, fault: Fault) -> None:
        _check_dir(direction)
        with self._lock:
            if index < len(self.connections):
                st = self.connections[index].dirs[direction]
                if fault.at is not None and fault.at < st.received:
                    raise RelayError(f"connection {index} {direction}: offset {fault.at} already passed "
                                     f"({st.received} bytes relayed)")
                st.faults.append(fault)
            else:
                self._armed.setdefault((index, direction), []).append(fault)

    def cut(self, index: int, rst: bool = False, at: int | None = None, direction: str = TO_DST) -> None:
        """Close connection ``index`` (both directions): now, or once ``at`` bytes of ``direction`` went through."""
        if at is None and index < len(self.connections):
            self._record(index, direction, "cut", self.received(index, direction))
            self.conn(index).cut(rst)
        else:
            self._arm(index, direction, Fault("cut", at=at, rst=rst))

    def truncate(self, index: int, direction: str, nbytes: int, rst: bool = False) -> None:
        """Forward exactly ``nbytes`` of ``direction`` on connection ``index``, then cut it."""
        self._arm(index, direction, Fault("cut", at=nbytes, rst=rst))

    def stall(self, index: int, direction: str, seconds: float, at: int | None = None) -> None:
        """Stop forwarding ``direction`` for ``seconds`` (sockets open): now, or at stream offset ``at``."""
        if at is None and index < len(self.connections):
            st = self.conn(index).dirs[direction]
            st.stall_until = time.monotonic() + seconds
            self._record(index, direction, "stall", st.received)
        else:
            self._arm(index, direction, Fault("stall", at=at, seconds=seconds))

    def resume(self, index: int, direction: str) -> None:
        """End a stall of ``direction`` now."""
        self.conn(index).dirs[direction].stall_until = 0.0

    def blackhole(self, index: int, direction: str, at: int | None = None) -> None:
        """Drop every further byte of ``direction`` silently (sockets open): now, or from offset ``at``."""
        if at is None and index < len(self.connections):
            st = self.conn(index).dirs[direction]
            st.blackhole = True
            self._record(index, direction, "blackhole", st.received)
        else:
            self._arm(index, direction, Fault("blackhole", at=at))

    def flip(self, index: int, direction: str, offset: int, mask: int = 0xFF) -> None:
        """XOR the byte at stream offset ``offset`` of ``direction`` with ``mask`` (1..255)."""
        if not 1 <= mask <= 0xFF:
            raise RelayError(f"flip mask {mask!r}: expected 1..255")
        self._arm(index, direction, Fault("flip", at=offset, mask=mask))


def _check_dir(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise RelayError(f"direction {direction!r}: expected {TO_DST!r} or {TO_SRC!r}")


# ---------------------------------------------------------------------------
# Process faults
# ---------------------------------------------------------------------------

def _pid_and_group(worker) -> tuple[int, bool]:
    """(pid, signal the whole group?) for a WorkerProcess, a Popen or a pid."""
    if isinstance(worker, int):
        return worker, False
    pid = worker.pid
    return pid, bool(getattr(worker, "own_group", False))


def send_signal(worker, sig: int) -> None:
    """Send ``sig`` to a worker (its process group when it leads its own); a gone process is ignored."""
    pid, group = _pid_and_group(worker)
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def sigkill(worker) -> None:
    """SIGKILL the worker and reap it when it is our child (a WorkerProcess or Popen)."""
    send_signal(worker, signal.SIGKILL)
    proc = getattr(worker, "proc", worker)
    if hasattr(proc, "wait"):
        proc.wait(10)


def sigstop(worker) -> None:
    """SIGSTOP the worker: every thread stops, its sockets stay open and its kernel still ACKs."""
    send_signal(worker, signal.SIGSTOP)


def sigcont(worker) -> None:
    send_signal(worker, signal.SIGCONT)


@contextlib.contextmanager
def stopped(worker):
    """SIGSTOP the worker for the ``with`` block; SIGCONT at the end, whatever happened."""
    sigstop(worker)
    try:
        yield worker
    finally:
        sigcont(worker)


def stop_for(worker, seconds: float, background: bool = False) -> threading.Thread | None:
    """SIGSTOP the worker for ``seconds``, then SIGCONT; with ``background`` in a thread (returned)."""
    def run():
        with stopped(worker):
            time.sleep(seconds)

    if not background:
        run()
        return None
    t = threading.Thread(target=run, name="stop-for", daemon=True)
    t.start()
    return t


async def wait_state(client, cond: Callable[[dict], bool] | str, timeout: float = 60.0,
                     poll: float = 0.02) -> dict:
    """Poll query-migrate on ``client`` (a ControlClient) until ``cond(reply)`` (or status == cond).

    Returns the reply that matched; TimeoutError with the last reply if it never does;
    RelayError at once if the migration ended (completed, failed, cancelled) without matching.
    """
    want = cond
    if isinstance(cond, str):
        cond = lambda q: q["status"] == want  # noqa: E731
    deadline = time.monotonic() + timeout
    while True:
        q = await client.call("query-migrate")
        if cond(q):
            return q
        if q["status"] in FINAL_STATES:
            raise RelayError(f"migration ended ({q['status']}: {q.get('error-desc', '')}) before the "
                             "condition was met")
        if time.monotonic() > deadline:
            raise TimeoutError(f"migration condition not met after {timeout:g} s; last: status {q['status']}")
        await asyncio.sleep(poll)


async def signal_when(client, cond: Callable[[dict], bool] | str, worker, sig: int,
                      timeout: float = 60.0) -> dict:
    """Send ``sig`` to ``worker`` once query-migrate on ``client`` meets ``cond`` (see wait_state).

    E.g. ``await signal_when(s, "postcopy-active", dst, signal.SIGKILL)``. Returns the reply
    that matched. SIGKILL reaps the worker (sigkill).
    """
    q = await wait_state(client, cond, timeout)
    if sig == signal.SIGKILL:
        sigkill(worker)
    else:
        send_signal(worker, sig)
    return q


async def wait_event_state(stream, status: str, timeout: float = 60.0) -> dict:
    """Read events from ``stream`` (ControlClient.events()) until MIGRATION with ``status``; returns it."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        left = deadline - time.monotonic()
        ev = await stream.next(max(0.05, left)) if left > 0 else None
        if ev is None:
            raise TimeoutError(f"no MIGRATION {status} event after {timeout:g} s; saw {seen}")
        if ev.get("event") == "MIGRATION":
            seen.append(ev["data"]["status"])
            if ev["data"]["status"] == status:
                return ev
