"""The page scheduler on its own: order of service, preempt/restore, dropped duplicates,
channel switches, N POSTCOPY channels, return-path claims. No sockets."""
import pytest

from ferry_migrate.engine.bitmap import PageBitmap
from ferry_migrate.engine.scheduler import PRECOPY, RUN_PAGES, PageScheduler, SchedBlock

HUGE = 512  # target pages in a 2 MiB host page


def make(npages=4 * HUGE, tph=HUGE, nblocks=1, **kw):
    blocks = [SchedBlock(npages, tph, PageBitmap(npages, fill=True)) for _ in range(nblocks)]
    return PageScheduler(blocks, **kw), blocks


def send(blocks, order, upto=None):
    """What the migration thread does: clear the bits it sends."""
    end = order.end if upto is None else upto
    blocks[order.block].dirty.bits[order.start:end] = False


def test_background_small_pages_run_and_wrap():
    sched, blocks = make(npages=1000, tph=1)
    o = sched.next()
    assert (o.block, o.start, o.end, o.channel, o.requested) == (0, 0, RUN_PAGES, PRECOPY, False)
    send(blocks, o)
    blocks[0].dirty.bits[5] = True  # dirtied again behind the cursor
    orders = []
    while (o := sched.next()) is not None:
        orders.append((o.start, o.end))
        send(blocks, o)
    assert orders[-1][0] == 5  # the scan wrapped around to it (the sender sends only dirty pages)
    assert orders[:3] == [(256, 512), (512, 768), (768, 1000)]


def test_background_huge_page_from_first_dirty_page():
    sched, blocks = make()
    blocks[0].dirty.bits[:HUGE + 7] = False
    o = sched.next()
    assert (o.start, o.end) == (HUGE + 7, 2 * HUGE)


def test_vanilla_request_first_on_precopy_then_locality():
    sched, blocks = make(npages=8 * HUGE)
    sched.postcopy = True
    o = sched.next()
    send(blocks, o)
    sched.request(0, 5 * HUGE)
    r = sched.next()
    assert (r.start, r.end, r.channel, r.requested) == (5 * HUGE, 6 * HUGE, PRECOPY, True)
    send(blocks, r)
    nxt = sched.next()
    assert nxt.start == 6 * HUGE  # the background scan goes on after the requested page


def test_request_for_clean_page_is_skipped():
    sched, blocks = make()
    sched.postcopy = True
    blocks[0].dirty.bits[HUGE:2 * HUGE] = False
    sched.request(0, HUGE)
    o = sched.next()
    assert not o.requested and o.start == 0
    assert sched.requests_already_sent == 1


def test_preempt_interrupt_and_restore_exactly_where_it_stopped():
    sched, blocks = make(preempt=True)
    sched.postcopy = True
    o = sched.next()
    assert o.channel == PRECOPY and sched.interruptible(o)
    send(blocks, o, upto=10)  # ten target pages out
    assert not sched.should_preempt(o)
    sched.request(0, 2 * HUGE)
    assert sched.should_preempt(o)
    sched.preempted(o, 10)
    r = sched.next()
    assert (r.start, r.end, r.channel, r.requested, r.switched) == (2 * HUGE, 3 * HUGE, 1, True, True)
    send(blocks, r)
    back = sched.next()
    assert (back.start, back.end, back.channel, back.restored, back.switched) == (10, HUGE, PRECOPY, True, True)
    assert sched.preemptions == 1 and sched.restores == 1
    send(blocks, back)
    assert sched.next().start == HUGE  # then background goes on


def test_request_for_interrupted_page_is_dropped():
    sched, blocks = make(preempt=True)
    sched.postcopy = True
    o = sched.next()
    send(blocks, o, upto=100)
    sched.request(0, 0)  # the very page that is half sent
    sched.preempted(o, 100)
    back = sched.next()
    assert back.restored and back.start == 100 and back.channel == PRECOPY
    assert sched.dropped_in_flight == 1


