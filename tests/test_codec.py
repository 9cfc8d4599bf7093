"""Codec round trips and robustness (channels/codec.py).

Streams built with the encoders (header, configuration, RAM START with the
MEM_SIZE block list, PART/END sections of PAGE/ZERO/EOS records with and
without CONTINUE, commands, device FULL sections, EOF, VMDESCRIPTION) decode
back to what was encoded, whatever the chunk boundaries (hypothesis picks
them), through both the bulk path (runs of CONTINUE records) and the
single-record path. Return-path messages round trip too. Random and mutated
streams must decode or raise ProtocolError, never anything else.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels.codec import BlockInfo, DeviceSpec, ReturnPathDecoder, StreamDecoder
from ferry_migrate.channels.errors import ProtocolError

from .conftest import PAGE, decode_chunked, decode_rp_chunked, device_full, page_bytes, ram_part, ram_prologue

# Examples come from the Hypothesis profile (tests/conftest.py: "dev", or "ci" when CI is set).
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEVICES = [DeviceSpec("ferry-guest", 1), DeviceSpec("dev.b", 3)]

# ---------------------------------------------------------------------------
# A model of a stream: encode it, and say what the decoder must give back
# ---------------------------------------------------------------------------

names = st.text(alphabet=st.sampled_from("abcxyz.:/0-é€"), min_size=1, max_size=12)


@st.composite
def block_sets(draw):
    ns = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    blocks = []
    for i, n in enumerate(ns):
        if draw(st.booleans()):
            blocks.append(BlockInfo(i, n, draw(st.integers(1, 40)) * PAGE, C.PAGE_SIZE_4K))
        else:
            blocks.append(BlockInfo(i, n, draw(st.integers(1, 2)) * C.PAGE_SIZE_2M, C.PAGE_SIZE_2M))
    return blocks


# Run lengths around the decoder's probing windows (BULK_PROBE records first, then 4x
# larger windows up to BULK_MAX records a RamRun), as well as short ones.
_P, _M = codec.BULK_PROBE, codec.BULK_MAX
PAGE_RUN_COUNTS = st.integers(1, 6) | st.sampled_from([_P - 1, _P, _P + 1, 4 * _P, 4 * _P + 1, 16 * _P + 3])
ZERO_RUN_COUNTS = PAGE_RUN_COUNTS | st.sampled_from([64 * _P + 1, _M, _M + 1, 2 * _M + 5])


@st.composite
def ram_runs(draw, blocks):
    """[(block, first page, count, kind, bulk-encoded)] for one section.

    kind: "page" (PAGE records of non-zero data), "page0" (PAGE records whose data is
    all zero, as QEMU sends when it does not detect zero pages) or "zero" (ZERO records).
    """
    runs = []
    for _ in range(draw(st.integers(0, 4))):
        b = draw(st.sampled_from(blocks))
        npages = b.length // PAGE
        kind = draw(st.sampled_from(["page", "page0", "zero"]))
        count = draw(ZERO_RUN_COUNTS if kind == "zero" else PAGE_RUN_COUNTS)
        first = draw(st.integers(0, npages - 1))
        runs.append((b, first, count, kind, draw(st.booleans())))
    return runs


ZERO_DATA = bytes(PAGE)


class Channel:
    """Encoder side of one channel: remembers its last block, as RamSendChannel does."""

    def __init__(self):
        self.last = None
        self.seed = 0
        self.records = []  # (named, kind) per record, to predict the decoder's runs

    def encode_runs(self, runs) -> tuple[bytes, list]:
        out = bytearray()
        expect = []
        for b, first, count, kind, bulk in runs:
            npages = b.length // PAGE
            idx = [(first + k) % npages for k in range(count)]
            datas = []
            for p in idx:
                self.seed += 1
                datas.append(page_bytes(self.seed) if kind == "page" else ZERO_DATA if kind == "page0" else None)
            kind = "page" if kind == "page0" else kind
            flag = C.RAM_SAVE_FLAG_PAGE if kind == "page" else C.RAM_SAVE_FLAG_ZERO
            start = 0
            if self.last != b.idstr:
                # The first record of a block on this channel names it.
                p = idx[0]
                if kind == "page":
                    out += codec.encode_page_header(p * PAGE, flag, b.idstr) + datas[0]
                else:
                    out += codec.encode_zero_page(p * PAGE, b.idstr)
                self.records.append((True, kind))
                self.last = b.idstr
                start = 1
            rest = idx[start:]
            if rest and bulk:
                arr = np.array(rest, dtype=np.int64)
                if kind == "page":
                    hdr = codec.page_run_headers(arr, flag).tobytes()
                    for j in range(len(rest)):
                        out += hdr[8 * j:8 * j + 8] + datas[start + j]
                else:
                    out += codec.zero_run_records(arr)
            else:
                for j, p in enumerate(rest):
                    if kind == "page":
                        out += codec.encode_page_header(p * PAGE, flag, None) + datas[start + j]
                    else:
                        out += codec.encode_zero_page(p * PAGE, None)
            self.records.extend((False, kind) for _ in rest)
            for p, d in zip(idx, datas):
                expect.append(("page", b.idstr, p, d) if kind == "page" else ("zero", b.idstr, p))
        self.records.append(None)  # EOS ends a run
        return bytes(out), expect

    def expected_run_sizes(self) -> list[int]:
        """RamRun lengths when the whole stream is buffered: a named record alone,
        then each group of CONTINUE records of one kind as one bulk run."""
        sizes = []
        prev = None
        for r in self.records:
            if r is None:
                prev = None
                continue
            named, kind = r
            if not named and prev == kind:
                sizes[-1] += 1
            else:
                sizes.append(1)
            prev = None if named else kind
        # A bulk run stops at BULK_MAX records; the rest starts a new one.
        split = []
        for n in sizes:
            while n > codec.BULK_MAX:
                split.append(codec.BULK_MAX)
                n -= codec.BULK_MAX
            split.append(n)
        return split


@st.composite
def streams(draw):
    """(blocks, stream bytes, expected events, channel model)."""
    blocks = draw(block_sets())
    ch = Channel()
    out = bytearray(codec.encode_header())
    ev = [("header", 3)]
    if draw(st.booleans()):
        m = draw(st.text(max_size=20))
        out += codec.encode_configuration(m)
        ev.append(("config", m))
    if draw(st.booleans()):
        out += codec.encode_open_return_path()
        ev.append(("cmd", C.MIG_CMD_OPEN_RETURN_PATH, b""))
    advise = draw(st.sampled_from([None, "empty", "postcopy"]))
    if advise == "empty":
        out += codec.encode_postcopy_advise(None)
        ev.append(("cmd", C.MIG_CMD_POSTCOPY_ADVISE, b""))
    elif advise == "postcopy":
        summary = 0
        for b in blocks:
            summary |= b.page_size
        cmd = codec.encode_postcopy_advise(summary)
        out += cmd
        ev.append(("cmd", C.MIG_CMD_POSTCOPY_ADVISE, cmd[5:]))
    postcopy = advise == "postcopy"
    out += ram_prologue(blocks, postcopy=postcopy, header=False)
    ev += [("start", C.QEMU_VM_SECTION_START, 0, "ram", 0, 4),
           ("blocks", sum(b.length for b in blocks),
            [(b.idstr, b.length, b.page_size if postcopy and b.page_size != C.PAGE_SIZE_4K else None)
             for b in blocks]),
           ("eos",), ("footer", 0)]
    next_sid = 1
    items = draw(st.lists(st.sampled_from(["part", "part", "ping", "discard", "packaged", "device"]),
                          max_size=6))
    for it in items + ["end"]:
        if it in ("part", "end"):
            recs, exp = ch.encode_runs(draw(ram_runs(blocks)))
            t = C.QEMU_VM_SECTION_END if it == "end" else C.QEMU_VM_SECTION_PART
            out += ram_part(recs, end=it == "end")
            ev += [("part", t, 0)] + exp + [("eos",), ("footer", 0)]
        elif it == "ping":
            v = draw(st.integers(0, 2**32 - 1))
            out += codec.encode_ping(v)
            ev.append(("cmd", C.MIG_CMD_PING, v.to_bytes(4, "big")))
        elif it == "discard":
            b = draw(st.sampled_from(blocks))
            ranges = draw(st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 2**40)), max_size=30))
            for cmd in codec.encode_postcopy_discard(b.idstr, ranges):
                out += cmd
                ev.append(("cmd", C.MIG_CMD_POSTCOPY_RAM_DISCARD, cmd[5:]))
        elif it == "packaged":
            blob = draw(st.binary(max_size=300))
            out += codec.encode_packaged(blob)
            ev.append(("cmd", C.MIG_CMD_PACKAGED, blob))
        elif it == "device":
            spec = draw(st.sampled_from(DEVICES))
            ver = draw(st.integers(1, spec.version_id))
            payload = draw(st.binary(max_size=200))
            out += device_full(next_sid, spec.idstr, ver, payload)
            ev += [("start", C.QEMU_VM_SECTION_FULL, next_sid, spec.idstr, 0, ver),
                   ("dev", spec.idstr, 0, ver, payload), ("footer", next_sid)]
            next_sid += 1
    out += codec.encode_eof()
    ev.append(("eof",))
    if draw(st.booleans()):
        desc = draw(st.dictionaries(st.text(max_size=8), st.integers(-2**63, 2**63) | st.text(max_size=8), max_size=4))
        out += codec.encode_vmdesc(desc)
        ev.append(("vmdesc", desc))
    return blocks, bytes(out), ev, ch


def pinned_stream(runs_by_section) -> tuple:
    """A fixed (blocks, stream, expected events, channel model) like streams() draws, for @example.

    ``runs_by_section``: per RAM section, runs as ram_runs() gives them, with block
    indices instead of blocks: [(block index, first, count, kind, bulk)].
    """
    blocks = [BlockInfo(0, "pc.ram", 40 * PAGE, C.PAGE_SIZE_4K), BlockInfo(1, "big", C.PAGE_SIZE_2M, C.PAGE_SIZE_2M)]
    ch = Channel()
    out = bytearray(codec.encode_header() + ram_prologue(blocks, header=False))
    ev = [("header", 3), ("start", C.QEMU_VM_SECTION_START, 0, "ram", 0, 4),
          ("blocks", sum(b.length for b in blocks), [(b.idstr, b.length, None) for b in blocks]),
          ("eos",), ("footer", 0)]
    for i, runs in enumerate(runs_by_section):
        end = i == len(runs_by_section) - 1
        recs, exp = ch.encode_runs([(blocks[b], *rest) for b, *rest in runs])
        out += ram_part(recs, end=end)
        ev += [("part", C.QEMU_VM_SECTION_END if end else C.QEMU_VM_SECTION_PART, 0)] + exp + [("eos",), ("footer", 0)]
    out += codec.encode_eof()
    ev.append(("eof",))
    return blocks, bytes(out), ev, ch


# Regressions pinned as examples: runs that end exactly at, just past and far past the
# probing windows and BULK_MAX; PAGE records of all-zero data beside ZERO records;
# a block change right after a long run; CONTINUE carried across sections.
PINNED = [
    pinned_stream([[(1, 0, 1 + codec.BULK_PROBE, "page0", True), (1, 17, codec.BULK_MAX + 1, "zero", True)],
                   [(1, 5, 4 * codec.BULK_PROBE + 1, "page", False), (0, 3, 2, "zero", True)]]),
    pinned_stream([[(0, 39, 3, "page", True)], [(0, 0, codec.BULK_PROBE, "zero", True),
                                                 (0, 0, codec.BULK_PROBE, "page0", True)]]),
]


def cut_sizes(draw, total: int, max_cuts: int = 40) -> list[int]:
    """Chunk sizes for random chunk boundaries over ``total`` bytes."""
    if total < 2:
        return [max(total, 1)]
    cuts = sorted(draw(st.sets(st.integers(1, total - 1), max_size=max_cuts)))
    edges = [0] + cuts + [total]
    return [b - a for a, b in zip(edges, edges[1:])]


# ---------------------------------------------------------------------------
# Stream round trips
# ---------------------------------------------------------------------------

@SETTINGS
@given(st.data())
def test_stream_round_trip_random_chunks(data):
    blocks, stream, expected, _ = data.draw(streams())
    chunks = cut_sizes(data.draw, len(stream))
    dec = StreamDecoder(blocks, devices=DEVICES)
    events, left = decode_chunked(dec, stream, chunks)
    assert left == 0
    assert events == expected
    assert dec.at_boundary()
    assert dec.offset == len(stream)


@SETTINGS
@given(streams())
@example(PINNED[0])
@example(PINNED[1])
def test_stream_all_buffered_uses_bulk_runs(s):
    """With the whole stream buffered, each group of CONTINUE records of one kind
    comes out as one RamRun (bulk path), a named record as a run of one."""
    blocks, stream, expected, ch = s
    sizes = []
    events, left = decode_chunked(StreamDecoder(blocks, devices=DEVICES), stream, None, run_sizes=sizes)
    assert left == 0
    assert events == expected
    assert sizes == ch.expected_run_sizes()


def _fixed_stream():
    blocks = [BlockInfo(0, "pc.ram", 64 * PAGE, C.PAGE_SIZE_4K), BlockInfo(1, "vga.vram", 16 * PAGE, C.PAGE_SIZE_4K)]
    ch = Channel()
    recs, exp = ch.encode_runs([(blocks[0], 0, 20, "page", True), (blocks[0], 20, 30, "zero", True),
                                (blocks[1], 3, 5, "page", False), (blocks[0], 50, 10, "page", True)])
    stream = ram_prologue(blocks) + ram_part(recs, end=True) + codec.encode_eof()
    return blocks, stream, exp, ch


def test_bulk_path_one_run_per_group():
    blocks, stream, exp, ch = _fixed_stream()
    sizes = []
    events, _ = decode_chunked(StreamDecoder(blocks), stream, None, run_sizes=sizes)
    assert [e for e in events if e[0] in ("page", "zero")] == exp
    # named pc.ram page, 19 CONTINUE pages, 30 CONTINUE zeros, named vga page + 4, named pc.ram + 9
    assert sizes == [1, 19, 30, 1, 4, 1, 9]


def test_single_record_path_small_chunks():
    """Fed in pieces smaller than two records, every record goes through the single-record path."""
    blocks, stream, exp, _ = _fixed_stream()
    sizes = []
    events, _ = decode_chunked(StreamDecoder(blocks), stream, [4000], run_sizes=sizes)
    assert [e for e in events if e[0] in ("page", "zero")] == exp
    page_runs = sizes[:20]
    assert page_runs == [1] * 20
    sizes2 = []
    events2, _ = decode_chunked(StreamDecoder(blocks), stream, [5], run_sizes=sizes2)
    assert events2 == events
    assert set(sizes2) == {1}


def test_decoder_byte_by_byte_small_stream():
    blocks = [BlockInfo(0, "b", 4 * PAGE, C.PAGE_SIZE_4K)]
    ch = Channel()
    recs, exp = ch.encode_runs([(blocks[0], 0, 4, "page", True), (blocks[0], 0, 3, "zero", True)])
    stream = (ram_prologue(blocks) + codec.encode_ping(7) + ram_part(recs, end=True)
              + device_full(1, "ferry-guest", 1, b'{"x": 1}') + codec.encode_eof()
              + codec.encode_vmdesc({"page_size": 4096}))
    events, left = decode_chunked(StreamDecoder(blocks, devices=DEVICES), stream, [1])
    assert left == 0
    assert [e for e in events if e[0] in ("page", "zero")] == exp
    assert events[-1] == ("vmdesc", {"page_size": 4096})
    assert ("dev", "ferry-guest", 0, 1, b'{"x": 1}') in events


def test_page_data_is_a_view_into_the_callers_buffer():
    blocks = [BlockInfo(0, "b", 4 * PAGE, C.PAGE_SIZE_4K)]
    buf = bytearray(codec.encode_page_header(0, C.RAM_SAVE_FLAG_PAGE, "b") + page_bytes(1)
                    + codec.encode_page_header(PAGE, C.RAM_SAVE_FLAG_PAGE, None) + page_bytes(2)
                    + codec.encode_page_header(2 * PAGE, C.RAM_SAVE_FLAG_PAGE, None) + page_bytes(3))
    dec = StreamDecoder(blocks, mode="pages")
    ev, n = dec.next_event(buf)
    ev, n2 = dec.next_event(memoryview(buf)[n:])
    assert isinstance(ev, codec.RamRun) and len(ev) == 2 and ev.pages.tolist() == [1, 2]
    buf[n + 8] ^= 0xFF  # first data byte of page 1
    assert ev.data[0, 0] == page_bytes(2)[0] ^ 0xFF


@SETTINGS
@given(st.data())
def test_packaged_blob_decodes_as_nested_stream(data):
    """A PACKAGED blob holds a nested stream (no header); it decodes in "packaged" mode."""
    blocks = [BlockInfo(0, "pc.ram", 8 * PAGE, C.PAGE_SIZE_4K)]
    ch = Channel()
    recs, exp = ch.encode_runs(data.draw(ram_runs(blocks)))
    ping = data.draw(st.integers(0, 2**32 - 1))
    inner = (codec.encode_postcopy_listen()
             + codec.encode_section_start(C.QEMU_VM_SECTION_START, 0, "ram", 0, 4)
             + codec.encode_ram_mem_size([("pc.ram", 8 * PAGE, PAGE)]) + codec.encode_footer(0)
             + ram_part(recs, end=True) + device_full(1, "ferry-guest", 1, b"{}")
             + codec.encode_ping(ping) + codec.encode_postcopy_run())
    outer = codec.encode_header() + codec.encode_packaged(inner)
    events, _ = decode_chunked(StreamDecoder(blocks), outer, cut_sizes(data.draw, len(outer)))
    assert events == [("header", 3), ("cmd", C.MIG_CMD_PACKAGED, inner)]
    nested, left = decode_chunked(StreamDecoder(blocks, mode="packaged", devices=DEVICES), inner,
                                  cut_sizes(data.draw, len(inner)))
    assert left == 0
    assert nested[0] == ("cmd", C.MIG_CMD_POSTCOPY_LISTEN, b"")
    assert [e for e in nested if e[0] in ("page", "zero")] == exp
    assert nested[-2:] == [("cmd", C.MIG_CMD_PING, ping.to_bytes(4, "big")), ("cmd", C.MIG_CMD_POSTCOPY_RUN, b"")]


def test_packaged_refuses_eof_and_oversize():
    dec = StreamDecoder([], mode="packaged")
    with pytest.raises(ProtocolError, match="EOF inside a PACKAGED"):
        dec.next_event(codec.encode_eof())
    with pytest.raises(ValueError, match="PACKAGED blob"):
        codec.encode_packaged(bytes(C.MAX_VM_CMD_PACKAGED_SIZE + 1))
    big = codec.encode_command(C.MIG_CMD_PACKAGED, (C.MAX_VM_CMD_PACKAGED_SIZE + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match=f"PACKAGED: length {C.MAX_VM_CMD_PACKAGED_SIZE + 1}"):
        StreamDecoder([], mode="packaged").next_event(big)


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

@SETTINGS
@given(name=names, ranges=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=40))
def test_postcopy_discard_splits_at_12_pairs(name, ranges):
    cmds = codec.encode_postcopy_discard(name, ranges)
    assert len(cmds) == -(-len(ranges) // C.MAX_DISCARDS_PER_COMMAND)
    got = []
    dec = StreamDecoder([], mode="packaged")
    for i, c in enumerate(cmds):
        ev, n = dec.next_event(c)
        assert n == len(c)
        assert ev.cmd == C.MIG_CMD_POSTCOPY_RAM_DISCARD
        blk, pairs = codec.parse_postcopy_discard(ev.payload)
        assert blk == name
        assert 1 <= len(pairs) <= 12
        if i < len(cmds) - 1:
            assert len(pairs) == 12
        got += pairs
    assert got == ranges


def test_postcopy_discard_parse_rejects():
    good = codec.encode_postcopy_discard("ram", [(0, 4096)])[0][5:]
    with pytest.raises(ProtocolError, match="version 1"):
        codec.parse_postcopy_discard(b"\x01" + good[1:])
    with pytest.raises(ProtocolError, match="too short"):
        codec.parse_postcopy_discard(b"\x00\x01")
    with pytest.raises(ProtocolError, match="name length 200"):
        codec.parse_postcopy_discard(b"\x00\xc8abc\x00")
    with pytest.raises(ProtocolError, match="not a multiple of 16"):
        codec.parse_postcopy_discard(good + b"\x00")
    thirteen = good[:6] + bytes(16 * 13)
    with pytest.raises(ProtocolError, match="13 ranges, at most 12"):
        codec.parse_postcopy_discard(thirteen)


@pytest.mark.parametrize("summary", [None, C.PAGE_SIZE_4K | C.PAGE_SIZE_2M])
def test_postcopy_advise_round_trip(summary):
    cmd = codec.encode_postcopy_advise(summary)
    dec = StreamDecoder([], mode="packaged")
    ev, n = dec.next_event(cmd)
    assert n == len(cmd)
    parsed = codec.parse_postcopy_advise(ev.payload)
    assert parsed == (None if summary is None else (summary, PAGE))
    assert dec.postcopy_advised == (summary is not None)
    with pytest.raises(ProtocolError, match="POSTCOPY_ADVISE: length 8"):
        codec.parse_postcopy_advise(bytes(8))


@given(st.integers(0, 2**32 - 1))
def test_ping_round_trip(v):
    ev, _ = StreamDecoder([], mode="packaged").next_event(codec.encode_ping(v))
    assert codec.parse_ping(ev.payload) == v


def test_command_payload_limit():
    with pytest.raises(ValueError, match="65536 bytes"):
        codec.encode_command(C.MIG_CMD_RECV_BITMAP, bytes(65536))


def test_postcopy_page_sizes_in_mem_size():
    """With postcopy advised, a block whose page size is not 4K carries it in MEM_SIZE."""
    blocks = [BlockInfo(0, "a", PAGE, C.PAGE_SIZE_4K), BlockInfo(1, "h", C.PAGE_SIZE_2M, C.PAGE_SIZE_2M)]
    payload = codec.encode_ram_mem_size([(b.idstr, b.length, b.page_size) for b in blocks], postcopy=True)
    plain = codec.encode_ram_mem_size([(b.idstr, b.length, b.page_size) for b in blocks], postcopy=False)
    assert len(payload) == len(plain) + 8
    stream = codec.encode_header() + codec.encode_postcopy_advise(C.PAGE_SIZE_4K | C.PAGE_SIZE_2M) + \
        codec.encode_section_start(C.QEMU_VM_SECTION_START, 0, "ram", 0, 4) + payload
    events, _ = decode_chunked(StreamDecoder(blocks), stream, None)
    assert ("blocks", PAGE + C.PAGE_SIZE_2M, [("a", PAGE, None), ("h", C.PAGE_SIZE_2M, C.PAGE_SIZE_2M)]) in events
    # The destination's huge page size differs: refused, naming both.
    other = [blocks[0], BlockInfo(1, "h", C.PAGE_SIZE_2M, C.PAGE_SIZE_1G)]
    with pytest.raises(ProtocolError, match="page size 0x200000, destination has 0x40000000"):
        decode_chunked(StreamDecoder(other), stream, None)


# ---------------------------------------------------------------------------
# Return path
# ---------------------------------------------------------------------------

rp_blocks = {"pc.ram": BlockInfo(0, "pc.ram", 64 * PAGE, C.PAGE_SIZE_4K),
             "huge": BlockInfo(1, "huge", 4 * C.PAGE_SIZE_2M, C.PAGE_SIZE_2M)}

rp_items = st.one_of(
    st.tuples(st.just("shut"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("pong"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("req"), names, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("digests"), st.dictionaries(names, st.binary(min_size=32, max_size=32), max_size=5)),
)


@SETTINGS
@given(st.data())
def test_return_path_round_trip(data):
    items = data.draw(st.lists(rp_items, max_size=12))
    out = bytearray()
    last = None
    expect = []
    for it in items:
        kind = it[0]
        if kind == "shut":
            out += codec.encode_rp_shut(it[1])
            expect.append((C.MIG_RP_MSG_SHUT, it[1]))
        elif kind == "pong":
            out += codec.encode_rp_pong(it[1])
            expect.append((C.MIG_RP_MSG_PONG, it[1]))
        elif kind == "req":
            _, name, start, length = it
            # REQ_PAGES_ID when the block changed, else REQ_PAGES (inherits the block).
            t = C.MIG_RP_MSG_REQ_PAGES if name == last else C.MIG_RP_MSG_REQ_PAGES_ID
            out += codec.encode_rp_req_pages(start, length, None if name == last else name)
            last = name
            expect.append((t, name, start, length))
        else:
            out += codec.encode_rp_digests(it[1])
            expect.append((C.MIG_RP_MSG_FERRY_DIGESTS, it[1]))
    msgs, left = decode_rp_chunked(ReturnPathDecoder(), bytes(out), cut_sizes(data.draw, len(out)))
    assert left == 0
    got = []
    for m in msgs:
        if m.type in (C.MIG_RP_MSG_SHUT, C.MIG_RP_MSG_PONG):
            got.append((m.type, m.value))
        elif m.type in (C.MIG_RP_MSG_REQ_PAGES, C.MIG_RP_MSG_REQ_PAGES_ID):
            got.append((m.type, m.block, m.start, m.length))
        else:
            got.append((m.type, m.digests))
    assert got == expect


def test_req_pages_inherits_previous_block():
    out = (codec.encode_rp_req_pages(0, PAGE, "pc.ram") + codec.encode_rp_req_pages(PAGE, PAGE, None)
           + codec.encode_rp_req_pages(0, C.PAGE_SIZE_2M, "huge") + codec.encode_rp_req_pages(C.PAGE_SIZE_2M, C.PAGE_SIZE_2M, None))
    msgs, _ = decode_rp_chunked(ReturnPathDecoder(), out)
    assert [(m.name, m.block, m.start) for m in msgs] == [
        ("REQ_PAGES_ID", "pc.ram", 0), ("REQ_PAGES", "pc.ram", PAGE),
        ("REQ_PAGES_ID", "huge", 0), ("REQ_PAGES", "huge", C.PAGE_SIZE_2M)]
    for m in msgs:
        assert codec.validate_page_request(rp_blocks, m) is rp_blocks[m.block]


def test_req_pages_without_block_is_rejected():
    with pytest.raises(ProtocolError, match="REQ_PAGES before any REQ_PAGES_ID"):
        ReturnPathDecoder().next_event(codec.encode_rp_req_pages(0, PAGE, None))


@pytest.mark.parametrize("raw,msg", [
    (codec.encode_rp(0, b""), "unknown message type 0"),
    (codec.encode_rp(99, b"xx"), "unknown message type 99 (length 2)"),
    (codec.encode_rp(C.MIG_RP_MSG_SHUT, b"\x00" * 3), "SHUT: length 3, expected 4"),
    (codec.encode_rp(C.MIG_RP_MSG_PONG, b"\x00" * 5), "PONG: length 5, expected 4"),
    (codec.encode_rp(C.MIG_RP_MSG_REQ_PAGES, b"\x00" * 8), "REQ_PAGES: length 8, expected 12"),
    (codec.encode_rp(C.MIG_RP_MSG_REQ_PAGES_ID, b"\x00" * 12), "REQ_PAGES_ID: length 12, at least 13"),
    (codec.encode_rp(C.MIG_RP_MSG_REQ_PAGES_ID, bytes(12) + b"\x05ab"), "name length 5 says 18"),
    (codec.encode_rp(C.MIG_RP_MSG_FERRY_DIGESTS, b""), "FERRY_DIGESTS: empty"),
    (codec.encode_rp(C.MIG_RP_MSG_FERRY_DIGESTS, b"\x01\x01a" + bytes(31)), "FERRY_DIGESTS: truncated"),
    (codec.encode_rp(C.MIG_RP_MSG_FERRY_DIGESTS, b"\x00\x00"), "1 trailing bytes"),
    (codec.encode_rp(C.MIG_RP_MSG_RECV_BITMAP, b"\x09ab"), "RECV_BITMAP: length 3, name length 9 says 10"),
])
def test_return_path_rejects(raw, msg):
    with pytest.raises(ProtocolError) as ei:
        decode_rp_chunked(ReturnPathDecoder(), raw)
    assert msg in str(ei.value)
    assert "return path" in str(ei.value)


@pytest.mark.parametrize("block,start,length,ok,msg", [
    ("pc.ram", 0, PAGE, True, ""),
    ("pc.ram", 63 * PAGE, PAGE, True, ""),
    ("huge", 3 * C.PAGE_SIZE_2M, C.PAGE_SIZE_2M, True, ""),
    ("nope", 0, PAGE, False, "unknown RAM block 'nope'"),
    (None, 0, PAGE, False, "unknown RAM block None"),
    ("huge", PAGE, C.PAGE_SIZE_2M, False, "start 0x1000 in block 'huge' not aligned to its host page size 0x200000"),
    ("huge", 0, PAGE, False, "length 0x1000 in block 'huge', expected its host page size 0x200000"),
    ("pc.ram", 0, 2 * PAGE, False, "length 0x2000 in block 'pc.ram'"),
    ("pc.ram", 64 * PAGE, PAGE, False, "range 0x40000+0x1000 outside block 'pc.ram' (length 0x40000)"),
    ("huge", 4 * C.PAGE_SIZE_2M, C.PAGE_SIZE_2M, False, "outside block 'huge'"),
])
def test_validate_page_request(block, start, length, ok, msg):
    m = codec.RpMessage(C.MIG_RP_MSG_REQ_PAGES_ID, start=start, length=length, block=block)
    if ok:
        assert codec.validate_page_request(rp_blocks, m) is rp_blocks[block]
    else:
        with pytest.raises(ProtocolError) as ei:
            codec.validate_page_request(rp_blocks, m)
        assert msg in str(ei.value)
        assert "REQ_PAGES_ID" in str(ei.value)


# ---------------------------------------------------------------------------
# Random and mutated input: ProtocolError or success, nothing else
# ---------------------------------------------------------------------------

FUZZ = settings(max_examples=3 * settings.default.max_examples, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
FUZZ_BLOCKS = [BlockInfo(0, "pc.ram", 8 * PAGE, C.PAGE_SIZE_4K), BlockInfo(1, "b", 4 * PAGE, C.PAGE_SIZE_4K)]


def _valid_stream() -> bytes:
    ch = Channel()
    recs1, _ = ch.encode_runs([(FUZZ_BLOCKS[0], 0, 3, "page", True), (FUZZ_BLOCKS[0], 3, 5, "zero", True),
                               (FUZZ_BLOCKS[1], 0, 2, "page", False)])
    recs2, _ = ch.encode_runs([(FUZZ_BLOCKS[1], 2, 2, "zero", False), (FUZZ_BLOCKS[0], 0, 8, "zero", True)])
    return (codec.encode_header() + codec.encode_configuration("pc-q35")
            + codec.encode_open_return_path() + codec.encode_postcopy_advise(None)
            + codec.encode_section_start(C.QEMU_VM_SECTION_START, 0, "ram", 0, 4)
            + codec.encode_ram_mem_size([(b.idstr, b.length, b.page_size) for b in FUZZ_BLOCKS])
            + codec.encode_footer(0) + codec.encode_ping(5) + ram_part(recs1)
            + b"".join(codec.encode_postcopy_discard("b", [(0, PAGE)] * 3))
            + codec.encode_packaged(b"abc") + ram_part(recs2, end=True)
            + device_full(1, "ferry-guest", 1, b'{"a": 1}') + codec.encode_eof()
            + codec.encode_vmdesc({"page_size": 4096, "devices": []}))


VALID = _valid_stream()


def _structural_positions(data: bytes) -> list[int]:
    """Offsets that are not page data: where mutations reach the parser's decisions."""
    mask = bytearray(b"\x01" * len(data))
    for seed in range(1, 64):
        pb = page_bytes(seed)
        i = data.find(pb)
        while i >= 0:
            mask[i:i + PAGE] = bytes(PAGE)
            i = data.find(pb, i + PAGE)
    return [i for i, m in enumerate(mask) if m]


