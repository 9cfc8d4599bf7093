"""Channel objects: each owns its QEMUFile writer (or reader) and its own last block.

A page record omits the block name (CONTINUE) when the block is the one last
sent *on that channel*; each receiver keeps its own last-received block (in
its decoder). The PRECOPY channel is the main stream (header, sections,
commands); the POSTCOPY channel carries bare page records only.
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from . import codec
from . import constants as C
from .codec import NEED_DATA, PageChecks, StreamDecoder
from .errors import ProtocolError
from .iovec import IOVEC
from .pagecheck import page_check, page_fingerprints, place_values
from .qemufile import QEMUFileReader, QEMUFileWriter

PAGE = C.TARGET_PAGE_SIZE
# Target pages per FERRY_PAGE_CHECKS record on the send side, and per copy into
# the staging buffer while the guest runs (2 MiB: one numpy pass of each kind
# per chunk, and the copy is still in cache when the kernel reads it).
CHECK_CHUNK = 512
# Ranges up to this many target pages take a page-by-page path: fragmented
# dirty sets make many tiny ranges, where numpy's per-call cost would dominate.
SMALL_RANGE = 4
# The staging buffer is used as a ring of this many target pages (8 MiB): pages
# queued by reference stay untouched until the writer flushes, which it is
# made to do only when the ring wraps (not after every, often tiny, range).
STAGE_PAGES = 2048
RAM_CHANNEL_PRECOPY = 0
RAM_CHANNEL_POSTCOPY = 1


class StagingRing:
    """A copy of pages the running guest may still write, for one sending writer.

    With page-checksums and the guest running, the check values and the bytes
    sent must come from the same copy. ``take(block, c0, c1)`` copies target
    pages [c0, c1) of ``block`` into the ring and returns (words, base address,
    object keeping the memory alive). The ring holds ``pages`` target pages
    (allocated at first use); pages queued by reference stay untouched until
    ``writer`` flushes, which it is made to do only when the ring wraps.
    """

    __slots__ = ("writer", "pages", "_buf", "_at")

    def __init__(self, writer: QEMUFileWriter, pages: int = STAGE_PAGES):
        self.writer, self.pages = writer, pages
        self._buf: np.ndarray | None = None
        self._at = 0  # next free page of the ring

    def take(self, block, c0: int, c1: int):
        k = c1 - c0
        if self._buf is None:
            self._buf = np.empty((self.pages, PAGE // 8), np.uint64)
        if self._at + k > self.pages:
            self.writer.flush()  # nothing queued points into the ring any more
            self._at = 0
        words = self._buf[self._at:self._at + k]
        self._at += k
        np.copyto(words, block.words[c0:c1])
        return words, words.ctypes.data, self._buf


class RamSendChannel:
    """Sender side of a channel that carries RAM page records."""

    kind = "ram"

    def __init__(self, writer: QEMUFileWriter, name: str = "", page_checks: bool = False,
                 guest_running: Callable[[], bool] | None = None):
        self.writer = writer
        self.name = name or self.kind
        self.last_sent_block: str | None = None
        self.normal_pages = 0
        self.zero_pages = 0
        # Capability page-checksums: a FERRY_PAGE_CHECKS record before the page
        # records it covers (channels/pagecheck.py).
        self.page_checks = page_checks
        # True while the guest runs (and may write the pages being sent): with
        # page_checks, pages are then copied into a staging buffer, and the
        # check values and the bytes sent both come from that copy. With the
        # guest stopped (stop-and-copy, postcopy) they come straight from guest
        # RAM, by reference.
        self.guest_running = guest_running or (lambda: False)
        self._stage = StagingRing(writer)

    @property
    def transferred(self) -> int:
        return self.writer.transferred

    def reset_last_block(self) -> None:
        """Forget the last block, so the next record names its block."""
        self.last_sent_block = None

    def send_range(self, block, p0: int, p1: int, ordered: bool = True) -> tuple[int, int]:
        """Send target pages [p0, p1) of ``block`` (a RAMBlock) as PAGE/ZERO records.

        Page data goes out by reference (memoryviews of guest RAM); zero pages
        become ZERO records. With ``ordered`` false the range's data pages go
        first and its zero pages after them, as two runs the receiver decodes
        in bulk; keep the order where the receiver assembles host pages
        (postcopy, huge pages). With ``page_checks`` every run of records is
        preceded by its FERRY_PAGE_CHECKS record (see :meth:`_send_checked`).
        Returns (normal, zero) page counts.
        """
        if self.page_checks:
            return self._send_checked(block, p0, p1, ordered)
        w = self.writer
        if p1 - p0 == 1:
            return self._send_one(block, p0)
        nonzero = block.words[p0:p1].any(axis=1)
        idx = np.arange(p0, p1)
        if ordered:
            # Runs of one kind, in page order.
            cuts = (np.flatnonzero(nonzero[1:] != nonzero[:-1]) + 1).tolist()
            runs = [(bool(nonzero[a]), idx[a:b]) for a, b in zip([0] + cuts, cuts + [len(idx)])]
        else:
            runs = [(True, idx[nonzero]), (False, idx[~nonzero])]
        for data, pages in runs:
            if len(pages) == 0:
                continue
            if self.last_sent_block != block.idstr:
                # The first record on this channel for this block names it.
                self._send_one(block, int(pages[0]), count=False)
                pages = pages[1:]
            if len(pages) == 0:
                continue
            if data:
                self._put_page_run(block, pages)
            else:
                w.put_bytes(codec.zero_run_records(pages))
        normal = int(np.count_nonzero(nonzero))
        zero = (p1 - p0) - normal
        self.normal_pages += normal
        self.zero_pages += zero
        return normal, zero

    def _send_one(self, block, p: int, count: bool = True) -> tuple[int, int]:
        """One target page: the path taken between preemption checks."""
        w = self.writer
        name = None if self.last_sent_block == block.idstr else block.idstr
        self.last_sent_block = block.idstr
        if block.words[p].any():
            w.put_bytes(codec.encode_page_header(p << C.TARGET_PAGE_BITS, C.RAM_SAVE_FLAG_PAGE, name))
            w.put_ref(block.view[p * PAGE:(p + 1) * PAGE])
            self.normal_pages += count
            return 1, 0
        w.put_bytes(codec.encode_zero_page(p << C.TARGET_PAGE_BITS, name))
        self.zero_pages += count
        return 0, 1

    def _put_page_run(self, block, pages: np.ndarray) -> None:
        """CONTINUE PAGE records for ``pages``: header and page iovecs, interleaved, built in bulk."""
        k = len(pages)
        hdr = codec.page_run_headers(pages, C.RAM_SAVE_FLAG_PAGE)
        iov = np.empty(2 * k, IOVEC)
        iov["base"][0::2] = np.uint64(hdr.ctypes.data) + np.arange(k, dtype=np.uint64) * np.uint64(8)
        iov["len"][0::2] = 8
        iov["base"][1::2] = np.uint64(block.address) + pages.astype(np.uint64) * np.uint64(PAGE)
        iov["len"][1::2] = PAGE
        self.writer.put_iovec(iov, k * codec.PAGE_RECORD, keep=(hdr, block))

    def _send_checked(self, block, p0: int, p1: int, ordered: bool) -> tuple[int, int]:
        """send_range with page-checksums: chunks of CHECK_CHUNK pages, one numpy pass of each kind per chunk.

        Zero detection, check values and the bytes sent all come from one
        view of the chunk: guest RAM when the guest is stopped, or a copy of it
        (staging buffer) when ``guest_running()``, so the check values match the bytes
        that leave even if the guest writes meanwhile (the page is then dirty
        again and goes out once more).
        """
        stage = self.guest_running()
        if p1 - p0 <= SMALL_RANGE:
            return self._send_checked_small(block, p0, p1, stage)
        normal = zero = 0
        for c0 in range(p0, p1, CHECK_CHUNK):
            c1 = min(p1, c0 + CHECK_CHUNK)
            k = c1 - c0
            if stage:
                words, base, keep = self._stage.take(block, c0, c1)
            else:
                words = block.words[c0:c1]
                base, keep = block.address + c0 * PAGE, block
            # Zero detection from the fingerprints: a page whose fingerprint is
            # not 0 is not a zero page, so only pages with fingerprint 0 (zero
            # pages, or very rarely others) are scanned: one pass less.
            fps = page_fingerprints(words)
            nonzero = fps != 0
            maybe_zero = np.flatnonzero(~nonzero)
            if len(maybe_zero) * 4 > k:
                nonzero = words.any(axis=1)
            elif len(maybe_zero):
                nonzero[maybe_zero] = words[maybe_zero].any(axis=1)
            checks = fps ^ place_values(block.idstr, np.arange(c0, c1))
            local = np.arange(k)
            if ordered:
                cuts = (np.flatnonzero(nonzero[1:] != nonzero[:-1]) + 1).tolist()
                runs = [(bool(nonzero[a]), local[a:b]) for a, b in zip([0] + cuts, cuts + [k])]
            else:
                runs = [(True, local[nonzero]), (False, local[~nonzero])]
            for data, li in runs:
                if len(li):
                    self._put_checked_run(block, c0, li, data, checks[li], words, base, keep)
            nz = int(np.count_nonzero(nonzero))
            normal += nz
            zero += k - nz
        if self.writer.pending() >= self.writer.auto_flush:
            self.writer.flush()
        self.normal_pages += normal
        self.zero_pages += zero
        return normal, zero

    def _send_checked_small(self, block, p0: int, p1: int, stage: bool) -> tuple[int, int]:
        """A few pages, in order, under one FERRY_PAGE_CHECKS record.

        Page bytes are copied into the writer's buffer here rather than queued
        by reference: for a few pages, 4 KiB copies cost less than an iovec
        entry each. Staged, the values are computed from a private copy taken
        first, since the guest may write the page meanwhile.
        """
        w = self.writer
        recs = []
        checks = []
        for p in range(p0, p1):
            if stage:
                buf = block.pages[p].tobytes()  # the guest may write meanwhile: send this copy
                words = np.frombuffer(buf, np.uint64)
            else:
                words, buf = block.words[p], block.view[p * PAGE:(p + 1) * PAGE]
            data = bool(words.any())
            checks.append(page_check(block.idstr, p, words))
            recs.append((p, data, buf))
        w.put_bytes(codec.encode_page_checks(checks))
        normal = 0
        for p, data, buf in recs:
            name = None if self.last_sent_block == block.idstr else block.idstr
            self.last_sent_block = block.idstr
            if data:
                w.put_bytes(codec.encode_page_header(p << C.TARGET_PAGE_BITS, C.RAM_SAVE_FLAG_PAGE, name))
                w.put_bytes(buf)
                normal += 1
            else:
                w.put_bytes(codec.encode_zero_page(p << C.TARGET_PAGE_BITS, name))
        zero = (p1 - p0) - normal
        self.normal_pages += normal
        self.zero_pages += zero
        if w.pending() >= w.auto_flush:
            w.flush()  # copied bytes count towards the writer's flush size too
        return normal, zero

    def _put_checked_run(self, block, c0: int, li: np.ndarray, data: bool, checks: np.ndarray,
                         words: np.ndarray, base: int, keep) -> None:
        """FERRY_PAGE_CHECKS, then PAGE (``data``) or ZERO records for chunk-local pages ``li``."""
        w = self.writer
        w.put_bytes(codec.encode_page_checks(checks))
        if self.last_sent_block != block.idstr:
            # The first record on this channel for this block names it.
            p = c0 + int(li[0])
            if data:
                w.put_bytes(codec.encode_page_header(p << C.TARGET_PAGE_BITS, C.RAM_SAVE_FLAG_PAGE, block.idstr))
                w.put_bytes(words[int(li[0])].tobytes())
            else:
                w.put_bytes(codec.encode_zero_page(p << C.TARGET_PAGE_BITS, block.idstr))
            self.last_sent_block = block.idstr
            li = li[1:]
            if len(li) == 0:
                return
        if not data:
            w.put_bytes(codec.zero_run_records(c0 + li))
            return
        k = len(li)
        hdr = codec.page_run_headers(c0 + li, C.RAM_SAVE_FLAG_PAGE)
        iov = np.empty(2 * k, IOVEC)
        iov["base"][0::2] = np.uint64(hdr.ctypes.data) + np.arange(k, dtype=np.uint64) * np.uint64(8)
        iov["len"][0::2] = 8
        iov["base"][1::2] = np.uint64(base) + li.astype(np.uint64) * np.uint64(PAGE)
        iov["len"][1::2] = PAGE
        w.put_iovec(iov, k * codec.PAGE_RECORD, keep=(hdr, keep))

    def send_eos(self) -> None:
        self.writer.put_bytes(codec.encode_eos())

    def flush(self) -> None:
        self.writer.flush()

    def shutdown(self) -> None:
        self.writer.shutdown()

    def close(self) -> None:
        self.writer.close()


class PrecopyChannel(RamSendChannel):
    """The main migration stream: header, commands, sections, RAM records, EOF."""

    kind = "precopy"

    def __init__(self, writer: QEMUFileWriter, name: str = "precopy", **kw):
        super().__init__(writer, name, **kw)
        # From 1: a QEMU destination's handlers not yet started answer to id 0.
        self._next_section_id = 1
        self._reserved: set[int] = set()

    def new_section_id(self) -> int:
        while self._next_section_id in self._reserved:
            self._next_section_id += 1
        sid = self._next_section_id
        self._next_section_id += 1
        return sid

    def reserve_section_ids(self, ids) -> None:
        """Section ids taken by sections carried verbatim: new_section_id skips them."""
        self._reserved |= set(ids)

    def send_header(self) -> None:
        self.writer.put_bytes(codec.encode_header())

    def send_raw(self, data: bytes) -> None:
        """Commands and other small pre-encoded pieces."""
        self.writer.put_bytes(data)

    def ram_start(self, section_id: int, blocks, postcopy: bool) -> None:
        """START section of 'ram': the MEM_SIZE block list, EOS, footer."""
        w = self.writer
        w.put_bytes(codec.encode_section_start(C.QEMU_VM_SECTION_START, section_id, C.RAM_SECTION_IDSTR,
                                               C.RAM_SECTION_INSTANCE, C.RAM_SECTION_VERSION))
        w.put_bytes(codec.encode_ram_mem_size(((b.idstr, b.length, b.page_size) for b in blocks), postcopy))
        w.put_bytes(codec.encode_footer(section_id))

    def section_part(self, section_id: int, end: bool = False) -> None:
        self.writer.put_bytes(codec.encode_section_part(
            C.QEMU_VM_SECTION_END if end else C.QEMU_VM_SECTION_PART, section_id))

    def section_footer(self, section_id: int) -> None:
        self.writer.put_bytes(codec.encode_footer(section_id))

    def device_full(self, section_id: int, idstr: str, version: int, payload: bytes) -> None:
        """A FULL section of one of Ferry's own devices: be32 length + payload."""
        self.writer.put_bytes(codec.encode_device_full(section_id, idstr, version, payload))

    def send_eof(self, vmdesc: dict | None) -> None:
        self.writer.put_bytes(codec.encode_eof())
        if vmdesc is not None:
            self.writer.put_bytes(codec.encode_vmdesc(vmdesc))


