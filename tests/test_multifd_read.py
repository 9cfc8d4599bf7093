"""Multifd packets read straight into guest RAM (channels/multifd_read.py, engine/multifd_recv.py).

Real receiver threads on real socket pairs, real mmap'd guest RAM; the test
plays the source with the codec's encoder.

- Packets whose data pages are scattered over the block (runs of consecutive
  pages and single pages, in any order, zero pages among them), with and
  without check values, fed in random chunks that each wait until the
  receiver took every byte before them (so page data arrive across many
  reads): every page lands at its offset, zero pages are cleared, the rest of
  the guest is untouched, every page is marked received and the byte counts
  agree.
- The PacketReader alone: a head is read exactly (the page bytes after it
  stay in the socket) and read_pages fills memory through an iovec of runs;
  the same through a transport without a plain socket (recv_into slices).
- A stream that ends in a packet's page data: MultifdChannelMissing, its
  pages cleared and not marked received.
- POSTCOPY_LISTEN while a packet's pages are being read: close_placement
  waits for it and raises its error when its check fails.
- The sender merges runs queued behind each other into packets of up to 512
  pages (zero pages among them); the receiver places them all, digests equal.
"""
from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferry_migrate.channels import constants as C
from ferry_migrate.channels import multifd_codec as M
from ferry_migrate.channels.codec import BlockInfo
from ferry_migrate.channels.errors import PageIntegrityError
from ferry_migrate.channels.iovec import page_iovec
from ferry_migrate.channels.multifd_read import PacketReader
from ferry_migrate.channels.pagecheck import check_values
from ferry_migrate.channels.transport import SocketTransport, Transport
from ferry_migrate.engine.multifd_recv import fingerprints_in_place
from ferry_migrate.engine.ram import GuestRAM

from .conftest import wait_until
from .test_multifd_recv import Rig as ChannelsRig
from .test_multifd_recv import rigs

PAGE = C.TARGET_PAGE_SIZE
NPAGES = 256  # a 1 MiB guest
WAIT = 30  # s: a bound on any wait, never the thing under test
SETTINGS = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])


def page_bytes(page: int, version: int) -> bytes:
    """Distinct contents for (page, version): 512 words, none of them zero."""
    w = (np.arange(512, dtype=np.uint64) + np.uint64(1) + np.uint64(page << 20) + np.uint64(version << 40))
    return (w * np.uint64(0x9E3779B97F4A7C15) | np.uint64(1)).tobytes()


def packet(pages, nnormal, num, pass_, version, checked, flags=0) -> bytes:
    """A whole packet: head, then the data pages' bytes (page_bytes)."""
    pages = np.asarray(pages, np.int64)
    data = [page_bytes(int(p), version) for p in pages[:nnormal]]
    checks = None
    if checked:
        words = np.frombuffer(b"".join(data), np.uint64).reshape(nnormal, 512) if nnormal else None
        checks = check_values("pc.ram", pages[:nnormal], words) if nnormal else np.empty(0, np.uint64)
        checks = np.concatenate((checks, check_values("pc.ram", pages[nnormal:], None)))
    head = M.encode_packet_head(flags, "pc.ram" if len(pages) else "", pages, nnormal, num, pass_, checks)
    return head + b"".join(data)


def inq(sock_fd: int) -> int:
    """Bytes waiting in a socket's receive queue (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock_fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def feed_in_chunks(sock: socket.socket, peer_fd: int, data: bytes, cuts: list[int]) -> None:
    """Send ``data`` cut at ``cuts``; before each chunk, wait until the receiver took every byte sent."""
    pos = 0
    for c in sorted(set(cuts)) + [len(data)]:
        if c <= pos:
            continue
        wait_until(lambda: inq(peer_fd) == 0, WAIT, "the receiver to take the bytes sent")
        sock.sendall(data[pos:c])
        pos = c


class Rig(ChannelsRig):
    """One multifd channel on an NPAGES guest: ``a`` is the source's end, ``b_fd`` the receiver's socket."""

    def __init__(self, checks: bool, timeout: float = WAIT):
        super().__init__(1, checks, timeout, size=NPAGES * PAGE)
        self.a = self.connect(1)
        self.b_fd = self.rx.channels[0].reader.transport.fileno()


@pytest.fixture
def rig():
    yield from rigs(Rig)


@st.composite
def packets(draw):
    """(pages, nnormal) of 1-4 packets of one pass: scattered pages, data pages first, then zero pages."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        pages = draw(st.lists(st.integers(0, NPAGES - 1), min_size=1, max_size=40, unique=True))
        if draw(st.booleans()):  # a run of consecutive pages, as the source mostly sends
            start = draw(st.integers(0, NPAGES - 40))
            pages = list(range(start, start + draw(st.integers(1, 40))))
        out.append((pages, draw(st.integers(0, len(pages)))))
    return out