STRUCTURAL = _structural_positions(VALID)
positions = st.one_of(st.sampled_from(STRUCTURAL), st.integers(0, len(VALID) - 1))


def _decode_or_protocol_error(data: bytes, chunks=None, mode: str = "stream"):
    dec = StreamDecoder(FUZZ_BLOCKS, mode=mode, devices=DEVICES)
    try:
        decode_chunked(dec, data, chunks)
    except ProtocolError as e:
        assert "stream offset" in str(e)


def test_valid_fuzz_base_decodes():
    events, left = decode_chunked(StreamDecoder(FUZZ_BLOCKS, devices=DEVICES), VALID, None)
    assert left == 0 and events[-1][0] == "vmdesc"
    assert len(STRUCTURAL) == len(VALID) - 5 * PAGE  # five data pages, the rest is structure


def test_every_single_structural_byte_flip():
    """Exhaustive: each non-page byte replaced by a few values; ProtocolError or success only."""
    for pos in STRUCTURAL:
        for val in {0x00, 0xFF, VALID[pos] ^ 0x01, VALID[pos] ^ 0x80}:
            data = bytearray(VALID)
            data[pos] = val
            _decode_or_protocol_error(bytes(data))


@FUZZ
@given(st.lists(st.tuples(positions, st.integers(0, 255)), min_size=1, max_size=3),
       st.sampled_from([None, [7], [4100], [1, 50, 9000]]))
