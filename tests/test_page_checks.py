"""Page check values (capability page-checksums): codec, sender and checker.

FERRY_PAGE_CHECKS records round-trip through the sans-I/O decoder whatever the
chunk boundaries, and every RamRun comes out with exactly the values that
cover its pages (a run never crosses the end of a check record). A real
RamSendChannel on a socketpair sends check values that match what it sent,
from guest RAM or from its staging copy. verify_run refuses a flipped byte,
a page moved to another offset or block, a damaged check value, and (when
required) a page without a check value. Bad check records are named errors.
"""
from __future__ import annotations

import socket
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels.channel import CHECK_CHUNK, RamSendChannel
from ferry_migrate.channels.codec import BlockInfo, StreamDecoder
from ferry_migrate.channels.errors import PageIntegrityError, ProtocolError, UnverifiedStreamError
from ferry_migrate.channels.pagecheck import PageChecker, check_values, place_values, verify_run
from ferry_migrate.channels.qemufile import QEMUFileWriter
from ferry_migrate.channels.transport import SocketTransport
from ferry_migrate.engine.ram import GuestRAM

from .conftest import PAGE, decode_chunked

CHECKS = C.RAM_SAVE_FLAG_FERRY_PAGE_CHECKS
BLOCKS = [BlockInfo(0, "pc.ram", 64 * PAGE, PAGE), BlockInfo(1, "vram", 64 * PAGE, PAGE)]


def _page(seed: int) -> bytes:
    if seed == 0:
        return bytes(PAGE)
    return np.random.default_rng(seed).integers(1, 256, PAGE, dtype=np.uint8).tobytes()


def _expected(name: str, page: int, seed: int) -> int:
    words = None if seed == 0 else np.frombuffer(_page(seed), np.uint64).reshape(1, -1)
    return int(check_values(name, np.array([page]), words)[0])


@st.composite
def checked_groups(draw):
    """Groups of (block, [(page, seed)]): each group is one check record and its page records."""
    groups = []
    for _ in range(draw(st.integers(1, 5))):
        blk = draw(st.sampled_from(BLOCKS))
        pages = draw(st.lists(st.tuples(st.integers(0, 63), st.integers(0, 3)), min_size=1, max_size=12))
        groups.append((blk, pages))
    return groups


def _encode(groups, bad_value_at: int | None = None) -> tuple[bytes, list[tuple]]:
    """A pages-mode stream: per group FERRY_PAGE_CHECKS then its records; EOS. Returns (bytes, expected)."""
    out = bytearray()
    last = None
    expected = []
    for blk, pages in groups:
        vals = np.array([_expected(blk.idstr, p, s) for p, s in pages], dtype=np.uint64)
        out += codec.encode_page_checks(vals)
        for (p, s), v in zip(pages, vals):
            name = None if last == blk.idstr else blk.idstr
            last = blk.idstr
            if s == 0:
                out += codec.encode_zero_page(p * PAGE, name)
            else:
                out += codec.encode_page_header(p * PAGE, C.RAM_SAVE_FLAG_PAGE, name) + _page(s)
            expected.append((blk.idstr, p, int(v)))
    out += codec.encode_eos()
    return bytes(out), expected


def _decode_runs(data: bytes, chunks=None):
    """Decode like a reader does and collect (block, page, check value) per page, verifying each run."""
    dec = StreamDecoder(BLOCKS, mode="pages", channel_name="postcopy")
    buf = bytearray()
    pos = fed = ci = 0
    got = []
    sizes = list(chunks) if chunks else [len(data)]
    while True:
        mv = memoryview(buf)[pos:]
        ev, n = dec.next_event(mv)
        if ev is codec.NEED_DATA:
            del mv
            if fed >= len(data):
                return got, dec
            step = sizes[ci % len(sizes)]
            ci += 1
            buf += data[fed:fed + step]
            fed += step
            continue
        if isinstance(ev, codec.RamRun):
            assert ev.checks is not None and len(ev.checks) == len(ev.pages)
            verify_run(ev, "postcopy")
            got += [(ev.block.idstr, int(p), int(c)) for p, c in zip(ev.pages, ev.checks)]
        pos += n
        del ev, mv


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(checked_groups(), st.lists(st.integers(1, 9000), min_size=1, max_size=8))
def test_check_records_round_trip_random_chunks(groups, chunks):
    data, expected = _encode(groups)
    got, dec = _decode_runs(data, chunks)
    assert got == expected
    assert dec.at_boundary() and dec.checks_pending() == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=C.FERRY_PAGE_CHECKS_MAX))