def postcopy_channel_name(index: int) -> str:
    """Name of POSTCOPY channel ``index`` (0-based) of any number: ``postcopy-1`` ... ``postcopy-N``.

    One scheme whatever the channel count, so figures of runs with 1 and with
    4 channels line up (query-migrate ``channels``, latencies by channel).
    """
    return f"postcopy-{index + 1}"


class PostcopyChannel(RamSendChannel):
    """A POSTCOPY channel: requested host pages only, as bare PAGE/ZERO records.

    No header, sections or footers; flushed after each host page; ended with
    EOS. ``lock`` serialises senders when requested pages are sent from the
    return-path thread.
    """

    kind = "postcopy"

    def __init__(self, writer: QEMUFileWriter, name: str = "postcopy-1", **kw):
        super().__init__(writer, name, **kw)
        self.lock = threading.Lock()


class RamRecvChannel:
    """Receiver side of a channel: a reader and the decoder holding its last block."""

    def __init__(self, reader: QEMUFileReader, decoder: StreamDecoder, name: str = "precopy"):
        self.reader = reader
        self.decoder = decoder
        self.name = name

    @property
    def last_recv_block(self):
        return self.decoder.last_block

    @property
    def transferred(self) -> int:
        return self.reader.transferred

    def next_event(self):
        """Next decoded event, or None at a clean end of stream.

        Events that carry page data point into the reader's buffer: use them
        before calling next_event again.
        """
        reader, dec = self.reader, self.decoder
        while True:
            ev, n = dec.next_event(reader.view())
            if ev is not NEED_DATA:
                reader.consume(n)
                if type(ev) is PageChecks:
                    continue  # its values come out again on the RamRuns they cover
                return ev
            if not reader.fill(n):
                have = reader.available()
                if have == 0 and dec.at_boundary():
                    return None
                raise ProtocolError(f"truncated stream on channel {self.name}: {dec.expecting()} needs "
                                    f"{n} bytes, only {have} before the end of the stream "
                                    f"(stream offset {dec.offset})")

    def shutdown(self) -> None:
        self.reader.shutdown()
