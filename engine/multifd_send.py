"""Source side of multifd: N sender threads, each owning one multifd channel.

The migration thread hands out runs of dirty target pages (``send_range``,
the same call a RAM channel takes, so engine/send_loop.py sends to either).
Runs are gathered into a batch of about a packet (BATCH_PAGES), and each
batch goes whole to the channel with the least queued, the next in turn
among equals (QEMU fills and hands out its packets the same way:
multifd_queue_page, multifd_send_pages), so a host page is never split between
channels and a sender thread is woken once per batch, not once per run (the
final pass is mostly runs of one page). A sender thread cuts long runs into
packets of at most FERRY_MULTIFD_PACKET_PAGES and gathers short runs of one
block into one packet, finds the zero pages and computes the check values in
bulk (numpy), and sends header and data pages with one ``sendmsg`` of iovecs
per flush: page data of long runs are never copied in Python, and socket
calls and numpy passes release the GIL, so N threads send in parallel. While
the guest runs and page-checksums is on, a long run is first copied into the
thread's staging ring (as channels/channel.py does), short runs are gathered
into a copy anyway: check values and bytes sent then come from one copy.

Each sender thread waits on a condition of its own (one lock for all): a
batch, a SYNC or a FIN wakes only the thread it is for. With one condition
for all, every hand-out woke all N threads, so a pass end cost N x N
wake-ups, which dominated the downtime with hundreds of channels
(docs/performance.md, "Multifd").

``sync()`` ends a pass: every channel sends a SYNC packet after the pages it
was given, and the caller writes RAM_SAVE_FLAG_MULTIFD_FLUSH on the main
stream (:func:`write_flush`). How long a sync round took (:attr:`sync_round`)
is measured at each pass end and goes into the stop decision
(engine/downtime.py). ``finish()`` sends FIN on every channel, waits
for the threads and closes the connections (QEMU: multifd_send_sync_main,
multifd_send_shutdown in migration/multifd.c). Packet format:
channels/multifd_codec.py.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable

import numpy as np

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels import hello as H
from ferry_migrate.channels import multifd_codec as M
from ferry_migrate.channels.channel import StagingRing
from ferry_migrate.channels.errors import ChannelError
from ferry_migrate.channels.iovec import page_iovec
from ferry_migrate.channels.pagecheck import nonzero_from_fingerprints, page_fingerprints, place_values
from ferry_migrate.channels.qemufile import QEMUFileWriter
from ferry_migrate.channels.transport import parse_uri

from .channel_auth import handshake_timeout, open_channel

PAGE = C.TARGET_PAGE_SIZE
PACKET = C.FERRY_MULTIFD_PACKET_PAGES
# Target pages queued per channel (4 MiB: two packets) before the migration thread
# waits. Queued pages are not in the dirty bitmap any more but not sent yet: the
# stop decision counts them as remaining (queued_pages), and a deep queue would
# make a pass look finished long before its pages left.
QUEUE_PAGES = 2 * PACKET
BATCH_PAGES = PACKET  # runs gathered before a batch goes to a channel (2 MiB)
MERGE_PAGES = 32  # runs shorter than this share a packet with their neighbours (one copy of their pages)
STAGE_PAGES = 4 * PACKET  # staging ring of a sender thread (8 MiB)
IDLE_WAIT = 1.0  # s: an idle sender thread looks again (it is woken for everything; a safety net only)
ROLE_MULTIFD = C.FERRY_HELLO_ROLE_MULTIFD
_SYNC, _FIN = "sync", "fin"


def refuse_file_uri(uri, peer: str) -> None:
    """ValueError for capability multifd with a ``file:`` ``uri`` (str or MigrationURI).

    ``peer``: the side that would be missing, "destination" (said by a
    source) or "source" (said by a destination): multifd channels are
    further connections, which a file cannot take.
    """
    u = parse_uri(uri) if isinstance(uri, str) else uri
    if u.scheme == "file":
        raise ValueError(f"multifd needs a live {peer}: not possible with a file: uri")


def listen_backlog(cfg) -> int:
    """The destination's listen backlog: room for every multifd channel at once (QEMU sizes it to the
    channel count too, socket_start_incoming_migration). With a backlog of 4, a source opening 255
    channels back to back overflowed it: dropped SYNs cost a 1 s retransmission each (30 s in all)."""
    extra = cfg.param("multifd-channels") if cfg.cap("multifd") else 0
    return 4 + extra + (cfg.param("postcopy-channels") if cfg.cap("postcopy-preempt") else 0)


def nonzero_pages(words: np.ndarray) -> np.ndarray:
    """Which of (n, 512) page words are not all zero -> (n,) bool.

    A page whose first word is not zero is not a zero page: only the others
    are scanned whole, so a data page costs one cache line here, not 4 KiB
    (QEMU's buffer_is_zero also stops at the first non-zero bytes).
    """
    nonzero = words[:, 0] != 0
    maybe = np.flatnonzero(~nonzero)
    if len(maybe):
        nonzero[maybe] = words[maybe].any(axis=1)
    return nonzero


def multifd_channel_name(index: int) -> str:
    """Name of multifd channel ``index`` (1-based): ``multifd-1`` ... ``multifd-N``."""
    return f"multifd-{index}"


class MultifdSendChannel:
    """One multifd channel of the source: its writer, its queue of runs, its thread's counters."""

    def __init__(self, index: int, writer: QEMUFileWriter, lock: threading.Lock):
        self.index = index
        self.name = multifd_channel_name(index)
        self.writer = writer
        self.wake = threading.Condition(lock)  # its thread waits here; only it is woken
        # Items: (runs, pages) batches, _SYNC, _FIN.
        self.queue: collections.deque = collections.deque()
        self.queued_pages = 0
        self.head_since = 0.0  # monotonic s since its queue's first item is its next work
        self.packets = 0  # the last packet number sent
        self.pass_ = 1
        self.normal_pages = 0
        self.zero_pages = 0
        self.thread: threading.Thread | None = None
        self._stage = StagingRing(writer, STAGE_PAGES)

    @property
    def transferred(self) -> int:
        return self.writer.transferred


class MultifdSender:
    """Hands page runs to N multifd channels and runs their sender threads.

    ``writers``: one QEMUFileWriter per channel, index order, each with its
    init record sent and answered (:func:`open_multifd`); ``page_checks``:
    send check values (capability page-checksums); ``guest_running()``: true
    while the guest may write what is being sent; ``on_fault(err)``: called
    once from the thread that failed (the source stops every channel).
    Thread-safe: ``send_range``, ``sync`` and ``finish`` are called by the
    migration thread; ``shutdown`` from any thread.
    """

    kind = "multifd"
    name = "multifd"

    def __init__(self, writers: list[QEMUFileWriter], page_checks: bool = False,
                 guest_running: Callable[[], bool] | None = None,
                 on_fault: Callable[[BaseException], None] | None = None):
        self.lock = threading.Lock()
        self.channels = [MultifdSendChannel(i + 1, w, self.lock) for i, w in enumerate(writers)]
        self.page_checks = page_checks
        self.guest_running = guest_running or (lambda: False)
        self.on_fault = on_fault or (lambda e: None)
        self.cond = threading.Condition(self.lock)  # the migration thread waits here (room, drain)
        self._batch: list = []  # runs not handed to a channel yet
        self._batch_pages = 0
        self._next = 0  # where the next hand-out starts looking
        # Sync rounds not complete yet: pass -> channels that have not sent its SYNC,
        # and the longest wait of one SYNC so far; how long the last complete round
        # took (s, None before the first) and how many completed.
        self._rounds: dict[int, list] = {}
        self._pass = 1  # the pass the next sync() ends
        self.sync_round: float | None = None
        self.sync_rounds = 0
        self._recent: collections.deque = collections.deque(maxlen=3)  # s, the last rounds
        self.stop_counted = 0.0  # s: what the last stop_cost() returned
        self.finish_time: float | None = None  # s finish() took: queued pages, SYNC and FIN sent, threads joined
        self.error: BaseException | None = None
        self.stopped = False
        self.finished = False
        for ch in self.channels:  # init records sent and answered: open_multifd
            ch.thread = threading.Thread(target=self._run, args=(ch,), name=ch.name, daemon=True)
            ch.thread.start()

    # --- what the send loop sees (the interface of a RAM channel) ---
    @property
    def transferred(self) -> int:
        return sum(ch.transferred for ch in self.channels)

    @property
    def normal_pages(self) -> int:
        return sum(ch.normal_pages for ch in self.channels)

    @property
    def zero_pages(self) -> int:
        return sum(ch.zero_pages for ch in self.channels)

    @property
    def queued_pages(self) -> int:
        """Target pages handed out and not yet sent: still to send, as far as the stop decision goes."""
        return sum(ch.queued_pages for ch in self.channels) + self._batch_pages

    def reset_last_block(self) -> None:
        """Packets name their block each time: nothing to forget."""

    def flush(self) -> None:
        """Hand the runs gathered so far to a channel (they go out as its thread takes them)."""
        with self.lock:
            self._check()
            self._hand_off()

    def send_range(self, block, p0: int, p1: int, ordered: bool = True) -> None:
        """Queue target pages [p0, p1) of ``block``: gathered, then handed out with others.

        A batch of BATCH_PAGES goes to the channel with the least queued,
        waiting while every channel has QUEUE_PAGES queued. Raises the first
        sender thread's error, or ChannelError once stopped.
        """
        with self.lock:
            self._check()
            self._batch.append((block, p0, p1))
            self._batch_pages += p1 - p0
            if self._batch_pages >= BATCH_PAGES:
                self._hand_off()

    def _hand_off(self) -> None:
        """The gathered runs to the channel with the least queued (lock held)."""
        if not self._batch:
            return
        chans, n = self.channels, len(self.channels)
        while True:
            self._check()
            # The least queued, looking from the channel after the last one used: among equals the
            # batches go round, so no channel idles for long (the destination bounds a channel's
            # silence by liveness-timeout). Once per batch, not per run.
            start = self._next
            ch = min((chans[(start + i) % n] for i in range(n)), key=lambda c: c.queued_pages)
            if ch.queued_pages < QUEUE_PAGES:
                break
            self.cond.wait(IDLE_WAIT)
        self._next = ch.index % n  # index is 1-based: the channel after it
        ch.queue.append((self._batch, self._batch_pages))
        ch.queued_pages += self._batch_pages
        self._batch, self._batch_pages = [], 0
        ch.wake.notify()

    def set_rate_limit(self, rate: int) -> None:
        """max-bandwidth (bytes/s, 0 = unlimited) for all channels together: rate / N each."""
        for ch in self.channels:
            ch.writer.rate_limit = rate // len(self.channels)

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` s until every queued page was sent (the pass's end is near)."""
        with self.lock:
            if self.error is None and not self.stopped:
                self._hand_off()
            self.cond.wait_for(lambda: self.error is not None or self.stopped or not self.queued_pages, timeout)

    def sync(self) -> None:
        """End the current pass: each channel sends a SYNC packet after every page it was given.

        Starts a sync round; :attr:`sync_round` becomes its duration (s)
        once every channel sent its SYNC (see :meth:`stop_cost`). Waits
        until the previous round completed first (as QEMU's
        multifd_send_sync_main waits for its channels): rounds never pile up,
        even when a loop of empty passes asks for one after another.
        """
        with self.lock:
            while self._rounds:
                self._check()
                self.cond.wait(IDLE_WAIT)
            self._check()
            self._hand_off()
            now = time.monotonic()
            self._rounds[self._pass] = [len(self.channels), 0.0]
            self._pass += 1
            for ch in self.channels:
                if not ch.queue:
                    ch.head_since = now  # the SYNC is its next work from now on
                ch.queue.append(_SYNC)
                ch.wake.notify()

    def figures(self) -> dict:
        """query-migrate figures: the last sync round's duration (ms), how many rounds completed, and
        what the last stop decision counted for the multifd channels (ms, :meth:`stop_cost`)."""
        last = self.sync_round
        return {"multifd-sync-ms": None if last is None else round(last * 1000, 3),
                "multifd-sync-rounds": self.sync_rounds,
                "multifd-stop-cost-ms": round(self.stop_counted * 1000, 3),
                "multifd-finish-ms": None if self.finish_time is None else round(self.finish_time * 1000, 3)}

    def stop_cost(self, wait: float = 5.0) -> float:
        """Seconds the stop-and-copy spends on the multifd channels beyond sending its pages.

        The stop makes two sync rounds (at the pause, and before FIN: see
        engine/source.py) whose cost grows with the number of channels (a
        wake-up and a packet per channel); each is taken as long as the last
        round measured at a pass end. A round is measured per channel from
        the moment its SYNC is its next work (pages queued before it are
        counted as bytes, not here) to the SYNC sent; the round is its
        slowest channel, and the median of the last three rounds is taken
        (one round slowed by a burst of load does not hold the stop off for
        good). Before the first round completed, waits for it (up to
        ``wait`` s; the guest still runs), else 0.
        """
        with self.lock:
            if self.sync_round is None and self._rounds:
                self.cond.wait_for(lambda: self.sync_round is not None or self.error is not None or self.stopped,
                                   wait)
            recent = sorted(self._recent)
            self.stop_counted = 2 * recent[len(recent) // 2] if recent else 0.0
            return self.stop_counted

    def finish(self, timeout: float | None = None) -> None:
        """FIN on every channel, wait until every thread sent it, close the connections.

        Raises the first sender thread's error (or ChannelError on a timeout).
        """
        t0 = time.monotonic()
        with self.lock:
            self._check()
            self._hand_off()
            for ch in self.channels:
                ch.queue.append(_FIN)
                ch.wake.notify()
        for ch in self.channels:
            ch.thread.join(timeout)
            if ch.thread.is_alive():
                self.shutdown()
                raise ChannelError(f"multifd channel {ch.name}: FIN not sent in {timeout} s")
        with self.lock:
            self._check()
            self.finished = True
        self.close()
        self.finish_time = time.monotonic() - t0

    def shutdown(self) -> None:
        """Stop every channel now (a fault, a cancel): blocked sends return with an error."""
        with self.lock:
            self.stopped = True
            self.cond.notify_all()
            for ch in self.channels:
                ch.wake.notify()
        for ch in self.channels:
            ch.writer.shutdown()

    def close(self) -> None:
        for ch in self.channels:
            try:
                ch.writer.transport.close()
            except OSError:
                pass

    def join(self, timeout: float = 5.0) -> None:
        for ch in self.channels:
            if ch.thread is not None:
                ch.thread.join(timeout)

    def stats(self) -> dict:
        """Per-channel figures, by channel name (query-migrate ``channels``)."""
        return {ch.name: {"bytes": ch.transferred, "normal": ch.normal_pages, "duplicate": ch.zero_pages,
                          "packets": ch.packets} for ch in self.channels}

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        if self.stopped:
            raise ChannelError("multifd channels stopped")

    # --- sender threads ---
    def _take(self, ch: MultifdSendChannel):
        while True:
            with self.lock:
                while not ch.queue:
                    if self.stopped:
                        return None
                    if ch.writer.pending():
                        break  # idle: send what is buffered first
                    ch.wake.wait(IDLE_WAIT)
                else:
                    return ch.queue[0]
            ch.writer.flush()

    def _done(self, ch: MultifdSendChannel, item) -> None:
        now = time.monotonic()
        with self.lock:
            ch.queue.popleft()
            if item is _SYNC:
                r = self._rounds[ch.pass_]
                r[0] -= 1
                r[1] = max(r[1], now - ch.head_since)
                if r[0] == 0:
                    del self._rounds[ch.pass_]
                    self.sync_round = r[1]
                    self.sync_rounds += 1
                    self._recent.append(r[1])
            elif item is not _FIN:
                ch.queued_pages -= item[1]
            ch.head_since = now  # whatever is queued next is its work from now on
            self.cond.notify_all()  # only the migration thread waits on it

    def _run(self, ch: MultifdSendChannel) -> None:
        try:
            while True:
                item = self._take(ch)
                if item is None:
                    return
                if item is _SYNC or item is _FIN:
                    flag = C.FERRY_MULTIFD_FLAG_SYNC if item is _SYNC else C.FERRY_MULTIFD_FLAG_FIN
                    ch.packets += 1
                    ch.writer.put_bytes(M.encode_packet_head(flag, "", np.empty(0, np.int64), 0, ch.packets,
                                                             ch.pass_))
                    if item is _FIN or len(ch.queue) < 2 or ch.queue[1] is not _FIN:
                        ch.writer.flush()  # the destination's main loader waits for it (a FIN next: sent with it)
                    self._done(ch, item)
                    if item is _FIN:
                        return
                    ch.pass_ += 1
                    continue
                self._send_runs(ch, item[0])
                self._done(ch, item)
        except BaseException as e:  # noqa: BLE001 - reported to the migration thread, never lost
            with self.lock:
                first = self.error is None and not self.stopped
                if self.error is None:
                    self.error = e if isinstance(e, ChannelError) else ChannelError(
                        f"multifd channel {ch.name}: {type(e).__name__}: {e}")
                self.cond.notify_all()
            if first:
                self.on_fault(self.error)

    def _send_runs(self, ch: MultifdSendChannel, runs: list) -> None:
        """Packets of a batch: a long run cut into packets, short runs of one block gathered into one."""
        i, n = 0, len(runs)
        while i < n:
            block, p0, p1 = runs[i]
            if p1 - p0 >= MERGE_PAGES:
                for c0 in range(p0, p1, PACKET):
                    self._packet(ch, block, c0, min(p1, c0 + PACKET))
                i += 1
                continue
            parts, k = [], 0
            while i < n:
                b, q0, q1 = runs[i]
                if b is not block or q1 - q0 >= MERGE_PAGES or k + q1 - q0 > PACKET:
                    break
                parts.append(np.arange(q0, q1))
                k += q1 - q0
                i += 1
            self._packet(ch, block, 0, 0, np.concatenate(parts))

    def _packet(self, ch: MultifdSendChannel, block, c0: int, c1: int, gathered: np.ndarray | None = None) -> None:
        """One packet: target pages [c0, c1) of ``block`` (data by reference), or the ``gathered``
        page indices (their pages copied once: check values and bytes sent come from the copy).
        Zero pages found in bulk, check values with page-checksums."""
        w = ch.writer
        if gathered is not None:
            words = block.words[gathered]  # one copy of a few scattered pages
            base, keep, c0, k = words.ctypes.data, words, 0, len(gathered)
        elif self.page_checks and self.guest_running():
            words, base, keep = ch._stage.take(block, c0, c1)
            k = c1 - c0
        else:
            words = block.words[c0:c1]
            base, keep = block.address + c0 * PAGE, block
            k = c1 - c0
        checks = None
        if self.page_checks:
            fps = page_fingerprints(words)
            nonzero = nonzero_from_fingerprints(words, fps)
        else:
            nonzero = nonzero_pages(words)
        data = np.flatnonzero(nonzero)
        local = np.concatenate((data, np.flatnonzero(~nonzero)))
        pages = gathered[local] if gathered is not None else local + c0
        if self.page_checks:
            checks = fps[local] ^ place_values(block.idstr, pages)
        ch.packets += 1
        w.put_bytes(M.encode_packet_head(0, block.idstr, pages, len(data), ch.packets, ch.pass_, checks))
        nd = len(data)
        if nd:
            iov = page_iovec(base, data, PAGE)  # one entry per run of data pages
            w.put_iovec(iov, nd * PAGE, keep=keep)
        ch.normal_pages += nd
        ch.zero_pages += k - nd


def open_multifd(uri, cfg, n: int, page_checks: bool, guest_running, on_fault) -> MultifdSender:
    """Connect ``n`` multifd channels to ``uri`` (TLS and hello as role multifd, index 1..n), send
    each its init record, wait for the destination's answers, and start their sender threads.
    Each writer gets max-bandwidth / n as its rate limit.

    Raises what engine/channel_auth.open_channel raises; WireMismatch when
    the destination's multifd-channels differs (both counts named: the
    destination answers the init record, so this holds without the channel
    hello too); ChannelError when a channel ends before its answer.
    Connections already made are closed then.
    """
    writers = []
    try:
        failed = None
        for i in range(n):
            try:
                t = open_channel(uri, cfg, ROLE_MULTIFD, i + 1)
            except ConnectionError as e:
                # A destination with fewer channels stops accepting: its answers on the
                # channels it took say why, and come first.
                failed = ConnectionError(f"multifd channel {i + 1} of {n}: {e} (is multifd with the same "
                                         "multifd-channels enabled on the destination?)")
                break
            if hasattr(t, "tune"):
                t.tune(sndbuf=cfg.param("precopy-sndbuf"))
            w = QEMUFileWriter(t, name=multifd_channel_name(i + 1))
            writers.append(w)
            w.put_bytes(M.encode_init(i + 1, n))
            try:
                w.flush()
            except ChannelError as e:
                failed = e
                break
        read_init_replies(writers, n, handshake_timeout(cfg), failed)
    except BaseException:
        for w in writers:
            w.transport.close()
        raise
    sender = MultifdSender(writers, page_checks, guest_running, on_fault)
    sender.set_rate_limit(cfg.param("max-bandwidth"))
    return sender


def read_init_replies(writers: list, n: int, timeout: float, failed: BaseException | None = None) -> None:
    """The destination's answers to the init records sent on ``writers`` (``n`` channels in all).

    A count mismatch wins over any other error (it says why), so every
    channel is read even after one failed (a destination that failed closes
    the others, perhaps before its answer on the first): raises WireMismatch
    naming multifd-channels on both sides; else ``failed`` (an error met
    while opening the channels), else the first channel's
    ChannelError/MultifdError (no answer within ``timeout`` s in all, a
    closed connection, a bad answer).
    """
    first = failed
    deadline = time.monotonic() + timeout
    for w in writers:
        t = w.transport
        try:
            # After the deadline only answers already here are read.
            t.set_recv_timeout(max(0.05, deadline - time.monotonic()))
            buf = H.recv_exact(t, C.FERRY_MULTIFD_REPLY_SIZE, f"multifd channel {w.name}: answer to its init record")
            t.set_recv_timeout(None)
            M.parse_init_reply(buf, n, w.name)
        except M.MultifdChannelsMismatch as e:
            raise H.WireMismatch(str(e), {"multifd-channels": (str(e.source), str(e.destination))}) from None
        except (ChannelError, OSError) as e:
            if first is None:
                first = e if isinstance(e, ChannelError) else ChannelError(f"multifd channel {w.name}: {e}")
    if first is not None:
        raise first


def write_flush(ch, section_id: int, end: bool = False) -> None:
    """RAM_SAVE_FLAG_MULTIFD_FLUSH on the main channel ``ch`` (a PrecopyChannel).

    ``end`` False: in a RAM section part of its own (PART, FLUSH, EOS,
    footer), wherever the caller is between sections; True: inside the
    section the caller has open. Flushes the main channel.
    """
    if end:
        ch.send_raw(codec.encode_multifd_flush())
    else:
        ch.section_part(section_id)
        ch.send_raw(codec.encode_multifd_flush())
        ch.send_eos()
        ch.section_footer(section_id)
    # Sent now: the destination's receivers wait for it before they read pages of the next pass.
    ch.flush()