def test_encode_page_checks_layout(values):
    rec = codec.encode_page_checks(np.array(values, dtype=np.uint64))
    assert struct.unpack(">QI", rec[:12]) == (CHECKS, len(values))
    assert list(struct.unpack(f">{len(values)}Q", rec[12:])) == values
    dec = StreamDecoder(BLOCKS, mode="pages")
    ev, n = dec.next_event(memoryview(rec))
    assert isinstance(ev, codec.PageChecks) and ev.count == len(values) and n == len(rec)
    assert dec.checks_pending() == len(values)


def test_bulk_run_ends_where_its_check_values_end():
    """Two check records over one uniform stretch of CONTINUE records: two runs, never one."""
    pages = [(p, 1 + p % 3) for p in range(10)]
    data, expected = _encode([(BLOCKS[0], pages[:4]), (BLOCKS[0], pages[4:])])
    sizes = []
    events, left = decode_chunked(StreamDecoder(BLOCKS, mode="pages"), data, run_sizes=sizes)
    assert left == 0 and sizes[0] == 1 and sum(sizes[:2]) == 4  # named record, then the rest of group 1
    got, _ = _decode_runs(data)
    assert got == expected


def test_encode_page_checks_bounds():
    with pytest.raises(ValueError, match="0 values, expected 1 to 4096"):
        codec.encode_page_checks(np.zeros(0, np.uint64))
    with pytest.raises(ValueError, match="4097 values"):
        codec.encode_page_checks(np.zeros(4097, np.uint64))


def _record(flags_word: int, count: int, nvalues: int | None = None) -> bytes:
    return struct.pack(">QI", flags_word, count) + bytes(8 * (count if nvalues is None else nvalues))


@pytest.mark.parametrize("data,msg", [
    (_record(CHECKS, 0), "FERRY_PAGE_CHECKS: count 0, expected 1 to 4096"),
    (_record(CHECKS, 5000, 0), "FERRY_PAGE_CHECKS: count 5000, expected 1 to 4096"),
    (_record(CHECKS | C.RAM_SAVE_FLAG_CONTINUE, 1), "FERRY_PAGE_CHECKS with other flags or offset bits"),
    (_record(CHECKS | (1 << 12), 1), "FERRY_PAGE_CHECKS with other flags or offset bits"),
    (_record(CHECKS, 1) + _record(CHECKS, 1), "the previous one still covers 1 page records"),
    (_record(CHECKS, 2) + codec.encode_zero_page(0, "pc.ram") + codec.encode_eos(),
     "RAM EOS: FERRY_PAGE_CHECKS covers 1 more page records than followed it"),
])
def test_bad_check_records_are_named_errors(data, msg):
    dec = StreamDecoder(BLOCKS, mode="pages", channel_name="postcopy")
    with pytest.raises(ProtocolError, match=msg) as ei:
        pos = 0
        while True:
            ev, n = dec.next_event(memoryview(data)[pos:])
            assert ev is not codec.NEED_DATA, "decoder waits instead of refusing"
            pos += n
    assert "channel postcopy" in str(ei.value)


def test_truncated_check_record_needs_data():
    rec = codec.encode_page_checks(np.arange(1, 4, dtype=np.uint64))
    dec = StreamDecoder(BLOCKS, mode="pages")
    for cut in (1, 8, 11, 12, len(rec) - 1):
        ev, n = dec.next_event(memoryview(rec[:cut]))
        assert ev is codec.NEED_DATA and n > cut


# --- the checker -------------------------------------------------------------------

