"""Guest RAM (engine/ram.py) and page bitmaps (engine/bitmap.py).

RAM blocks on anonymous and memfd memory with 4 KiB and 2 MiB host pages,
argument checks, digests, guest fills and the dirty log; PageBitmap
next_set/next_clear against a reference; hugetlb: a real migration of a small
guest on 2 MiB huge pages when the host has them free, otherwise the
HugePagesUnavailable error that says how to reserve them.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry_migrate.channels import constants as C
from ferry_migrate.engine.bitmap import PageBitmap
from ferry_migrate.engine.destination import MigrationDestination
from ferry_migrate.engine.ram import GuestRAM, HugePagesUnavailable, RAMBlock, format_size, hugepage_status, parse_size
from ferry_migrate.engine.source import MigrationSource

from .conftest import wait_until

M2 = C.PAGE_SIZE_2M


@pytest.mark.parametrize("backing", ["anon", "memfd"])
@pytest.mark.parametrize("page_size", [C.PAGE_SIZE_4K, M2])
def test_ram_block(backing, page_size):
    length = 2 * M2
    b = RAMBlock("pc.ram", length, page_size, backing)
    try:
        assert b.npages == length // 4096
        assert b.tp_per_hp == page_size // 4096
        assert b.pages.shape == (b.npages, 4096) and b.words.shape == (b.npages, 512)
        assert (b.fd >= 0) == (backing == "memfd")
        assert b.info.idstr == "pc.ram" and b.info.length == length and b.info.page_size == page_size
        zero = b.digest()
        assert not b.pages.any()
        # The numpy views and the memoryview are the same memory.
        b.view[4096 * 7 + 3] = 0xAB
        assert b.pages[7, 3] == 0xAB
        one = b.digest()
        assert one != zero
        b.words[7, 0] = 0
        assert b.digest() == zero
        # Host pages group target pages.
        assert b.host_page_of(0) == 0
        assert b.host_page_of(b.npages - 1) == b.npages - b.tp_per_hp
        if page_size == M2:
            assert b.host_page_of(700) == 512
        else:
            assert b.host_page_of(700) == 700
        assert format_size(page_size) in repr(b) and backing in repr(b)
    finally:
        b.close()
    if backing == "memfd":
        assert b.fd == -1


def test_memfd_block_is_shared_memory():
    """A memfd block is a MAP_SHARED mapping of its fd: another mapping sees the writes."""
    import mmap
    b = RAMBlock("m", 16 * 4096, backing="memfd")
    try:
        b.pages[3, :4] = [1, 2, 3, 4]
        other = mmap.mmap(b.fd, b.length, flags=mmap.MAP_SHARED)
        try:
            assert other[3 * 4096:3 * 4096 + 4] == bytes([1, 2, 3, 4])
        finally:
            other.close()
    finally:
        b.close()


@pytest.mark.parametrize("kwargs,msg", [
    ({"idstr": "", "length": 4096}, "1 to 255 bytes"),
    ({"idstr": "a" * 256, "length": 4096}, "1 to 255 bytes"),
    ({"idstr": "a", "length": 4096, "page_size": 8192}, "page size 8192 not one of 4K, 2M, 1G"),
    ({"idstr": "a", "length": 4096, "page_size": M2}, "length 4096 is not a positive multiple of its page size 2 MiB"),
    ({"idstr": "a", "length": 0}, "length 0 is not a positive multiple"),
    ({"idstr": "a", "length": 4096, "backing": "tmpfs"}, "backing 'tmpfs', expected one of anon, memfd, hugetlb"),
    ({"idstr": "a", "length": 4096, "backing": "hugetlb"}, "hugetlb backing needs a 2M or 1G page size"),
])
def test_ram_block_rejects(kwargs, msg):
    with pytest.raises(ValueError) as ei:
        RAMBlock(**kwargs)
    assert msg in str(ei.value)


def test_guest_ram_create_fill_and_dirty_log():
    ram = GuestRAM.create(4 * M2, M2, nblocks=2, name="g")
    try:
        assert [b.idstr for b in ram.blocks] == ["g.0", "g.1"]
        assert [b.index for b in ram.blocks] == [0, 1]
        assert ram.total == 4 * M2 and ram.npages == 4 * M2 // 4096
        assert [i.idstr for i in ram.infos()] == ["g.0", "g.1"]
        empty = ram.digests()
        ram.fill("mixed", seed=3)
        for b in ram.blocks:
            nz = b.words.any(axis=1)
            assert not nz[3::4].any() and nz[0::4].all()
        d1 = ram.digests()
        assert d1 != empty and d1["g.0"] != d1["g.1"]  # blocks differ from each other
        ram.fill("pattern", seed=3)
        assert all(b.words.any(axis=1).all() for b in ram.blocks)
        ram.fill("pattern", seed=4)
        assert ram.digests() != d1
        b = ram.blocks[1]
        ram.mark_dirty(b, np.array([1, 5, 9]))
        assert ram.dirty_log["g.1"].count() == 3 and ram.dirty_log["g.0"].count() == 0
        with pytest.raises(ValueError, match="guest fill 'bogus'"):
            ram.fill("bogus")
    finally:
        ram.close()


def test_guest_ram_rejects():
    with pytest.raises(ValueError, match="does not split into 3 blocks"):
        GuestRAM.create(4 * M2, M2, nblocks=3)
    a = RAMBlock("same", 4096)
    b = RAMBlock("same", 4096)
    try:
        with pytest.raises(ValueError, match="names must be unique"):
            GuestRAM([a, b])
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("text,value", [("256M", 256 << 20), ("2MiB", 2 << 20), ("1G", 1 << 30), ("4k", 4096),
                                        (" 512 ", 512), (4096, 4096), ("1.5K", 1536)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects():
    with pytest.raises(ValueError, match="size 'lots'"):
        parse_size("lots")


# ---------------------------------------------------------------------------
# Bitmaps
# ---------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=300), st.data())
def test_bitmap_next_set_next_clear(bits, data):
    n = len(bits)
    bm = PageBitmap(n)
    bm.bits[:] = bits
    start = data.draw(st.integers(0, n))
    end = data.draw(st.one_of(st.none(), st.integers(start, n)))
    e = n if end is None else end
    want_set = next((i for i in range(start, e) if bits[i]), e)
    want_clear = next((i for i in range(start, e) if not bits[i]), e)
    assert bm.next_set(start, end) == want_set
    assert bm.next_clear(start, end) == want_clear
    assert bm.count() == sum(bits)
    assert all(bm[i] == bits[i] for i in range(n))


def test_bitmap_bulk_ops():
    bm = PageBitmap(1000)
    assert bm.count() == 0 and bm.next_set(0) == 1000 and bm.next_clear(0) == 0
    bm.set_all()
    assert bm.count() == 1000 and bm.next_set(0) == 0 and bm.next_clear(0) == 1000
    bm.bits[10:20] = False
    assert bm.next_clear(5) == 10 and bm.next_set(10) == 20 and bm.next_clear(20) == 1000
    bm.clear_all()
    assert bm.count() == 0
    assert PageBitmap(5, fill=True).count() == 5


# ---------------------------------------------------------------------------
# Huge pages
# ---------------------------------------------------------------------------

HUGE_GUEST = 32 << 20
HUGE_NEED = 2 * HUGE_GUEST // M2  # source and destination guests


def test_hugetlb_unavailable_says_how_to_reserve():
    free, total = hugepage_status(M2)
    need = free + 1  # always more than the host has free
    with pytest.raises(HugePagesUnavailable) as ei:
        RAMBlock("huge", need * M2, M2, "hugetlb")
    msg = str(ei.value)
    assert "/proc/sys/vm/nr_hugepages" in msg
    assert f"{need} huge pages of 2 MiB needed, {free} free of {total} reserved" in msg
    assert "'huge'" in msg
    with pytest.raises(HugePagesUnavailable):
        GuestRAM.create(need * M2, M2, "hugetlb")


def test_hugetlb_real_migration(tmp_path, hugepages):
    hugepages(HUGE_NEED)
    src = GuestRAM.create(HUGE_GUEST, M2, "hugetlb")
    dst = GuestRAM.create(HUGE_GUEST, M2, "hugetlb")
    try:
        assert src.blocks[0].backing == "hugetlb"
        src.fill("mixed")
        d = MigrationDestination(dst)
        uri = d.listen(f"unix:{tmp_path}/h.sock")
        d.start()
        s = MigrationSource(src)
        s.start(uri)
        assert s.wait(60) == "completed", s.query().get("error-desc")
        assert d.wait(10) == "completed", d.query().get("error-desc")
        assert dst.digests() == src.digests()
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("page_size,backing", [(C.PAGE_SIZE_4K, "memfd"), (M2, "anon")])
def test_in_process_migration_small_guest(tmp_path, page_size, backing):
    """Source and destination in one process over a unix socket: 2 blocks, 4K or 2M pages."""
    src = GuestRAM.create(8 * M2, page_size, backing, nblocks=2)
    dst = GuestRAM.create(8 * M2, page_size, backing, nblocks=2)
    try:
        src.fill("mixed")
        d = MigrationDestination(dst)
        uri = d.listen(f"unix:{tmp_path}/s.sock")
        d.start()
        s = MigrationSource(src)
        s.start(uri)
        assert s.wait(60) == "completed", s.query().get("error-desc")
        assert d.wait(10) == "completed", d.query().get("error-desc")
        assert dst.digests() == src.digests()
        assert s.query()["digests"] == d.query()["digests"]
        assert not os.path.exists(f"{tmp_path}/s.sock")
    finally:
        src.close()
        dst.close()


# ---------------------------------------------------------------------------
# Workload progress and knobs
# ---------------------------------------------------------------------------

def test_workload_progress_shows_pause_and_rate():
    """Progress samples show the guest moving, a sample with no progress while it is
    paused, and moving again; it never runs ahead of its dirty rate."""
    from ferry_migrate.engine.workload import Workload, WorkloadConfig

    g = GuestRAM.create(16 << 20)
    cfg = WorkloadConfig(threads=2, pattern="random", dirty_rate=64 << 20)
    w = Workload(g, cfg)
    w.start()
    moving = lambda: [v for v in w.progress_ms_per_gib if v is not None]  # noqa: E731
    wait_until(lambda: len(moving()) >= 2, what="two samples of progress")
    w.pause()
    n = len(w.progress_ms_per_gib)
    # A sample taken wholly inside the pause has no progress (None).
    wait_until(lambda: None in w.progress_ms_per_gib[n + 1:], what="a sample with no progress while paused")
    w.resume()
    k = len(w.progress_ms_per_gib)
    wait_until(lambda: any(v is not None for v in w.progress_ms_per_gib[k + 1:]), what="progress after resume")
    w.stop()
    p = w.progress()
    marks = dict((name, t) for t, name in p["marks"])
    assert [m[1] for m in p["marks"]] == ["start", "pause", "resume", "stop"]
    # Paced at dirty-rate (a thread may be one batch ahead): never more pages than the
    # rate allows over the time it ran, however loaded the machine is.
    ran = (marks["pause"] - marks["start"]) + (marks["stop"] - marks["resume"])
    assert 0 < w.pages_touched <= cfg.dirty_rate / 4096 * ran + cfg.threads * cfg.batch
    assert w.state()["pages_written"] == w.pages_touched


def test_workload_write_ratio_and_zipf():
    from ferry_migrate.engine.workload import Workload, WorkloadConfig

    g = GuestRAM.create(16 << 20)
    w = Workload(g, WorkloadConfig(pattern="zipf", write_ratio=0.25, dirty_rate=8 << 20))
    w.start()
    wait_until(lambda: w.pages_touched >= 1000, what="1000 pages touched")  # enough for the ratio
    w.stop()
    assert 0.15 < w.pages_written / w.pages_touched < 0.35
    dirty = g.dirty_log["pc.ram"].bits
    assert 0 < dirty.sum() < len(dirty)  # skewed: not every page


@pytest.mark.parametrize("field,value", [("pattern", "nope"), ("write_ratio", 1.5), ("zipf_a", 1.0),
                                         ("batch", 0), ("threads", -1)])
def test_workload_config_errors_name_the_knob(field, value):
    from ferry_migrate.engine.workload import WorkloadConfig

    with pytest.raises(ValueError, match=field.replace("_", "-")):
        WorkloadConfig(**{field: value}).validate()
