"""QEMUFile-like buffered writer and reader over a Transport.

The writer gathers small fields in a buffer and page data *by reference*
(memoryviews of guest RAM) into one iovec list that goes out with sendmsg, so
page bytes are never copied in Python. The reader keeps a byte window that
parsers look into without copying.

Both keep a sticky error: the first failure is kept and every later call fails
fast with it, as QEMUFile does.

Liveness: the writer's ``timeout`` and the reader's ``idle_timeout`` (seconds,
None = wait forever) bound a blocking send or recv that makes no progress; it
then fails with PeerTimeout. Both default to the transport's ``liveness`` and
are applied as SO_SNDTIMEO/SO_RCVTIMEO on the socket, so the hot path gains no
system call. A reader whose peer may legitimately say nothing for long (the
source's return path, the destination's POSTCOPY channels) sets
``idle_timeout = None``; see docs/reliability.md, "Liveness".
"""
from __future__ import annotations

import errno
import mmap
import os
import select
import struct
import threading
import time
from typing import Callable

import numpy as np

from .errors import ChannelError, PeerTimeout, ProtocolError
from .iovec import advance, iovec_of, sendmsg_nowait, writev_all
from .ratelimit import RateLimiter
from .transport import IOV_MAX, KERNEL_TIMEOUT_ERRNOS, TIMEOUT_ERRNOS, Transport

_be16 = struct.Struct(">H")
_be32 = struct.Struct(">I")
_be64 = struct.Struct(">Q")

# Flush by itself once this much is queued (by reference or buffered).
AUTO_FLUSH_BYTES = 1 << 20
TEARDOWN_WAIT = 1.0  # s a reader waits for the error of a torn-down connection


def anon_buffer(size: int) -> mmap.mmap:
    """A zero-filled buffer of ``size`` bytes in its own anonymous mapping.

    Unmapped (returned to the kernel) as soon as the last view of it goes.
    A bytearray of a few MiB is not: once one such block was freed, glibc
    raises its mmap threshold and serves the next from a malloc arena, and
    each thread arena then keeps a freed block resident. With a new reader
    per migration that grew a worker's RSS by a reader buffer per migration
    (up to one per arena, 4 MiB each), migration after migration.
    """
    return mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _timeout_error(e: OSError, name: str, direction: str, seconds: float | None,
                   liveness: float | None) -> PeerTimeout | None:
    """The PeerTimeout an OSError from a send or recv stands for, or None if it is another error."""
    if e.errno not in TIMEOUT_ERRNOS:
        return None
    if e.errno in KERNEL_TIMEOUT_ERRNOS:
        last = "" if e.errno == errno.ETIMEDOUT else f"; last error: {os.strerror(e.errno)}"
        return PeerTimeout(name, direction, liveness or 0,
                           "the kernel gave up on the connection (TCP_USER_TIMEOUT: bytes sent and not "
                           f"acknowledged or not taken by the peer, or keepalive unanswered{last})")
    return PeerTimeout(name, direction, seconds or 0)


class _StickyError:
    """The first error is kept; every later call fails fast with it, as QEMUFile does."""

    name: str
    error: BaseException | None = None

    def _check(self) -> None:
        if self.error is not None:
            if isinstance(self.error, PeerTimeout):
                raise self.error.again() from self.error  # callers react to the type
            raise ChannelError(f"{self.name}: {self.error}") from self.error

    def set_error(self, err: BaseException) -> None:
        """Keep the first error; later calls fail fast with it."""
        if self.error is None:
            self.error = err


