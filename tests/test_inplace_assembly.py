"""Host pages that arrive in pieces: assembled in place in guest RAM (memcpy backend),
or in the channel's temporary host page and placed with one UFFDIO_COPY (uffd backend).

Unit cases drive HostPageAssembler with real RAM blocks (and a real guest process for
the uffd backend); the end-to-end cases migrate 2 MiB-page guests between two worker
processes with requests interrupting huge pages, page-checksums on and off.
"""
import numpy as np
import pytest

from ferry_migrate.channels import constants as C
from ferry_migrate.channels.codec import RamRun
from ferry_migrate.channels.errors import PageIntegrityError
from ferry_migrate.channels.pagecheck import check_values, page_fingerprints
from ferry_migrate.engine import uffd as U
from ferry_migrate.engine.local import GuestConfig, run_local_migration
from ferry_migrate.engine.postcopy import HostPageAssembler, ReceivedPages
from ferry_migrate.engine.ram import GuestRAM
from ferry_migrate.engine.workload import WorkloadConfig

HUGE = 512  # target pages per 2 MiB host page


def piece(ram, pages, data, checks: bool):
    """A RamRun of block 0 (``data`` None: zero pages), with its check values if ``checks``."""
    blk = ram.blocks[0]
    pages = np.asarray(pages, dtype=np.int64)
    cv = None
    if checks:
        cv = check_values(blk.idstr, pages, None if data is None else np.ascontiguousarray(data).view(np.uint64))
    return RamRun(blk.info, pages, data, cv)


def page_data(n, seed):
    return np.random.default_rng(seed).integers(1, 255, size=(n, C.TARGET_PAGE_SIZE), dtype=np.uint8)


@pytest.mark.parametrize("checks", [False, True], ids=["page-checksums-off", "page-checksums-on"])
def test_memcpy_pieces_are_written_in_place_and_visible_only_when_complete(checks):
    ram = GuestRAM.create(8 << 20, 2 << 20)
    blk = ram.blocks[0]
    blk.pages[:] = 7  # stale content (a discarded hugetlb page keeps its bytes)
    rec = ReceivedPages(ram)
    asm = HostPageAssembler(ram, rec, "precopy", require_checks=checks)
    data = page_data(HUGE, 1)
    data[200:260] = 0
    bits = rec.bitmaps[blk.idstr].bits
    hp = HUGE
    assert asm.add(piece(ram, range(hp, hp + 200), data[:200], checks)) == []
    # Written where it belongs already, but not received: the guest waits for the bit.
    assert np.array_equal(blk.pages[hp:hp + 200], data[:200])
    assert not bits[hp:hp + HUGE].any() and asm.busy
    assert asm.add(piece(ram, range(hp + 200, hp + 260), None, checks)) == []  # a zero run in the middle
    assert asm.add(piece(ram, range(hp + 260, hp + HUGE), data[260:], checks)) == [(0, hp)]
    assert bits[hp:hp + HUGE].all() and not bits[:hp].any() and not bits[hp + HUGE:].any()
    assert np.array_equal(blk.pages[hp:hp + HUGE], data)
    assert np.array_equal(rec.fingerprints[blk.idstr][hp:hp + HUGE], page_fingerprints(data.view(np.uint64)))
    assert asm._tmp == {}  # no temporary host page was needed
    assert not asm.busy and asm.pages_placed == HUGE and asm.host_pages_placed == 1


def test_damaged_piece_is_refused_before_it_reaches_guest_ram():
    ram = GuestRAM.create(4 << 20, 2 << 20)
    blk = ram.blocks[0]
    rec = ReceivedPages(ram)
    asm = HostPageAssembler(ram, rec, "postcopy-1", require_checks=True)
    data = page_data(HUGE, 2)
    asm.add(piece(ram, range(0, 100), data[:100], True))
    bad = piece(ram, range(100, 300), data[100:300].copy(), True)
    bad.data[150, 9] ^= 0x40  # one bit flipped on the way
    with pytest.raises(PageIntegrityError) as e:
        asm.add(bad)
    assert "postcopy-1" in str(e.value) and hex(250 << C.TARGET_PAGE_BITS) in str(e.value)
    assert not blk.pages[100:300].any()  # nothing of the damaged run written
    assert not rec.bitmaps[blk.idstr].bits.any()  # the page never became visible


def test_run_without_check_values_is_refused_before_it_reaches_guest_ram():
    ram = GuestRAM.create(4 << 20, 2 << 20)
    rec = ReceivedPages(ram)
    asm = HostPageAssembler(ram, rec, "precopy", require_checks=True)
    data = page_data(HUGE, 3)
    asm.add(piece(ram, range(0, 100), data[:100], True))
    with pytest.raises(Exception, match="FERRY_PAGE_CHECKS"):
        asm.add(piece(ram, range(100, HUGE), data[100:], False))
    assert not ram.blocks[0].pages[100:HUGE].any()
    assert not rec.bitmaps["pc.ram"].bits.any()


def test_host_page_received_meanwhile_keeps_what_the_guest_wrote():
    """A peer that sends a host page whole while another channel has pieces of it:
    the late pieces never overwrite the received page (the guest may have written it)."""
    ram = GuestRAM.create(4 << 20, 2 << 20)
    blk = ram.blocks[0]
    rec = ReceivedPages(ram)
    asm = HostPageAssembler(ram, rec, "precopy")
    data = page_data(HUGE, 4)
    asm.add(piece(ram, range(0, 64), data[:64], False))
    rec.place(blk, slice(0, HUGE), data, "postcopy-1")  # the whole page, on another channel
    blk.pages[100] = 0xAB  # the guest writes it
    asm.add(piece(ram, range(64, 128), page_data(64, 5), False))
    assert asm.add(piece(ram, range(128, HUGE), page_data(HUGE - 128, 6), False)) == [(0, 0)]
    assert (blk.pages[100] == 0xAB).all()
    assert np.array_equal(blk.pages[128:HUGE], data[128:])
    assert not asm.busy


