"""Per-channel CONTINUE on both sides (channels/channel.py, StreamDecoder).

Sender: each RamSendChannel remembers the last block *it* sent; its first
record for a block names it, later ones use CONTINUE even when another
channel sent another block in between; reset_last_block() makes the next
record name its block. Receiver: each decoder keeps its own last block, so a
CONTINUE on a channel that never named a block is a ProtocolError. Real
socketpairs, real guest RAM blocks.
"""
from __future__ import annotations

import socket
import struct

import numpy as np
import pytest

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels.channel import PrecopyChannel, RamRecvChannel, RamSendChannel
from ferry_migrate.channels.codec import DeviceSpec, StreamDecoder
from ferry_migrate.channels.errors import ProtocolError
from ferry_migrate.channels.qemufile import QEMUFileReader, QEMUFileWriter
from ferry_migrate.channels.transport import SocketTransport
from ferry_migrate.engine.ram import GuestRAM

from .conftest import PAGE, decode_chunked

CONT = C.RAM_SAVE_FLAG_CONTINUE


@pytest.fixture
def ram():
    r = GuestRAM.create(2 * 16 * PAGE, nblocks=2, name="blk")  # blk.0 and blk.1, 16 pages each
    r.fill("mixed")  # every 4th page zero
    yield r
    r.close()


class Wire:
    """A RamSendChannel on a socketpair; the far end reads raw bytes."""

    def __init__(self, name, cls=RamSendChannel):
        self.a, self.b = socket.socketpair()
        self.ch = cls(QEMUFileWriter(SocketTransport(self.a), name=name), name)

    def finish(self) -> bytes:
        self.ch.send_eos()
        self.ch.flush()
        self.a.shutdown(socket.SHUT_WR)
        out = bytearray()
        while chunk := self.b.recv(1 << 16):
            out += chunk
        return bytes(out)

    def close(self):
        self.a.close()
        self.b.close()


