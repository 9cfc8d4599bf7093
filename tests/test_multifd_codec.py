"""The multifd channel codec (channels/multifd_codec.py): round trips and named errors.

A channel's packets (pages of random blocks, data pages first then zero
pages, with and without check values, SYNC packets between passes, FIN at
the end) decode back to what was encoded whatever the chunk boundaries; each
kind of bad input raises its own named error with the value; random and
mutated bytes raise ProtocolError (or decode), nothing else.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels import multifd_codec as M
from ferry_migrate.channels.codec import BlockInfo, StreamDecoder
from ferry_migrate.channels.errors import ProtocolError

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
PAGE = C.TARGET_PAGE_SIZE
BLOCKS = [BlockInfo(0, "pc.ram", 64 * PAGE, PAGE), BlockInfo(1, "vga.vram", 8 * PAGE, PAGE)]


def packet_bytes(block, pages, nnormal, num, pass_, flags=0, checks=None, seed=0):
    """A whole packet: head and the data pages (page i filled with a byte derived from its index)."""
    head = M.encode_packet_head(flags, block.idstr if block else "", np.asarray(pages, np.int64), nnormal,
                                num, pass_, checks)
    data = b"".join(bytes([(int(p) * 7 + seed) % 251 + 1]) * PAGE for p in pages[:nnormal])
    return head + data


@st.composite
def channel_streams(draw):
    """(bytes, expected [(flags, block idstr, pages, nnormal, pass)]) of one channel."""
    out, want = [], []
    num, pass_ = 0, 1
    for _ in range(draw(st.integers(1, 6))):
        for _ in range(draw(st.integers(0, 3))):
            blk = draw(st.sampled_from(BLOCKS))
            npg = blk.length // PAGE
            pages = draw(st.lists(st.integers(0, npg - 1), min_size=1, max_size=min(npg, 12), unique=True))
            nnormal = draw(st.integers(0, len(pages)))
            checks = draw(st.none() | st.just(np.arange(len(pages), dtype=np.uint64) * np.uint64(0x9E37)))
            num += 1
            out.append(packet_bytes(blk, pages, nnormal, num, pass_, checks=checks))
            want.append((0, blk.idstr, pages, nnormal, pass_, checks is not None))
        num += 1
        out.append(packet_bytes(None, [], 0, num, pass_, C.FERRY_MULTIFD_FLAG_SYNC))
        want.append((C.FERRY_MULTIFD_FLAG_SYNC, None, [], 0, pass_, False))
        pass_ += 1
    num += 1
    out.append(packet_bytes(None, [], 0, num, pass_, C.FERRY_MULTIFD_FLAG_FIN))
    want.append((C.FERRY_MULTIFD_FLAG_FIN, None, [], 0, pass_, False))
    return b"".join(out), want


def decode_all(data: bytes, cuts: list[int]):
    """Decode a channel fed in chunks ending at ``cuts``; SYNC packets are released at once."""
    dec = M.MultifdDecoder(BLOCKS, "multifd-1")
    got, buf, fed = [], bytearray(), 0
    for end in sorted(set(cuts)) + [len(data)]:
        if dec.done:
            break
        buf += data[fed:end]
        fed = max(fed, end)
        while True:
            pkt, n = dec.next_packet(memoryview(bytes(buf)))
            if pkt is M.NEED_DATA:
                break
            got.append(pkt)
            del buf[:n]
            if pkt.sync:
                dec.advance()
            if pkt.fin:
                break
    return dec, got, buf


@SETTINGS
@given(channel_streams(), st.lists(st.integers(0, 1 << 16), max_size=8))
def test_packets_round_trip_whatever_the_chunks(stream, cuts):
    data, want = stream
    dec, got, rest = decode_all(data, [c % (len(data) + 1) for c in cuts])
    assert not rest and dec.done
    assert len(got) == len(want)
    for pkt, (flags, idstr, pages, nnormal, pass_, checked) in zip(got, want):
        assert pkt.flags & ~C.FERRY_MULTIFD_FLAG_CHECKS == flags
        assert pkt.pass_ == pass_
        assert (pkt.block.idstr if pkt.block else None) == idstr
        assert pkt.pages.tolist() == pages and pkt.nnormal == nnormal
        assert (pkt.checks is not None) == checked
        for i, p in enumerate(pages[:nnormal]):
            assert int(pkt.data[i, 0]) == (p * 7) % 251 + 1 and int(pkt.data[i, -1]) == (p * 7) % 251 + 1


def one(data: bytes, dec=None):
    dec = dec or M.MultifdDecoder(BLOCKS, "multifd-1")
    return dec.next_packet(memoryview(data))


def test_page_count_beyond_packet_size_is_named():
    blk = BLOCKS[0]
    head = bytearray(M.encode_packet_head(0, blk.idstr, np.arange(4), 4, 1, 1))
    # normal pages field (be32 at byte 8) says 513
    head[8:12] = (C.FERRY_MULTIFD_PACKET_PAGES + 1).to_bytes(4, "big")
    with pytest.raises(M.MultifdPacketTooLarge, match=r"513 data \+ 0 zero pages = 513, beyond the packet size "
                                                      r"of 512"):
        one(bytes(head))
    with pytest.raises(ValueError):
        M.encode_packet_head(0, blk.idstr, np.arange(C.FERRY_MULTIFD_PACKET_PAGES + 1), 0, 1, 1)


@pytest.mark.parametrize("off", [64 * PAGE, 1 << 40, 3 * PAGE + 8])
def test_offset_outside_the_block_is_named(off):
    blk = BLOCKS[0]
    data = bytearray(packet_bytes(blk, [1], 0, 1, 1))
    pos = C.FERRY_MULTIFD_HEADER_SIZE + len(blk.idstr)
    data[pos:pos + 8] = off.to_bytes(8, "big")
    with pytest.raises(M.MultifdOffsetOutside, match=f"offset 0x{off:x} outside block 'pc.ram'"):
        one(bytes(data))


def test_a_page_twice_in_one_packet_is_named():
    with pytest.raises(M.MultifdOffsetOutside, match="offset 0x3000 of block 'pc.ram' twice"):
        one(packet_bytes(BLOCKS[0], [3, 5, 3], 1, 1, 1))


def test_a_packet_for_a_pass_already_synced_is_named():
    dec = M.MultifdDecoder(BLOCKS, "multifd-2")
    pkt, n = one(packet_bytes(None, [], 0, 1, 1, C.FERRY_MULTIFD_FLAG_SYNC), dec)
    assert pkt.sync
    # Before the main stream's flush released the channel: nothing may follow.
    with pytest.raises(M.MultifdPassSynced, match="after the SYNC of pass 1"):
        one(packet_bytes(BLOCKS[0], [2], 1, 2, 2), dec)
    dec.advance()
    with pytest.raises(M.MultifdPassSynced, match=r"multifd channel multifd-2: packet for pass 1, already "
                                                  r"synced \(pass 2 is open\)"):
        one(packet_bytes(BLOCKS[0], [2], 1, 2, 1), dec)
    with pytest.raises(M.MultifdPassSynced, match="packet for pass 3 while pass 2 is open"):
        one(packet_bytes(BLOCKS[0], [2], 1, 2, 3), dec)
    with pytest.raises(M.MultifdPassSynced, match="before its SYNC"):
        dec.advance()


def test_packet_numbers_magic_flags_blocks_and_fin():
    with pytest.raises(M.MultifdError, match="packet number 2, expected 1"):
        one(packet_bytes(BLOCKS[0], [1], 1, 2, 1))
    bad = bytearray(packet_bytes(BLOCKS[0], [1], 1, 1, 1))
    bad[0] ^= 0xFF
    with pytest.raises(M.MultifdError, match="magic"):
        one(bytes(bad))
    bad = bytearray(packet_bytes(BLOCKS[0], [1], 1, 1, 1))
    bad[4:6] = (0x80).to_bytes(2, "big")
    with pytest.raises(M.MultifdError, match="unknown flag bits 0x80"):
        one(bytes(bad))
    with pytest.raises(M.MultifdError, match="unknown RAM block 'nope'"):
        one(packet_bytes(BlockInfo(0, "nope", PAGE, PAGE), [0], 1, 1, 1))
    with pytest.raises(M.MultifdError, match="without pages, SYNC or FIN"):
        one(packet_bytes(None, [], 0, 1, 1))
    dec = M.MultifdDecoder(BLOCKS)
    one(packet_bytes(None, [], 0, 1, 1, C.FERRY_MULTIFD_FLAG_FIN), dec)
    with pytest.raises(M.MultifdError, match="after the FIN"):
        one(packet_bytes(None, [], 0, 2, 1, C.FERRY_MULTIFD_FLAG_SYNC), dec)


def test_init_record_names_channel_id_and_count():
    assert M.parse_init(M.encode_init(3, 4), 4) == 3
    with pytest.raises(M.MultifdChannelTwice, match="channel id 5, expected 1 to 4"):
        M.parse_init(bytearray(M.encode_init(4, 4))[:8] + bytes([5, 4, 0, 0, 0, 0, 0, 0]), 4)
    with pytest.raises(M.MultifdError, match="multifd-channels: source 2, destination 4"):
        M.parse_init(M.encode_init(1, 2), 4)
    with pytest.raises(ValueError):
        M.encode_init(0, 2)
    for cls in (M.MultifdPacketTooLarge, M.MultifdOffsetOutside, M.MultifdPassSynced, M.MultifdChannelTwice,
                M.MultifdChannelMissing):
        assert issubclass(cls, ProtocolError)


@SETTINGS
@given(channel_streams(), st.data())
def test_mutated_packets_decode_or_raise_protocol_error(stream, data):
    raw = bytearray(stream[0])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    try:
        decode_all(bytes(raw), [])
    except ProtocolError:
        pass


def test_main_stream_flush_record_only_with_multifd():
    rec = codec.encode_multifd_flush()
    assert rec == C.RAM_SAVE_FLAG_MULTIFD_FLUSH.to_bytes(8, "big")
    part = codec.encode_section_start(C.QEMU_VM_SECTION_START, 1, "ram", 0, 4)
    mem = codec.encode_ram_mem_size([(b.idstr, b.length, b.page_size) for b in BLOCKS])
    blob = part + mem + codec.encode_footer(1) + codec.encode_section_part(C.QEMU_VM_SECTION_PART, 1) + rec
    for multifd, expect in ((True, codec.MultifdFlush), (False, ProtocolError)):
        dec = StreamDecoder(BLOCKS, mode="packaged")
        dec.multifd = multifd
        mv, pos, evs = memoryview(blob), 0, []
        try:
            while pos < len(blob):
                ev, n = dec.next_event(mv[pos:])
                pos += n
                evs.append(ev)
        except ProtocolError as e:
            assert expect is ProtocolError and "MULTIFD_FLUSH" in str(e)
            continue
        assert isinstance(evs[-1], expect)
        assert dec.resumed().multifd
