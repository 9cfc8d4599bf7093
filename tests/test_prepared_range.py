"""PreparedRange (channels/prepared.py): a huge page prepared once, sent in slices, puts
the same records on the wire as send_range of each slice, and the destination decodes and
verifies them (page-checksums on and off, data and zero pages mixed, block named once)."""
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels.channel import RamSendChannel
from ferry_migrate.channels.codec import StreamDecoder
from ferry_migrate.channels.pagecheck import verify_run
from ferry_migrate.channels.prepared import PreparedRange
from ferry_migrate.channels.qemufile import QEMUFileWriter
from ferry_migrate.channels.transport import SocketTransport
from ferry_migrate.engine.ram import GuestRAM

HUGE = 512
RAM = GuestRAM.create(4 << 20, 2 << 20)
RAM.fill("mixed")  # one page in four is zero: runs of both kinds
RAM.blocks[0].pages[HUGE + 100:HUGE + 180] = 0  # and a long zero run


def wire_bytes(send, checks: bool) -> tuple[bytes, RamSendChannel]:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    ch = RamSendChannel(QEMUFileWriter(SocketTransport(a), name="precopy"), "precopy", page_checks=checks)
    out = bytearray()
    b.setblocking(False)
    try:
        send(ch, lambda: _drain(b, out))
        ch.send_eos()
        ch.flush()
        a.shutdown(socket.SHUT_WR)
        b.setblocking(True)
        while chunk := b.recv(1 << 20):
            out += chunk
    finally:
        a.close()
        b.close()
    return bytes(out), ch


def _drain(b, out):
    try:
        while chunk := b.recv(1 << 20):
            out += chunk
    except BlockingIOError:
        pass


def decode(data: bytes, checks: bool) -> list:
    blk = RAM.blocks[0]
    dec = StreamDecoder([blk.info], mode="pages")
    pos, seen, mv = 0, [], memoryview(data)
    while True:
        ev, n = dec.next_event(mv[pos:])
        assert ev is not codec.NEED_DATA
        pos += n
        if isinstance(ev, codec.RamEOS):
            return seen
        if not isinstance(ev, codec.RamRun):
            continue  # the FERRY_PAGE_CHECKS record itself
        verify_run(ev, "precopy", required=checks)
        if ev.data is not None:
            assert (ev.data == blk.pages[ev.pages]).all()
        else:
            assert not blk.pages[ev.pages].any()
        seen += ev.pages.tolist()


@settings(max_examples=60)
@given(cuts=st.lists(st.integers(1, HUGE - 1), max_size=12, unique=True), checks=st.booleans(),
       start=st.sampled_from([HUGE, HUGE + 37]))
def test_slices_put_what_send_range_puts(cuts, checks, start):
    blk = RAM.blocks[0]
    end = 2 * HUGE
    bounds = [start] + sorted(c + HUGE for c in cuts if c + HUGE > start) + [end]
    slices = list(zip(bounds, bounds[1:]))

    def prepared(ch, drain):
        pr = PreparedRange(ch, blk, start, end)
        for a, b in slices:
            pr.send(a, b)
            drain()

    def per_slice(ch, drain):
        for a, b in slices:
            ch.send_range(blk, a, b, ordered=True)
            drain()

    got, ch1 = wire_bytes(prepared, checks)
    ref, ch2 = wire_bytes(per_slice, checks)
    assert decode(got, checks) == list(range(start, end))
    assert (ch1.normal_pages, ch1.zero_pages) == (ch2.normal_pages, ch2.zero_pages)
    if all(b - a > 4 for a, b in slices):  # send_range takes a page-by-page path for tiny ranges
        assert got == ref


def test_block_named_once_and_bounds_checked():
    blk = RAM.blocks[0]

    def send(ch, drain):
        pr = PreparedRange(ch, blk, 0, HUGE)
        pr.send(0, 10)
        pr.send(10, HUGE)
        with pytest.raises(ValueError, match="outside prepared range"):
            pr.send(HUGE - 1, HUGE + 1)

    data, _ = wire_bytes(send, True)
    assert data.count(blk.idstr.encode()) == 1
    with pytest.raises(ValueError, match="prepared range"):
        PreparedRange(None, blk, 10, 10)
    with pytest.raises(ValueError, match="prepared range"):
        PreparedRange(None, blk, 0, blk.npages + 1)
    assert C.TARGET_PAGE_SIZE == 4096