def parse_records(data: bytes) -> list[tuple]:
    """Independent parser of bare records: (block name or None for CONTINUE, page index, kind)."""
    out, pos = [], 0
    while True:
        (v,) = struct.unpack_from(">Q", data, pos)
        pos += 8
        flags, offset = v & 0xFFF, v & ~0xFFF
        if flags == C.RAM_SAVE_FLAG_EOS:
            assert pos == len(data)
            return out
        name = None
        if not flags & CONT:
            n = data[pos]
            name = data[pos + 1:pos + 1 + n].decode()
            pos += 1 + n
        kind = flags & ~CONT
        assert kind in (C.RAM_SAVE_FLAG_PAGE, C.RAM_SAVE_FLAG_ZERO)
        pos += PAGE if kind == C.RAM_SAVE_FLAG_PAGE else 1
        out.append((name, offset // PAGE, "page" if kind == C.RAM_SAVE_FLAG_PAGE else "zero"))


def test_interleaved_channels_keep_their_own_last_block(ram):
    b0, b1 = ram.blocks
    A, B = Wire("precopy"), Wire("postcopy")
    try:
        A.ch.send_range(b0, 0, 3)
        B.ch.send_range(b1, 0, 2)   # another block on the other channel...
        A.ch.send_range(b0, 3, 5)   # ...does not stop A from using CONTINUE
        B.ch.send_range(b0, 0, 1)   # B's first record of blk.0 names it
        A.ch.send_range(b1, 4, 5)   # A switches block: named
        A.ch.send_range(b0, 5, 6)   # and back: named again
        B.ch.send_range(b0, 7, 9)   # B continues in blk.0
        ra, rb = parse_records(A.finish()), parse_records(B.finish())
    finally:
        A.close()
        B.close()
    assert ra == [("blk.0", 0, "page"), (None, 1, "page"), (None, 2, "page"), (None, 3, "zero"),
                  (None, 4, "page"), ("blk.1", 4, "page"), ("blk.0", 5, "page")]
    assert rb == [("blk.1", 0, "page"), (None, 1, "page"), ("blk.0", 0, "page"),
                  (None, 7, "zero"), (None, 8, "page")]
    assert (A.ch.normal_pages, A.ch.zero_pages) == (6, 1)
    assert (B.ch.normal_pages, B.ch.zero_pages) == (4, 1)
    assert A.ch.last_sent_block == "blk.0" and B.ch.last_sent_block == "blk.0"


def test_reset_last_block_names_the_next_record(ram):
    b0 = ram.blocks[0]
    A = Wire("precopy")
    try:
        A.ch.send_range(b0, 0, 2)
        A.ch.reset_last_block()
        assert A.ch.last_sent_block is None
        A.ch.send_range(b0, 2, 3)
        A.ch.send_range(b0, 3, 4)
        recs = parse_records(A.finish())
    finally:
        A.close()
    assert recs == [("blk.0", 0, "page"), (None, 1, "page"), ("blk.0", 2, "page"), (None, 3, "zero")]


def test_receivers_decode_interleaved_channels(ram):
    """Each receiving channel (its own decoder) resolves CONTINUE to its own last block,
    and the page bytes are the sender's."""
    b0, b1 = ram.blocks
    A, B = Wire("precopy"), Wire("postcopy")
    try:
        A.ch.send_range(b0, 0, 8)
        B.ch.send_range(b1, 0, 8)
        A.ch.send_range(b0, 8, 16)
        B.ch.send_range(b1, 8, 16)
        B.ch.send_range(b0, 12, 14)
        A.ch.reset_last_block()
        A.ch.send_range(b1, 2, 3)
        streams = {"precopy": A.finish(), "postcopy": B.finish()}
    finally:
        A.close()
        B.close()
    got = {}
    for name, data in streams.items():
        dec = StreamDecoder(ram.infos(), mode="pages", channel_name=name)
        events, left = decode_chunked(dec, data, [1000, 5000, 3])
        assert left == 0 and events[-1] == ("eos",) and dec.at_boundary()
        got[name] = events[:-1]
    for name, expected in (("precopy", [(b0, range(16)), (b1, [2])]),
                           ("postcopy", [(b1, range(16)), (b0, [12, 13])])):
        want = []
        for blk, pages in expected:
            for p in pages:
                if blk.words[p].any():
                    want.append(("page", blk.idstr, p, blk.pages[p].tobytes()))
                else:
                    want.append(("zero", blk.idstr, p))
        assert got[name] == want, name


def test_recv_channel_over_socket_ends_cleanly(ram):
    """A bare page channel read through RamRecvChannel: events, then None at EOS + end of stream."""
    b0, b1 = ram.blocks
    a, b = socket.socketpair()
    try:
        tx = RamSendChannel(QEMUFileWriter(SocketTransport(a)), "postcopy")
        tx.send_range(b1, 0, 16)
        tx.send_eos()
        tx.flush()
        a.shutdown(socket.SHUT_WR)
        rx = RamRecvChannel(QEMUFileReader(SocketTransport(b), bufsize=8192),
                            StreamDecoder(ram.infos(), mode="pages", channel_name="postcopy"), "postcopy")
        target = np.zeros_like(b1.pages)
        n = 0
        while (ev := rx.next_event()) is not None:
            if isinstance(ev, codec.RamRun):
                assert ev.block.idstr == "blk.1"
                if ev.data is not None:
                    target[ev.pages] = ev.data
                n += len(ev)
            else:
                assert isinstance(ev, codec.RamEOS)
        assert n == 16
        assert np.array_equal(target, b1.pages)
        assert rx.last_recv_block.idstr == "blk.1"
        assert rx.transferred == tx.transferred
    finally:
        a.close()
        b.close()


def test_continue_on_a_channel_that_never_named_a_block(ram):
    """Channel A named blk.0; a CONTINUE on channel B (which never named a block) is an error."""
    infos = ram.infos()
    dec_a = StreamDecoder(infos, mode="pages", channel_name="precopy")
    dec_b = StreamDecoder(infos, mode="pages", channel_name="postcopy")
    ev, _ = dec_a.next_event(codec.encode_zero_page(0, "blk.0"))
    assert ev.block.idstr == "blk.0" and dec_a.last_block.idstr == "blk.0"
    with pytest.raises(ProtocolError) as ei:
        dec_b.next_event(codec.encode_zero_page(PAGE, None))
    msg = str(ei.value)
    assert "CONTINUE before any block was named on this channel" in msg
    assert "channel postcopy" in msg
    # Channel A may continue.
    ev, _ = dec_a.next_event(codec.encode_zero_page(PAGE, None))
    assert ev.block.idstr == "blk.0" and ev.pages.tolist() == [1]


def test_continue_refers_to_this_channels_block(ram):
    infos = ram.infos()
    dec_a = StreamDecoder(infos, mode="pages", channel_name="a")
    dec_b = StreamDecoder(infos, mode="pages", channel_name="b")
    dec_a.next_event(codec.encode_zero_page(0, "blk.0"))
    dec_b.next_event(codec.encode_zero_page(0, "blk.1"))
    ev_a, _ = dec_a.next_event(codec.encode_zero_page(5 * PAGE, None))
    ev_b, _ = dec_b.next_event(codec.encode_zero_page(5 * PAGE, None))
    assert (ev_a.block.idstr, ev_b.block.idstr) == ("blk.0", "blk.1")


def test_precopy_channel_writes_a_decodable_stream(ram):
    b0, b1 = ram.blocks
    A = Wire("precopy", PrecopyChannel)
    ch = A.ch
    try:
        ch.send_header()
        ch.send_raw(codec.encode_ping(3))
        sid = ch.new_section_id()
        ch.ram_start(sid, ram.blocks, postcopy=False)
        ch.section_part(sid)
        ch.send_range(b0, 0, 16)
        ch.send_eos()
        ch.section_footer(sid)
        ch.section_part(sid, end=True)
        ch.send_range(b1, 0, 16)
        ch.send_eos()
        ch.section_footer(sid)
        dev = ch.new_section_id()
        assert dev == sid + 1
        ch.device_full(dev, "ferry-guest", 1, b'{"k": 2}')
        ch.send_eof({"page_size": PAGE})
        ch.flush()
        A.a.shutdown(socket.SHUT_WR)
        data = b"".join(iter(lambda: A.b.recv(1 << 16), b""))
    finally:
        A.close()
    events, left = decode_chunked(StreamDecoder(ram.infos(), devices=[DeviceSpec("ferry-guest", 1)]), data,
                                  [777, 4096, 13])
    assert left == 0
    kinds = [e[0] for e in events]
    assert kinds[:6] == ["header", "cmd", "start", "blocks", "eos", "footer"]
    assert ("dev", "ferry-guest", 0, 1, b'{"k": 2}') in events
    assert events[-2:] == [("eof",), ("vmdesc", {"page_size": PAGE})]
    pages = {(e[1], e[2]): e for e in events if e[0] in ("page", "zero")}
    assert len(pages) == 32
    for blk in ram.blocks:
        for p in range(blk.npages):
            e = pages[(blk.idstr, p)]
            assert (e[0] == "page") == bool(blk.words[p].any())
            if e[0] == "page":
                assert e[3] == blk.pages[p].tobytes()