@SETTINGS
@given(pkts=packets(), checked=st.booleans(), data=st.data())
def test_packets_land_at_their_offsets_whatever_the_reads(pkts, checked, data):
    r = Rig(checked)
    try:
        blk = r.ram.blocks[0]
        blk.words[:] = 0x5A5A5A5A5A5A5A5A  # old contents: what no packet names must stay
        expect = bytearray(blk.pages.tobytes())
        stream = [M.encode_init(1, 1)]
        for i, (pages, k) in enumerate(pkts):
            stream.append(packet(pages, k, i + 1, 1, version=i, checked=checked))
            for p in pages[:k]:
                expect[p * PAGE:(p + 1) * PAGE] = page_bytes(p, i)
            for p in pages[k:]:
                expect[p * PAGE:(p + 1) * PAGE] = bytes(PAGE)
        stream.append(packet([], 0, len(pkts) + 1, 1, 0, False, C.FERRY_MULTIFD_FLAG_FIN))
        wire = b"".join(stream)
        cuts = data.draw(st.lists(st.integers(1, len(wire) - 1), max_size=12))
        feed_in_chunks(r.a, r.b_fd, wire, cuts)
        wait_until(lambda: r.rx.channels[0].done or r.errors, WAIT, "FIN")
        assert not r.errors
        assert blk.pages.tobytes() == bytes(expect)
        named = sorted({p for pages, _ in pkts for p in pages})
        assert np.flatnonzero(r.received.bitmaps["pc.ram"].bits).tolist() == named
        st_ = r.rx.stats()["multifd-1"]
        assert st_["bytes"] == len(wire)
        assert st_["normal"] == sum(k for _, k in pkts) and st_["duplicate"] == sum(len(p) - k for p, k in pkts)
    finally:
        r.close()


def test_a_head_is_read_exactly_and_the_pages_straight_into_memory():
    a, b = socket.socketpair()
    try:
        rd = PacketReader(SocketTransport(b, "test"), name="test")
        assert rd.direct
        pages = np.array([9, 10, 11, 3, 40], np.int64)
        wire = packet(pages, 5, 1, 1, version=7, checked=False)
        a.sendall(wire + b"after")
        dec = M.MultifdDecoder([BlockInfo(0, "pc.ram", NPAGES * PAGE, PAGE)], "test")
        pkt, n = dec.next_head(rd.view())
        while pkt is M.NEED_DATA:
            assert rd.fill(n)
            pkt, n = dec.next_head(rd.view())
        assert rd.available() == n and rd.transferred == n  # nothing of the pages read ahead
        rd.consume(n)
        mem = np.zeros((NPAGES, PAGE), np.uint8)
        iov = page_iovec(mem.ctypes.data, pkt.pages[:pkt.nnormal], PAGE)
        assert len(iov) == 3  # runs: 9-11, 3, 40
        assert rd.read_pages(iov, memoryview(mem).cast("B"), mem.ctypes.data)
        for p in pages.tolist():
            assert mem[p].tobytes() == page_bytes(p, 7)
        assert not mem[[0, 1, 2, 4, 8, 12, 39, 41]].any()
        assert rd.transferred == len(wire)
        assert a.send(b"") == 0 and b.recv(5) == b"after"
    finally:
        a.close()
        b.close()