def test_no_preemption_without_break_huge_or_outside_postcopy_or_on_small_pages():
    sched, _ = make(preempt=True, break_huge=False)
    sched.postcopy = True
    o = sched.next()
    sched.request(0, HUGE)
    assert not sched.should_preempt(o)
    sched, _ = make(preempt=True)
    o = sched.next()
    sched.request(0, HUGE)
    assert not sched.should_preempt(o)  # still precopy
    sched, _ = make(npages=1000, tph=1, preempt=True)
    sched.postcopy = True
    o = sched.next()
    sched.request(0, 600)
    assert not sched.should_preempt(o)  # a small page is never split anyway


def test_requested_page_is_never_interrupted():
    sched, _ = make(preempt=True)
    sched.postcopy = True
    sched.request(0, HUGE)
    r = sched.next()
    sched.request(0, 2 * HUGE)
    assert r.requested and not sched.should_preempt(r)


def test_requests_spread_over_n_postcopy_channels():
    sched, _ = make(npages=16 * HUGE, preempt=True, postcopy_channels=3)
    sched.postcopy = True
    for hp in range(6):
        sched.request(0, hp * HUGE)
    chans = [sched.next().channel for _ in range(6)]
    assert chans == [1, 2, 3, 1, 2, 3]


def test_channel_switch_flags():
    sched, blocks = make(npages=8 * HUGE, preempt=True)
    sched.postcopy = True
    first = sched.next()
    assert not first.switched  # PRECOPY was the channel already
    send(blocks, first)
    sched.request(0, 4 * HUGE)
    sched.request(0, 5 * HUGE)
    a, b = sched.next(), sched.next()
    assert a.switched and not b.switched  # same POSTCOPY channel twice
    send(blocks, a)
    send(blocks, b)
    c = sched.next()
    assert c.channel == PRECOPY and c.switched


def test_claim_from_return_path():
    sched, blocks = make(preempt=True, postcopy_channels=2)
    sched.postcopy = True
    o = sched.next()  # the migration thread is sending host page 0
    send(blocks, o, upto=3)
    assert sched.claim(0, 0) is None and sched.dropped_in_flight == 1
    c = sched.claim(0, 2 * HUGE)
    assert (c.start, c.end, c.channel, c.requested) == (2 * HUGE, 3 * HUGE, 1, True)
    assert not blocks[0].dirty.bits[2 * HUGE:3 * HUGE].any()  # claimed: the migration thread skips it
    assert sched.claim(0, 2 * HUGE) is None and sched.requests_already_sent == 1
    assert sched.claim(0, 3 * HUGE).channel == 2


def test_postcopy_channels_must_be_positive():
    with pytest.raises(ValueError, match="postcopy-channels"):
        make(postcopy_channels=0)


def test_request_dropped_for_the_page_in_flight_marks_it_wanted():
    sched, blocks = make(preempt=True)
    sched.postcopy = True
    o = sched.next()
    assert not o.wanted
    send(blocks, o, upto=o.start + 100)  # half sent on the PRECOPY channel
    assert sched.claim(0, 0) is None  # it completes there...
    assert o.wanted  # ...and is not held behind requested pages meanwhile
    assert sched.dropped_in_flight == 1


def test_request_dropped_for_the_interrupted_page_marks_its_restore_wanted():
    sched, blocks = make(preempt=True)
    sched.postcopy = True
    o = sched.next()
    send(blocks, o, upto=64)
    sched.request(0, 2 * HUGE)
    sched.preempted(o, 64)
    r = sched.next()
    assert r.requested and r.start == 2 * HUGE
    send(blocks, r)
    sched.request(0, 0)  # the interrupted page itself: dropped, finishes on PRECOPY
    restored = sched.next()
    assert restored.restored and restored.start == 64 and restored.wanted
    assert not sched.interrupted_wanted