def _one_run(data: bytes):
    dec = StreamDecoder(BLOCKS, mode="pages", channel_name="precopy")
    pos, runs = 0, []
    while True:
        ev, n = dec.next_event(memoryview(data)[pos:])
        if ev is codec.NEED_DATA or isinstance(ev, codec.RamEOS):
            return runs
        if isinstance(ev, codec.RamRun):
            runs.append(ev)
        pos += n


def _flip_positions(data: bytes):
    """Offsets of: a data byte of the page, its header's offset field, the check value."""
    return {"payload": 12 + 8 + 8 + 1 + 6 + 100, "offset": 12 + 8 + 6, "check": 12 + 3}


@pytest.mark.parametrize("where", ["payload", "offset", "check"])
def test_verify_run_refuses_damage_naming_the_page(where):
    data, _ = _encode([(BLOCKS[0], [(7, 2)])])
    good = _one_run(data)
    verify_run(good[0], "precopy")
    bad = bytearray(data)
    pos = _flip_positions(data)[where]
    bad[pos] ^= 0x01 if where != "offset" else 0x10  # offset: page 7 -> page 6 (bit 12 of the be64)
    runs = _one_run(bytes(bad))
    with pytest.raises(PageIntegrityError) as ei:
        verify_run(runs[0], "precopy")
    e = ei.value
    assert isinstance(e, ProtocolError)
    assert (e.channel, e.block) == ("precopy", "pc.ram")
    assert e.offset == (6 if where == "offset" else 7) * PAGE
    assert e.expected == int(runs[0].checks[0]) and e.actual != e.expected
    assert f"offset 0x{e.offset:x}" in str(e) and "page not placed" in str(e)


def test_check_values_cover_the_block_and_the_offset():
    words = np.frombuffer(_page(3), np.uint64).reshape(1, -1)
    a = check_values("pc.ram", np.array([5]), words)
    assert a != check_values("pc.ram", np.array([6]), words)
    assert a != check_values("vram", np.array([5]), words)
    # Zero pages too: only the place differs, and it does.
    z = check_values("pc.ram", np.arange(64), None)
    assert len(set(z.tolist())) == 64 and set(z.tolist()).isdisjoint(check_values("vram", np.arange(64), None).tolist())
    assert (place_values("pc.ram", np.arange(4)) == z[:4]).all()


def test_zero_page_moved_is_caught():
    data, _ = _encode([(BLOCKS[1], [(9, 0)])])
    bad = bytearray(data)
    bad[12 + 8 + 6] ^= 0x10  # ZERO record for page 9 now says page 8
    with pytest.raises(PageIntegrityError, match="block 'vram', offset 0x8000"):
        verify_run(_one_run(bytes(bad))[0], "postcopy")


def test_run_without_check_values_is_refused_when_required():
    data = codec.encode_page_header(0, C.RAM_SAVE_FLAG_PAGE, "pc.ram") + _page(1) + codec.encode_eos()
    run = _one_run(data)[0]
    assert run.checks is None
    with pytest.raises(UnverifiedStreamError, match="offset 0x0 of block 'pc.ram' is not covered"):
        verify_run(run, "precopy", required=True)
    verify_run(run, "precopy", required=False)  # page-checksums off: QEMU's stream


# --- the sender ---------------------------------------------------------------------