class _ChunkyTransport(Transport):
    """A transport without a plain socket (as TLS): recv_into on a real socket, at most 1000 bytes a call."""

    def __init__(self, sock):
        self.sock_ = sock
        self.name = "chunky"

    def recv_into(self, buf) -> int:
        mv = memoryview(buf).cast("B")
        return self.sock_.recv_into(mv[:1000])

    def fileno(self) -> int:
        return self.sock_.fileno()

    def close(self) -> None:
        self.sock_.close()


def test_pages_without_a_plain_socket_go_through_recv_into_slices():
    a, b = socket.socketpair()
    try:
        rd = PacketReader(_ChunkyTransport(b), name="test")
        assert not rd.direct
        pages = np.array([5, 6, 20], np.int64)
        body = b"".join(page_bytes(p, 1) for p in pages.tolist())
        t = threading.Thread(target=a.sendall, args=(body,))
        t.start()
        mem = np.zeros((NPAGES, PAGE), np.uint8)
        assert rd.read_pages(page_iovec(mem.ctypes.data, pages, PAGE), memoryview(mem).cast("B"), mem.ctypes.data)
        t.join(WAIT)
        for p in pages.tolist():
            assert mem[p].tobytes() == page_bytes(p, 1)
        assert rd.transferred == len(body)
        a.close()
        assert not rd.read_pages(page_iovec(mem.ctypes.data, np.array([1]), PAGE), memoryview(mem).cast("B"),
                                 mem.ctypes.data)  # the stream ended
    finally:
        a.close()
        b.close()


def test_a_stream_that_ends_in_the_page_data_is_named_and_its_pages_cleared(rig):
    r = rig(False)
    blk = r.ram.blocks[0]
    blk.pages[4] = 0x33  # placed by an earlier pass
    wire = M.encode_init(1, 1) + packet([3, 4, 5], 3, 1, 1, version=1, checked=False)
    r.a.sendall(wire[:-PAGE - 100])  # page 3 whole, page 4 in part
    r.a.close()
    wait_until(lambda: r.errors, WAIT, "an error")
    assert isinstance(r.errors[0], M.MultifdChannelMissing), r.errors
    assert "before its FIN, in the pages of packet 1" in str(r.errors[0])
    assert not blk.pages[3:6].any()
    assert not r.received.bitmaps["pc.ram"].bits.any()


@pytest.mark.parametrize("good", [True, False])
def test_listen_waits_for_a_packet_being_read_and_raises_its_error(rig, good):
    r = rig(True)
    wire = bytearray(M.encode_init(1, 1) + packet([7, 8], 2, 1, 1, version=3, checked=True))
    if not good:
        wire[-1] ^= 0x01  # a flipped bit in page 8
    r.a.sendall(bytes(wire[:-PAGE]))  # page 8 not sent yet
    wait_until(lambda: r.rx.channels and r.rx.channels[0].placing, WAIT, "the packet's pages being read")
    result: list = []

    def listen():
        try:
            r.rx.close_placement()
            result.append(None)
        except Exception as e:  # noqa: BLE001 - the test looks at it
            result.append(e)
    t = threading.Thread(target=listen)
    t.start()
    t.join(0.3)
    assert not result  # LISTEN waits for the packet
    r.a.sendall(bytes(wire[-PAGE:]))
    t.join(WAIT)
    blk = r.ram.blocks[0]
    if good:
        assert result == [None]
        assert blk.pages[8].tobytes() == page_bytes(8, 3)
        assert r.received.bitmaps["pc.ram"].bits[[7, 8]].all()
    else:
        assert isinstance(result[0], PageIntegrityError) and result[0].offset == 8 * PAGE, result
        assert not blk.pages[7:9].any() and not r.received.bitmaps["pc.ram"].bits.any()


def test_fingerprints_in_place_match_those_of_a_copy():
    ram = GuestRAM.create(NPAGES * PAGE)
    try:
        ram.fill("random")
        w = ram.blocks[0].words
        for pages in ([4, 5, 6], [9, 3, 4, 12], [0, 200], [255]):
            p = np.array(pages, np.int64)
            want = check_values("x", p, w[p].copy()) ^ check_values("x", p, None)
            assert (fingerprints_in_place(w, p) == want).all()
    finally:
        ram.close()