def test_mutated_stream(mutations, chunks):
    data = bytearray(VALID)
    for pos, val in mutations:
        data[pos] = val
    _decode_or_protocol_error(bytes(data), chunks)


@FUZZ
@given(st.integers(0, len(VALID)), st.binary(max_size=64))
def test_truncated_or_extended_stream(cut, tail):
    _decode_or_protocol_error(VALID[:cut] + tail)


@FUZZ
@given(st.sampled_from([0, 8, 40, len(VALID) // 2]), st.binary(max_size=2000))
def test_random_bytes_after_valid_prefix(prefix, tail):
    _decode_or_protocol_error(VALID[:prefix] + tail)


@FUZZ
@given(st.sampled_from(["stream", "packaged", "pages"]), st.binary(max_size=600))
def test_random_bytes_each_mode(mode, data):
    _decode_or_protocol_error(data, mode=mode)


@FUZZ
@given(st.lists(st.sampled_from([
    codec.encode_rp_shut(0), codec.encode_rp_pong(9), codec.encode_rp_req_pages(0, PAGE, "pc.ram"),
    codec.encode_rp_req_pages(PAGE, PAGE, None), codec.encode_rp_digests({"pc.ram": bytes(32)}),
    codec.encode_rp_recv_bitmap("ab", np.arange(70) % 3 == 0), codec.encode_rp(C.MIG_RP_MSG_RESUME_ACK, b"\0\0\0\1"),
]), max_size=6), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
    st.binary(max_size=40))
@example(msgs=[codec.encode_rp_recv_bitmap("ab", np.arange(70) % 3 == 0)], mutations=[(5, 128)], tail=b"")
def test_return_path_mutated(msgs, mutations, tail):
    data = bytearray(b"".join(msgs) + tail)
    for pos, val in mutations:
        if data:
            data[pos % len(data)] = val
    check_return_path_decoding(bytes(data), [3, 100])


def check_return_path_decoding(data: bytes, chunks=None) -> None:
    """Decode ``data``; whatever the outcome, it must be consistent with the framing.

    Accepted messages re-frame (be16 type, be16 length, payload) to exactly the bytes
    consumed, have a known type and, for fixed-length types, QEMU's length; a refusal is
    a ProtocolError naming the return path and an offset inside the data, at a message
    boundary of what was accepted before it.
    """
    dec = ReturnPathDecoder()
    try:
        msgs, left = decode_rp_chunked(dec, data, chunks)
    except ProtocolError as e:
        m = re.search(r"^return path: .* \(offset (\d+)\)$", str(e))
        assert m, str(e)
        assert int(m.group(1)) == dec.offset <= len(data)
        return
    consumed = len(data) - left

    def reframed(m):  # RECV_BITMAP's bitmap follows the message, outside its framing (as in QEMU)
        out = codec.encode_rp(m.type, m.raw)
        if m.type == C.MIG_RP_MSG_RECV_BITMAP:
            size = codec.recv_bitmap_size(len(m.received))
            bits = np.packbits(m.received, bitorder="little").tobytes()
            out += (size.to_bytes(8, "big") + bits + bytes(size - len(bits))
                    + C.RAMBLOCK_RECV_BITMAP_ENDING.to_bytes(8, "big"))
        return out
    assert b"".join(reframed(m) for m in msgs) == data[:consumed]
    rest_type = int.from_bytes(data[consumed:consumed + 2], "big") if left >= 2 else None
    assert (left < 4 or 4 + int.from_bytes(data[consumed + 2:consumed + 4], "big") > left
            or rest_type == C.MIG_RP_MSG_RECV_BITMAP)
    for m in msgs:
        assert m.type in C.MIG_RP_MSG_NAMES
        want = C.MIG_RP_MSG_ARGS_LEN[m.type]
        assert want < 0 or len(m.raw) == want, m


@FUZZ
@given(st.binary(max_size=300))
# Pinned: REQ_PAGES before any REQ_PAGES_ID; REQ_PAGES_ID whose name length overruns it;
# FERRY_DIGESTS with a truncated entry; a header cut short; an unknown type 0.
@example(bytes.fromhex("0004000c") + bytes(12))
@example(bytes.fromhex("0003000e") + bytes(12) + b"\x05a")
@example(bytes.fromhex("466400030102ab"))
@example(bytes.fromhex("000100"))
@example(bytes.fromhex("00000000"))
def test_return_path_random_bytes(data):
    check_return_path_decoding(data)


def test_deeply_nested_vmdesc_is_a_protocol_error():
    """json.loads raises RecursionError on deep nesting; the decoder must turn it into a ProtocolError."""
    blob = b"[" * 200_000
    stream = VALID[:VALID.rindex(bytes([C.QEMU_VM_VMDESCRIPTION]))] + bytes([C.QEMU_VM_VMDESCRIPTION]) \
        + len(blob).to_bytes(4, "big") + blob
    with pytest.raises(ProtocolError, match="VMDESCRIPTION: invalid JSON"):
        decode_chunked(StreamDecoder(FUZZ_BLOCKS, devices=DEVICES), stream, None)


def test_invalid_vmdesc_json():
    stream = VALID[:VALID.rindex(bytes([C.QEMU_VM_VMDESCRIPTION]))] + bytes([6, 0, 0, 0, 3]) + b"\xff{]"
    with pytest.raises(ProtocolError, match="VMDESCRIPTION: invalid JSON"):
        decode_chunked(StreamDecoder(FUZZ_BLOCKS, devices=DEVICES), stream, None)


def test_data_after_end_of_stream():
    with pytest.raises(ProtocolError, match="data after the end of the stream: byte 0x00"):
        decode_chunked(StreamDecoder(FUZZ_BLOCKS, devices=DEVICES), VALID + b"\x00", None)
    with pytest.raises(ProtocolError, match="after EOF: byte 0x01"):
        decode_chunked(StreamDecoder(FUZZ_BLOCKS, devices=DEVICES),
                       VALID[:VALID.rindex(bytes([C.QEMU_VM_VMDESCRIPTION]))] + b"\x01", None)


def test_pages_channel_ends_cleanly_after_eos():
    """A bare page channel ends with EOS; an empty buffer after it is a clean end, not an error."""
    blocks = [BlockInfo(0, "b", 2 * PAGE, C.PAGE_SIZE_4K)]
    data = codec.encode_zero_page(PAGE, "b") + codec.encode_eos()
    dec = StreamDecoder(blocks, mode="pages")
    events, left = decode_chunked(dec, data, [3])
    assert events == [("zero", "b", 1), ("eos",)]
    assert left == 0 and dec.at_boundary()
    assert dec.next_event(b"")[0] is codec.NEED_DATA
    with pytest.raises(ProtocolError, match="data after the end"):
        dec.next_event(codec.encode_eos())


def test_device_full_encoder():
    """codec.encode_device_full writes what the destination's DeviceSpec accepts."""
    enc = codec.encode_device_full(4, "dev.b", 2, b"payload")
    assert enc == device_full(4, "dev.b", 2, b"payload")
    events, left = decode_chunked(StreamDecoder([], mode="packaged", devices=DEVICES), enc, [3])
    assert left == 0
    assert events == [("start", C.QEMU_VM_SECTION_FULL, 4, "dev.b", 0, 2), ("dev", "dev.b", 0, 2, b"payload"),
                      ("footer", 4)]


def test_vmdesc_json_matches_encoder():
    desc = {"page_size": 4096, "devices": [{"name": "x"}]}
    enc = codec.encode_vmdesc(desc)
    assert enc[0] == C.QEMU_VM_VMDESCRIPTION
    assert int.from_bytes(enc[1:5], "big") == len(enc) - 5
    assert json.loads(enc[5:]) == desc