class _Wire:
    def __init__(self, **kw):
        self.a, self.b = socket.socketpair()
        self.a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        self.ch = RamSendChannel(QEMUFileWriter(SocketTransport(self.a), name="precopy"), "precopy", **kw)
        self.out = bytearray()

    def drain(self):
        self.b.setblocking(False)
        try:
            while chunk := self.b.recv(1 << 20):
                self.out += chunk
        except BlockingIOError:
            pass

    def finish(self) -> bytes:
        self.ch.send_eos()
        self.ch.flush()
        self.a.shutdown(socket.SHUT_WR)
        self.b.setblocking(True)
        while chunk := self.b.recv(1 << 20):
            self.out += chunk
        self.a.close()
        self.b.close()
        return bytes(self.out)


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("ordered", [False, True])
def test_sender_check_values_match_what_it_sent(staged, ordered):
    """send_range with page_checks: every page covered, values match the bytes, from RAM or the staging copy."""
    ram = GuestRAM.create(3 * CHECK_CHUNK * PAGE // 2, nblocks=1)
    ram.fill("mixed")
    blk = ram.blocks[0]
    try:
        w = _Wire(page_checks=True, guest_running=lambda: staged)
        # A range over a chunk boundary, then a single page (the preemption path).
        w.ch.send_range(blk, 3, CHECK_CHUNK + 40, ordered=ordered)
        w.drain()
        w.ch.send_range(blk, CHECK_CHUNK + 100, CHECK_CHUNK + 101)
        data = w.finish()
        infos = [blk.info]
        dec = StreamDecoder(infos, mode="pages")
        pos, seen = 0, []
        mv = memoryview(data)
        while True:
            ev, n = dec.next_event(mv[pos:])
            assert ev is not codec.NEED_DATA
            pos += n
            if isinstance(ev, codec.RamEOS):
                break
            if isinstance(ev, codec.RamRun):
                verify_run(ev, "precopy")
                if ev.data is not None:
                    assert (ev.data == blk.pages[ev.pages]).all()
                seen += ev.pages.tolist()
        expect = list(range(3, CHECK_CHUNK + 40)) + [CHECK_CHUNK + 100]
        assert sorted(seen) == expect
        if ordered:
            assert seen == expect
        assert w.ch.normal_pages + w.ch.zero_pages == len(expect)
    finally:
        ram.close()


@pytest.mark.parametrize("staged", [True, False])
def test_staging_keeps_check_values_true_while_the_guest_writes(staged):
    """The guest writes every page after its check value was computed, before the bytes leave.

    Staged (guest running): the bytes sent are the copy the values were
    computed from, so they match (the pages are dirty again and go out once
    more). Without staging the same race gives mismatches: that is why the
    copy is made while the guest runs.
    """
    ram = GuestRAM.create(CHECK_CHUNK * PAGE, nblocks=1)
    ram.fill("pattern")
    blk = ram.blocks[0]
    try:
        w = _Wire(page_checks=True, guest_running=lambda: staged)
        real_flush = w.ch.writer.flush
        wrote = []

        def guest_writes_then_flush():
            if not wrote:
                blk.words[:, 7] += np.uint64(1)
                wrote.append(True)
            real_flush()
        w.ch.writer.flush = guest_writes_then_flush
        w.ch.send_range(blk, 0, 64)
        data = w.finish()
        assert wrote
        runs = _one_run_infos(data, [blk.info])
        assert sum(len(r) for r in runs) == 64
        if staged:
            for r in runs:
                verify_run(r, "precopy")
        else:
            with pytest.raises(PageIntegrityError):
                for r in runs:
                    verify_run(r, "precopy")
    finally:
        ram.close()


def _one_run_infos(data: bytes, infos):
    dec = StreamDecoder(infos, mode="pages")
    pos, runs = 0, []
    while True:
        ev, n = dec.next_event(memoryview(data)[pos:])
        assert ev is not codec.NEED_DATA
        pos += n
        if isinstance(ev, codec.RamEOS):
            return runs
        if isinstance(ev, codec.RamRun):
            runs.append(ev)


def test_fingerprints_are_the_documented_sum():
    """einsum computes sum(word[i] * K[i]) mod 2^64, as the plain matrix product does."""
    from ferry_migrate.channels.pagecheck import _FP_K, page_fingerprints

    w = np.random.default_rng(5).integers(0, 2**64 - 1, (9, 512), dtype=np.uint64, endpoint=True)
    assert (page_fingerprints(w) == w @ _FP_K).all()
    assert (page_fingerprints(w[::2]) == w[::2] @ _FP_K).all()


def test_checker_places_what_it_checked():
    """After a check the run points at the checker's aligned copy of exactly the bytes that arrived."""
    data, _ = _encode([(BLOCKS[0], [(p, 1 + p % 3) for p in range(6)])])
    runs = _one_run(data)
    checker = PageChecker("precopy")
    for r in runs:
        before = r.data.copy()
        checker.check(r)
        assert (r.data == before).all() and r.data.ctypes.data % 8 == 0


def test_staging_ring_wraps_only_after_a_flush():
    """More pages than the staging ring holds, in many ranges, the guest writing at every flush: all consistent."""
    from ferry_migrate.channels.channel import STAGE_PAGES

    npages = STAGE_PAGES + 700
    ram = GuestRAM.create(npages * PAGE, nblocks=1)
    ram.fill("pattern")
    blk = ram.blocks[0]
    try:
        w = _Wire(page_checks=True, guest_running=lambda: True)
        real_flush = w.ch.writer.flush
        flushes = []

        def guest_writes_then_flush():
            blk.words[:, 3] += np.uint64(1)
            flushes.append(1)
            real_flush()
            w.drain()
        w.ch.writer.flush = guest_writes_then_flush
        w.ch.writer.auto_flush = 1 << 40  # only the ring's own flushes
        for p in range(0, npages, 300):
            w.ch.send_range(blk, p, min(npages, p + 300), ordered=False)
        data = w.finish()
        assert len(flushes) >= 2
        runs = _one_run_infos(data, [blk.info])
        for r in runs:
            verify_run(r, "precopy")
        assert sum(len(r) for r in runs) == npages
    finally:
        ram.close()


def _decode_and_check(data: bytes) -> bool:
    """True if the pages-mode stream decodes to its end with every run checked; ProtocolError propagates."""
    dec = StreamDecoder(BLOCKS, mode="pages", channel_name="postcopy")
    checker = PageChecker("postcopy", required=True)
    pos = 0
    mv = memoryview(data)
    while True:
        ev, n = dec.next_event(mv[pos:])
        if ev is codec.NEED_DATA:
            return False  # the stream ends inside a record: a truncated stream, refused by the reader
        pos += n
        if isinstance(ev, codec.RamRun):
            checker.check(ev)
        if isinstance(ev, codec.RamEOS):
            return pos == len(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(checked_groups(), st.data())
def test_any_single_byte_flip_is_refused(groups, data):
    """One damaged byte anywhere in the records of a checked stream (check record, header, name, payload,
    fill byte) is never accepted: a named ProtocolError, or a stream that does not end where it should.

    The closing EOS is left out: it carries no page, and its offset bits and CONTINUE are ignored, as
    QEMU's ram_load ignores them.
    """
    good, _ = _encode(groups)
    assert _decode_and_check(good)
    pos = data.draw(st.integers(0, len(good) - 9), label="position")
    mask = data.draw(st.integers(1, 255), label="xor")
    bad = bytearray(good)
    bad[pos] ^= mask
    try:
        accepted = _decode_and_check(bytes(bad))
    except ProtocolError:
        return
    assert not accepted, f"byte {pos} ^ 0x{mask:02x} accepted"


def test_non_zero_page_with_fingerprint_zero_is_sent_as_data():
    """Zero detection uses the fingerprints first: a non-zero page whose fingerprint is 0 still goes as PAGE."""
    from ferry_migrate.channels.pagecheck import _FP_K, page_fingerprints

    ram = GuestRAM.create(64 * PAGE, nblocks=1)
    ram.fill("pattern")
    blk = ram.blocks[0]
    try:
        blk.words[10] = 0
        blk.words[10, 0] = _FP_K[1]
        blk.words[10, 1] = np.uint64((1 << 64) - int(_FP_K[0]))  # w0*K0 + w1*K1 = 0 mod 2^64
        blk.words[11] = 0  # a real zero page next to it
        assert page_fingerprints(blk.words[10:12]).tolist() == [0, 0] and blk.words[10].any()
        w = _Wire(page_checks=True)
        w.ch.send_range(blk, 0, 64, ordered=False)
        runs = _one_run_infos(w.finish(), [blk.info])
        got = {}
        for r in runs:
            verify_run(r, "precopy")
            for i, p in enumerate(r.pages.tolist()):
                got[p] = None if r.data is None else r.data[i].copy()
        assert got[10] is not None and (got[10] == blk.pages[10]).all()
        assert got[11] is None
        assert w.ch.zero_pages == 1 and w.ch.normal_pages == 63
    finally:
        ram.close()
