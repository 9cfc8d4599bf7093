"""The source's return path: the destination's messages, read in their own thread.

One :class:`SourceReturnPath` per connection of the main channel (a recovery
makes a new one). It validates every message (channels/codec.py
ReturnPathDecoder, validate_page_request) and keeps what the migration
thread waits for: SHUT, the destination's digests, PONGs, received bitmaps
and RESUME_ACK (QEMU: migration.c source_return_path_thread). Page requests
go to ``on_request``. A fault (a broken link, a malformed or unexpected
message) is reported once through ``on_fault``; the thread then ends.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels.errors import ChannelError, DestinationNeverRan, ProtocolError
from ferry_migrate.channels.qemufile import QEMUFileReader

from .callbacks import weak_callback
from .rxstamp import stamp_receives


class SourceReturnPath:
    """Reads the return path of one main-channel connection.

    ``block_infos``: idstr -> codec.BlockInfo of the source's RAM (to validate
    requests and size received bitmaps). ``on_request(msg, blk)``: a valid
    REQ_PAGES(_ID) in postcopy. ``accepting_requests()``: whether requests are
    allowed now (postcopy, not completed). ``on_fault(err)``: called once when
    the return path fails (not after a clean close following SHUT).
    ``on_thread_start()``: called first in the thread (engine/urgent.py gives
    it the urgent path's priority); None = nothing.
    """

    def __init__(self, transport, block_infos: dict, on_request: Callable, accepting_requests: Callable[[], bool],
                 on_fault: Callable[[BaseException], None], on_thread_start: Callable[[], None] | None = None):
        self.transport = transport
        self.block_infos = block_infos
        # The owner's bound methods, held weakly: no source <-> return path cycle.
        self.on_request = weak_callback(on_request)
        self.accepting_requests = accepting_requests
        self.on_fault = weak_callback(on_fault)
        self.on_thread_start = on_thread_start
        self.cond = threading.Condition()
        self.shut: int | None = None
        self.digests: dict | None = None
        self.error: BaseException | None = None
        self.pongs: list[int] = []
        self.last_heard = time.monotonic()  # s, monotonic: last message of any kind
        # When the kernel received the bytes of the last read (engine/rxstamp.py; None: not known).
        self._rx = stamp_receives(transport)
        self.last_arrived: float | None = None
        self.bitmaps: dict[str, object] = {}  # idstr -> bool array (RECV_BITMAP during a recovery)
        self.resume_ack = False
        self.closed = False
        biggest = max((codec.recv_bitmap_size(b.length // C.TARGET_PAGE_SIZE) for b in block_infos.values()),
                      default=0)
        self._reader = QEMUFileReader(transport, bufsize=max(64 << 10, biggest + 1024), name="return-path")
        self._reader.idle_timeout = None  # the destination says nothing until it requests, confirms or faults
        self._thread = threading.Thread(target=self._loop, name="return-path", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def bound_silence(self, seconds: float | None) -> None:
        """Fail (PeerTimeout) when the destination says nothing for ``seconds`` (None or 0: never).

        Only for a destination that sends keepalives (FERRY_PONG_KEEPALIVE); a QEMU one
        may rightly say nothing between page requests.
        """
        self._reader.idle_timeout = seconds or None

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` (called under the lock) or a fault or ``timeout`` s.

        Returns predicate's last value. Raises the return path's error, if any.
        """
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                if self.error is not None:
                    raise self.error
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))
            return True

    # --- the thread ---
    def _loop(self) -> None:
        if self.on_thread_start is not None:
            self.on_thread_start()
        block_pages = {n: b.length // C.TARGET_PAGE_SIZE for n, b in self.block_infos.items()}
        dec = codec.ReturnPathDecoder(block_pages)
        reader = self._reader
        try:
            while True:
                msg, n = dec.next_event(reader.view())
                if msg is codec.NEED_DATA:
                    if not reader.fill(n):
                        if reader.available():
                            raise ProtocolError(f"return path: truncated message, {reader.available()} bytes")
                        if self.shut is None:
                            raise ChannelError("return path closed by the destination before it confirmed")
                        return
                    continue
                reader.consume(n)
                self.last_heard = time.monotonic()
                if self._rx is not None:
                    self.last_arrived = self._rx.last
                self._handle(msg)
        except (ChannelError, ProtocolError, OSError) as e:
            err = e if isinstance(e, (ChannelError, ProtocolError)) else ChannelError(f"return path: {e}")
            if isinstance(err, ChannelError) and not isinstance(err, ProtocolError) and self.shut == 0:
                return  # closed after a confirmation: the normal end
            with self.cond:
                if self.closed:
                    return  # we closed it ourselves (end of migration or a pause)
                self.error = err
                self.cond.notify_all()
            self.on_fault(err)
        finally:
            with self.cond:
                self.closed = True
                self.cond.notify_all()

    def _handle(self, msg: codec.RpMessage) -> None:
        t = msg.type
        if t == C.MIG_RP_MSG_SHUT:
            with self.cond:
                self.shut = msg.value
                if msg.value == C.FERRY_SHUT_NEVER_RAN:
                    self.error = DestinationNeverRan(
                        "the destination failed before it ran the guest (it never processed POSTCOPY_RUN) "
                        "and said so on the recovery connection: the guest's only copy is this one")
                elif msg.value != 0:
                    self.error = ChannelError(f"destination reported failure (SHUT {msg.value}); "
                                              "query the destination for its error")
                self.cond.notify_all()
            if msg.value != 0:
                self.on_fault(self.error)
        elif t == C.MIG_RP_MSG_PONG and msg.value == C.FERRY_PONG_KEEPALIVE:
            pass  # only last_heard, above
        elif t == C.MIG_RP_MSG_PONG:
            with self.cond:
                self.pongs.append(msg.value)
                self.cond.notify_all()
        elif t == C.MIG_RP_MSG_FERRY_DIGESTS:
            with self.cond:
                self.digests = msg.digests
                self.cond.notify_all()
        elif t in (C.MIG_RP_MSG_REQ_PAGES, C.MIG_RP_MSG_REQ_PAGES_ID):
            if self.shut is not None:
                raise ProtocolError(f"return path {msg.name}: page request after completion "
                                    f"(block {msg.block!r}, start 0x{msg.start:x})")
            if not self.accepting_requests():
                raise ProtocolError(f"return path {msg.name}: page request while not in postcopy "
                                    f"(block {msg.block!r}, start 0x{msg.start:x})")
            blk = codec.validate_page_request(self.block_infos, msg)
            self.on_request(msg, blk)
        elif t == C.MIG_RP_MSG_RECV_BITMAP:
            with self.cond:
                if msg.block in self.bitmaps:
                    raise ProtocolError(f"return path RECV_BITMAP: block {msg.block!r} sent twice")
                self.bitmaps[msg.block] = msg.received
                self.cond.notify_all()
        elif t == C.MIG_RP_MSG_RESUME_ACK:
            if msg.value != C.MIGRATION_RESUME_ACK_VALUE:
                raise ProtocolError(f"return path RESUME_ACK: value {msg.value}, expected "
                                    f"{C.MIGRATION_RESUME_ACK_VALUE}")
            with self.cond:
                self.resume_ack = True
                self.cond.notify_all()
        else:
            raise ProtocolError(f"return path {msg.name}: not expected by the source")

    def close(self) -> None:
        """Stop reading (end of migration, or a pause); no fault is reported after this."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self._reader.shutdown()