uffd_missing = U.unavailable_reason()


@pytest.mark.skipif(uffd_missing is not None, reason=f"userfaultfd unavailable: {uffd_missing}")
@pytest.mark.parametrize("checks", [False, True], ids=["page-checksums-off", "page-checksums-on"])
def test_uffd_backend_places_an_interrupted_page_with_one_copy(checks):
    from ferry_migrate.engine.guestproc import GuestLink, GuestSpec
    from ferry_migrate.engine.uffd_dest import UffdPlacer

    link = GuestLink.spawn(GuestSpec(size=4 << 20, page_size=2 << 20, role="destination",
                                     workload={"threads": 0}))
    try:
        blk = link.ram.blocks[0]
        rec = ReceivedPages(link.ram)
        placer = rec.placer = UffdPlacer(link)
        asm = HostPageAssembler(link.ram, rec, "precopy", require_checks=checks)
        data = page_data(HUGE, 7)
        asm.add(piece(link.ram, range(HUGE, HUGE + 300), data[:300], checks))
        assert placer.copies == 0 and not placer.placed[blk.idstr].any()  # nothing mapped yet
        assert asm.add(piece(link.ram, range(HUGE + 300, 2 * HUGE), data[300:], checks)) == [(0, HUGE)]
        assert placer.copies == 1 and placer.eexist == 0 and placer.errors == []
        assert placer.placed[blk.idstr][HUGE:2 * HUGE].all()
        assert np.array_equal(blk.pages[HUGE:2 * HUGE], data)  # through the worker's own mapping
        assert rec.bitmaps[blk.idstr].bits[HUGE:2 * HUGE].all()
        assert 2 << 20 in asm._tmp  # assembled in the channel's temporary host page
    finally:
        link.close()


# --- end to end: requests interrupt huge pages, the pieces are placed in place ---

PREEMPT = {"postcopy-ram": True, "postcopy-preempt": True}
SLOW = {"postcopy-after-percent": 5, "max-postcopy-bandwidth": 48 << 20}


@pytest.mark.parametrize("checks", [True, False], ids=["page-checksums-on", "page-checksums-off"])
@pytest.mark.parametrize("channels", [1, 2])
def test_interrupted_huge_pages_migrate_with_equal_digests(checks, channels):
    guest = GuestConfig(size=128 << 20, page_size=2 << 20, fill="pattern",
                        workload=WorkloadConfig(dirty_rate=16 << 20),
                        dest_workload=WorkloadConfig(threads=2, pattern="random", dirty_rate=4 << 20, batch=1))
    caps = {**PREEMPT, "page-checksums": checks}
    src, dst = run_local_migration("tcp:127.0.0.1:0", guest, caps=caps,
                                   params={**SLOW, "postcopy-channels": channels}, timeout=180)
    assert src["status"] == "completed", src.get("error-desc")
    assert dst["status"] == "completed", dst.get("error-desc")
    assert src["digests"] == dst["digests"]
    # Requests cut into huge pages: at a record boundary (the page then arrives in pieces)
    # or while a record was half written (send_loop's write breaks).
    assert src["preemptions"] + src["requests-served-mid-record"] >= 1
    assert src["restores"] == src["preemptions"]
    # Background pages held behind requested ones: reported, never longer than the run.
    assert src["background-holds"] >= 0 and 0 <= src["background-held-ms"] <= src["total-time"]


# --- discards keep the memory of pages never received (memcpy backend) ---

@pytest.mark.parametrize("backing", ["anon", "memfd"])
def test_discard_drops_received_pages_and_keeps_the_memory_of_others(backing):
    ram = GuestRAM.create(8 << 20, 2 << 20, backing=backing)
    blk = ram.blocks[0]
    rec = ReceivedPages(ram)
    bits = rec.bitmaps[blk.idstr].bits
    rec.place(blk, slice(HUGE, 2 * HUGE), page_data(HUGE, 8))  # received in precopy, then dirtied
    blk.pages[2 * HUGE:, 0] = 5  # memory held (backed at ADVISE) but never received
    rec.discard(blk, 0, 4 << 20)  # host pages 0 (never received) and 1 (received)
    rec.discard(blk, 4 << 20, 4 << 20)  # host pages 2 and 3, never received
    assert not bits.any()
    assert not blk.pages[HUGE:2 * HUGE].any()  # the stale page's memory went (reads zero again)
    assert (blk.pages[2 * HUGE:, 0] == 5).all()  # kept: placing there is a copy, not a first touch
    # Placing into kept memory: zero pages are written as zeros, not skipped.
    asm = HostPageAssembler(ram, rec, "precopy")
    asm.add(piece(ram, range(2 * HUGE, 2 * HUGE + 10), None, False))
    asm.add(piece(ram, range(2 * HUGE + 10, 3 * HUGE), page_data(HUGE - 10, 9), False))
    assert not blk.pages[2 * HUGE:2 * HUGE + 10].any()
    assert bits[2 * HUGE:3 * HUGE].all()