class QEMUFileWriter(_StickyError):
    """Buffered big-endian writer; page data is queued by reference."""

    def __init__(self, transport: Transport, rate_limit: int = 0, name: str = ""):
        self.transport = transport
        self.name = name or transport.name
        self._small = bytearray()  # small fields not yet moved to the iovec list
        self._iov: list = []
        self._iov_bytes = 0
        self.transferred = 0  # bytes that reached the transport
        self.writes = 0  # write system calls (writev, sendmsg) that sent them
        self.limiter = RateLimiter(rate_limit)
        self.error: BaseException | None = None
        self._lock = threading.Lock()  # flush may be called from two threads
        # Queued bytes that trigger a flush. Smaller means the sender returns
        # sooner from a blocking send (it can serve a request), larger means
        # fewer system calls.
        self.auto_flush = AUTO_FLUSH_BYTES
        self._timeout: float | None = None
        self.timeout = transport.liveness

    @property
    def timeout(self) -> float | None:
        """Seconds a blocking send may make no progress before PeerTimeout (None: forever)."""
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float | None) -> None:
        self._timeout = seconds or None
        self.transport.set_send_timeout(self._timeout)

    @property
    def rate_limit(self) -> int:
        return self.limiter.rate

    @rate_limit.setter
    def rate_limit(self, rate: int) -> None:
        self.limiter.set_rate(rate)

    # -- small fields --
    def put_byte(self, v: int) -> None:
        self._check()
        self._small.append(v & 0xFF)

    def put_be16(self, v: int) -> None:
        self._check()
        self._small += _be16.pack(v)

    def put_be32(self, v: int) -> None:
        self._check()
        self._small += _be32.pack(v)

    def put_be64(self, v: int) -> None:
        self._check()
        self._small += _be64.pack(v)

    def put_bytes(self, data) -> None:
        """Copy small data into the buffer (headers, names, commands)."""
        self._check()
        self._small += data

    # -- data by reference --
    def _move_small(self) -> None:
        if self._small:
            self._iov.append(bytes(self._small))
            self._iov_bytes += len(self._small)
            self._small.clear()

    def put_ref(self, buf) -> None:
        """Queue a buffer (e.g. a memoryview of guest RAM) without copying it.

        The bytes are read when the writer flushes, so the caller must keep
        the memory mapped until then.
        """
        self._check()
        self._move_small()
        self._iov.append(buf)
        self._iov_bytes += len(buf)
        if self._iov_bytes >= self.auto_flush or len(self._iov) >= IOV_MAX:
            self.flush()

    def put_iov(self, bufs, nbytes: int) -> None:
        """Queue many buffers at once, by reference."""
        self._check()
        self._move_small()
        self._iov.extend(bufs)
        self._iov_bytes += nbytes
        if self._iov_bytes >= self.auto_flush or len(self._iov) >= IOV_MAX:
            self.flush()

    def put_iovec(self, iov, nbytes: int, keep, flush: bool = True) -> None:
        """Queue an iovec array (see channels/iovec.py) describing ``nbytes``.

        ``keep`` holds the objects whose memory the array points into, until
        the bytes are sent. ``flush=False``: never flush here, even past the
        flush size (the caller sends it with :meth:`flush_pieces`).
        """
        self._check()
        self._move_small()
        self._iov.append((iov, keep))
        self._iov_bytes += nbytes
        if flush and self._iov_bytes >= self.auto_flush:
            self.flush()

    def pending(self) -> int:
        """Bytes queued and not yet sent."""
        return self._iov_bytes + len(self._small)

    def flush(self) -> None:
        """Send everything queued. Raises ChannelError on failure (sticky)."""
        with self._lock:
            iov, total = self._take_queued()
            if not iov:
                return
            # One writev over everything queued; ``iov`` keeps every buffer alive until it returns.
            self._send_checked(iov, self._gather(iov), total)

    def flush_pieces(self, piece: int, between: Callable[[], None]) -> None:
        """Send everything queued in writes of ``piece`` bytes, calling ``between()`` after
        each write but the last.

        An interruptible write: a large record goes out whole on this channel,
        while ``between`` may serve other channels (it must not write to this
        one: the writer's lock is held, and the stream is mid-record). Pieces
        are cut at byte offsets, inside a buffer where they fall; the bytes on
        the wire are those :meth:`flush` sends. If ``between`` raises, the
        stream is left mid-record: the writer keeps a sticky error and the
        exception propagates. Raises ChannelError on a failed write.
        """
        if piece <= 0:
            raise ValueError(f"flush piece of {piece} bytes: must be positive")
        with self._lock:
            iov, total = self._take_queued()
            if not iov:
                return
            arr = self._gather(iov)
            if len(iov) == 1:
                arr = arr.copy()  # advanced in place below: never the caller's array
            cum = np.cumsum(arr["len"])
            i = done = 0
            while done < total:
                target = min(total, done + piece)
                k = int(np.searchsorted(cum, target, side="left"))  # entry holding byte target-1
                rest = int(cum[k]) - target  # bytes of entry k left for the next piece
                sub = arr[i:k + 1].copy()
                if rest:
                    sub["len"][-1] -= np.uint64(rest)
                self._send_checked(iov, sub, target - done)
                if rest:
                    arr["base"][k] += arr["len"][k] - np.uint64(rest)
                    arr["len"][k] = rest
                    i = k
                else:
                    i = k + 1
                done = target
                if done < total:
                    self._between(between, total - done)

    def can_drain(self) -> bool:
        """True when :meth:`flush_drain` may write this transport: a plain stream socket
        (not TLS, which gathers and encrypts, nor a file)."""
        return getattr(self.transport, "send_iovec", None) is None and hasattr(self.transport, "sock")

    def flush_drain(self, wake_fd: int, pending: Callable[[], bool], between: Callable[[], None]) -> None:
        """Send everything queued as the socket takes it; serve ``between()`` whenever ``pending()``.

        Socket-driven write breaks: each write is one non-blocking sendmsg of
        as much as the socket accepts; when it accepts nothing, the thread
        waits in poll() for the socket to become writable *or* ``wake_fd`` (an
        eventfd another thread signals when a request comes in) to become
        readable. ``between()`` runs before a write whenever ``pending()`` is
        true, so a request interrupts at once instead of after a fixed piece,
        and an idle record costs one system call per socket-buffer drain.
        The same contract as :meth:`flush_pieces` otherwise: ``between`` must
        not write to this channel; if it raises, the stream is left mid-record
        with a sticky error. No progress for ``timeout`` seconds raises
        PeerTimeout; a failed write raises ChannelError. Needs :meth:`can_drain`.
        """
        with self._lock:
            iov, total = self._take_queued()
            if not iov:
                return
            arr = self._gather(iov)
            if len(iov) == 1:
                arr = arr.copy()  # advanced in place below: never the caller's array
            fd = self.transport.fileno()
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.register(wake_fd, select.POLLIN)
            wait_ms = -1 if self._timeout is None else int(self._timeout * 1000)
            i = done = 0
            while done < total:
                if pending():
                    self._between(between, total - done)
                try:
                    n = sendmsg_nowait(fd, arr[i:])
                except OSError as e:
                    self._send_failed(e)
                self.writes += 1
                if n:
                    i = advance(arr, i, n)
                    done += n
                    self.transferred += n
                    self.limiter.consume(n)
                    continue
                ready = poller.poll(wait_ms)
                if not ready:
                    self._send_failed(OSError(errno.EAGAIN, "no progress"))
                for rfd, _ in ready:
                    if rfd == wake_fd:
                        try:
                            os.eventfd_read(wake_fd)
                        except BlockingIOError:
                            pass

    def _take_queued(self) -> tuple[list, int]:
        """Under the lock: everything queued (buffers, bytes), the queue left empty. Raises the sticky error."""
        self._check()
        self._move_small()
        iov, self._iov = self._iov, []
        total, self._iov_bytes = self._iov_bytes, 0
        return iov, total

    def _between(self, between: Callable[[], None], unsent: int) -> None:
        """Call ``between()`` mid-record; if it raises, the stream is left with ``unsent`` bytes of
        the record unwritten: keep that as the sticky error and re-raise."""
        try:
            between()
        except BaseException as e:
            self.set_error(ChannelError(f"stream left mid-record ({unsent} bytes unsent): {e!r}"))
            raise

    def _send_failed(self, e: OSError) -> None:
        """A write failed with ``e``: keep the sticky error (PeerTimeout or ChannelError) and raise it."""
        self.transport.aborted = e
        timeout = _timeout_error(e, self.name, "send", self._timeout, self.transport.liveness)
        self.set_error(timeout or ChannelError(f"write failed: {e.strerror or e}"))
        self._check()

    def _send_checked(self, keep, arr, nbytes: int) -> None:
        """Write ``arr`` (``keep`` holds its memory), counting it; errors become sticky."""
        try:
            self._send_iovec(arr)
        except OSError as e:
            self._send_failed(e)
        except ChannelError as e:
            self.set_error(e)
            self._check()
        self.transferred += nbytes
        self.writes += max(1, -(-len(arr) // IOV_MAX))  # writev_all: one per IOV_MAX entries (more if partial)
        self.limiter.consume(nbytes)

    @staticmethod
    def _gather(iov: list) -> np.ndarray:
        arrays = [item[0] if isinstance(item, tuple) else iovec_of(item) for item in iov]
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    def _send_iovec(self, arr: np.ndarray) -> None:
        send_iovec = getattr(self.transport, "send_iovec", None)
        if send_iovec is not None:
            send_iovec(arr)  # TLS: no sendmsg on an SSL socket; gathered, then encrypted (channels/tls.py)
        else:
            writev_all(self.transport.fileno(), arr)

    def shutdown(self) -> None:
        """Fail all later calls and unblock a thread stuck in send."""
        self.set_error(ChannelError("channel shut down"))
        self.limiter.interrupt()
        self.transport.shutdown()

    def close(self) -> None:
        self.transport.close()


class QEMUFileReader(_StickyError):
    """Buffered big-endian reader with a zero-copy look into its window.

    ``view()`` returns a memoryview of the buffered bytes; ``consume(n)``
    drops n of them; ``fill(n)`` reads until at least n are buffered.
    """

    def __init__(self, transport: Transport, bufsize: int = 4 << 20, name: str = ""):
        self.transport = transport
        self.name = name or transport.name
        self._buf = anon_buffer(bufsize)
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self.transferred = 0  # bytes read from the transport
        self.error: BaseException | None = None
        self.eof = False
        self._idle_timeout: float | None = None
        self.idle_timeout = transport.liveness

    @property
    def idle_timeout(self) -> float | None:
        """Seconds a blocking recv may get no byte before PeerTimeout (None: wait forever).

        Set it to None on a channel whose peer may rightly stay silent for
        long, unless the peer feeds it (PING/PONG).
        """
        return self._idle_timeout

    @idle_timeout.setter
    def idle_timeout(self, seconds: float | None) -> None:
        self._idle_timeout = seconds or None
        self.transport.set_recv_timeout(self._idle_timeout)

    def available(self) -> int:
        return self._end - self._start

    def view(self) -> memoryview:
        """The buffered bytes, without copying. Valid until the next fill()."""
        return self._mv[self._start:self._end]

    def consume(self, n: int) -> None:
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0

    def fill(self, need: int = 1) -> bool:
        """Read until at least ``need`` bytes are buffered. False at a clean EOF."""
        self._check()
        while self._end - self._start < need:
            if self.eof:
                return False
            if len(self._buf) - self._start < need:
                self._make_room(need)
            elif self._end == len(self._buf):
                self._make_room(need)
            try:
                n = self._recv(need)
            except OSError as e:
                self._read_failed(e)
            if n == 0:
                self._read_ended()
                return self._end - self._start >= need
            self._end += n
            self.transferred += n
        return True

    def _recv(self, need: int) -> int:
        """One read into the window after its end; bytes read (0: end of stream). Reads ahead."""
        return self.transport.recv_into(self._mv[self._end:])

    def _read_failed(self, e: OSError) -> None:
        """A read raised ``e``: keep it as the sticky error (PeerTimeout or ChannelError) and raise that."""
        self.transport.aborted = e
        timeout = _timeout_error(e, self.name, "recv", self._idle_timeout, self.transport.liveness)
        self.set_error(timeout or ChannelError(f"read failed: {e.strerror or e}"))
        self._check()

    def _read_ended(self) -> None:
        """A read returned 0: raise the sticky error of a shutdown or a torn-down connection, else mark EOF."""
        # Woken by shutdown() from another thread: that is the sticky
        # error, not a clean end of stream.
        self._check()
        if self.transport.torn_down():
            self.set_error(self._teardown_error())
            self._check()
        self.eof = True

    def _teardown_error(self) -> ChannelError:
        """The error of a connection the kernel tore down while the writer on it got the errno."""
        deadline = time.monotonic() + TEARDOWN_WAIT
        while self.transport.aborted is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the writer's thread is about to record it
        e = self.transport.aborted
        if e is None:
            return ChannelError("read failed: the kernel tore the connection down (reset or timed out)")
        return (_timeout_error(e, self.name, "recv", self._idle_timeout, self.transport.liveness)
                or ChannelError(f"read failed: {e.strerror or e}"))

    def _make_room(self, need: int) -> None:
        avail = self._end - self._start
        size = len(self._buf)
        if need > size:
            # Grow (e.g. a large PACKAGED blob): a new buffer, old views stay valid.
            newbuf = anon_buffer(max(need, size * 2))
            newmv = memoryview(newbuf)
            newmv[:avail] = self._mv[self._start:self._end]
            self._buf = newbuf
            self._mv = newmv
        else:
            self._mv[:avail] = self._mv[self._start:self._end]
        self._start, self._end = 0, avail

    def _need(self, n: int, what: str) -> memoryview:
        if not self.fill(n):
            raise ProtocolError(
                f"truncated stream: {what} needs {n} bytes, {self.available()} left before end of stream"
            )
        return self._mv[self._start:self._start + n]

    def get_byte(self, what: str = "byte") -> int:
        v = self._need(1, what)[0]
        self.consume(1)
        return v

    def get_be16(self, what: str = "be16") -> int:
        v = _be16.unpack_from(self._need(2, what))[0]
        self.consume(2)
        return v

    def get_be32(self, what: str = "be32") -> int:
        v = _be32.unpack_from(self._need(4, what))[0]
        self.consume(4)
        return v

    def get_be64(self, what: str = "be64") -> int:
        v = _be64.unpack_from(self._need(8, what))[0]
        self.consume(8)
        return v

    def get_bytes(self, n: int, what: str = "bytes") -> bytes:
        v = bytes(self._need(n, what))
        self.consume(n)
        return v

    def shutdown(self) -> None:
        self.set_error(ChannelError("channel shut down"))
        self.transport.shutdown()

    def close(self) -> None:
        self.transport.close()
