"""The page scheduler as a state machine (Hypothesis RuleBasedStateMachine), no sockets.

A model of the migration thread (engine/source.py: it asks for orders, sends their dirty
target pages one at a time, asks should_preempt between them) and of the return-path
thread (requests, or claims with urgent-pages-from=return-path) drives a real
PageScheduler through any interleaving of: the guest dirtying pages in precopy, the
switch to postcopy (dirty bitmap widened to whole host pages, as the source does),
requests, claims, preemptions and restores, channel switches. Invariants:

- no host page sent on two channels after the switch;
- no target page sent twice after the switch, and every page dirty at the switch sent
  exactly once by the end;
- a record never relies on CONTINUE across a channel switch: whenever an order's channel
  differs from the previous order's, the order says so (``switched``) and its first
  record names its block.
"""
from __future__ import annotations

import collections

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ferry_migrate.engine.bitmap import PageBitmap
from ferry_migrate.engine.scheduler import PRECOPY, PageScheduler, SchedBlock

# (target pages, target pages per host page): a huge-page block and a small-page block.
SHAPES = [(16, 4), (12, 1), (8, 4)]


class SchedulerMachine(RuleBasedStateMachine):
    # Weighted towards preemption with queued requests, where most of the policy is.
    @initialize(preempt=st.sampled_from([True, True, False]), break_huge=st.sampled_from([True, True, False]),
                channels=st.integers(1, 3), claims=st.sampled_from([False, False, True]))
    def setup(self, preempt, break_huge, channels, claims):
        self.blocks = [SchedBlock(n, tph, PageBitmap(n, fill=True)) for n, tph in SHAPES]
        self.sched = PageScheduler(self.blocks, preempt=preempt, break_huge=break_huge,
                                   postcopy_channels=channels)
        self.claims = claims and preempt  # urgent-pages-from=return-path needs POSTCOPY channels
        self.current = None  # the order the migration thread is sending
        self.pos = 0  # its next target page
        self.prev_channel = PRECOPY  # channel of the previous order of the migration thread
        self.last_named = {}  # channel -> block its last record named (the destination's view)
        self.postcopy = False
        self.finished = False
        self.at_switch: set[tuple[int, int]] = set()
        self.sent_after = collections.Counter()  # (block, page) -> times sent after the switch
        self.channels_of = collections.defaultdict(set)  # (block, host page) -> channels, after the switch

    # --- helpers ---
    def _hp(self, block: int, page: int) -> int:
        tph = self.blocks[block].tp_per_hp
        return page - page % tph

    def _emit(self, block: int, page: int, channel: int, reset: bool) -> None:
        """One page record on ``channel``: named unless CONTINUE applies."""
        assert self.blocks[block].dirty.bits[page], "sending a page that is not dirty"
        self.blocks[block].dirty.bits[page] = False
        if reset:
            self.last_named.pop(channel, None)
        if self.last_named.get(channel) != block:
            self.last_named[channel] = block  # a named record
        if self.postcopy:
            self.sent_after[(block, page)] += 1
            self.channels_of[(block, self._hp(block, page))].add(channel)

    # --- the guest, before the switch ---
    @precondition(lambda self: not self.postcopy)
    @rule(data=st.data())
    def guest_dirties(self, data):
        b = data.draw(st.integers(0, len(self.blocks) - 1))
        p = data.draw(st.integers(0, self.blocks[b].npages - 1))
        self.blocks[b].dirty.bits[p] = True

    @precondition(lambda self: not self.postcopy and self.current is None)
    @rule()
    def switch_to_postcopy(self):
        for b in self.blocks:
            if b.tp_per_hp > 1:
                bits = b.dirty.bits.reshape(-1, b.tp_per_hp)
                bits[bits.any(axis=1)] = True
        self.at_switch = {(i, int(p)) for i, b in enumerate(self.blocks) for p in b.dirty.bits.nonzero()[0]}
        self.sched.postcopy = True
        self.postcopy = True

    # --- the destination's requests ---
    @precondition(lambda self: self.postcopy and not self.finished and not self.claims)
    @rule(data=st.data())
    def request(self, data):
        b = data.draw(st.integers(0, len(self.blocks) - 1))
        p = data.draw(st.integers(0, self.blocks[b].npages - 1))
        self.sched.request(b, self._hp(b, p))

    @precondition(lambda self: self.postcopy and not self.finished and self.claims)
    @rule(data=st.data())
    def claim(self, data):
        """The return-path thread serves a request itself: the host page's dirty pages at once."""
        b = data.draw(st.integers(0, len(self.blocks) - 1))
        hp = self._hp(b, data.draw(st.integers(0, self.blocks[b].npages - 1)))
        blk = self.blocks[b]
        dirty = [hp + i for i in range(blk.tp_per_hp) if blk.dirty.bits[hp + i]]
        order = self.sched.claim(b, hp)
        if order is None:
            return
        assert order.channel != PRECOPY and order.requested
        assert (order.block, order.start, order.end) == (b, hp, hp + blk.tp_per_hp)
        assert not blk.dirty.bits[hp:hp + blk.tp_per_hp].any()  # claimed: the migration thread cannot pick it
        for i, p in enumerate(dirty):
            blk.dirty.bits[p] = True  # (cleared by claim; _emit clears it again as it sends)
            self._emit(b, p, order.channel, reset=False)

    # --- the migration thread ---
    @precondition(lambda self: self.current is None and not self.finished)
    @rule()
    def next_order(self):
        o = self.sched.next()
        if o is None:
            if self.postcopy:
                self.finished = True
            return
        if o.channel != self.prev_channel:
            assert o.switched, f"channel {self.prev_channel} -> {o.channel} without switched"
        else:
            assert not o.switched
        self.prev_channel = o.channel
        if o.requested:
            assert self.postcopy
        self.current, self.pos = o, o.start
        self._first = True

    @precondition(lambda self: self.current is not None)
    @rule()
    def send_one_page(self):
        """One step of MigrationSource._execute: at a target-page boundary inside the order,
        stop for a queued request if the order is interruptible; else send the next dirty page."""
        o = self.current
        p = self.pos
        if p >= o.end:
            self.current = None
            return
        if self.sched.should_preempt(o):
            assert self.sched.interruptible(o)
            self.sched.preempted(o, p)
            self.current = None
            return
        bits = self.blocks[o.block].dirty.bits
        while p < o.end and not bits[p]:
            p += 1
        if p >= o.end:
            self.current = None
            return
        self._emit(o.block, p, o.channel, reset=self._first and o.switched)
        if self._first and o.switched:
            assert self.last_named[o.channel] == o.block  # the first record after a switch names its block
        self._first = False
        self.pos = p + 1

    @precondition(lambda self: self.finished)
    @rule()
    def stays_finished(self):
        assert self.sched.next() is None and not self.sched.has_requests()

    # --- invariants ---
    @invariant()
    def no_host_page_on_two_channels(self):
        if hasattr(self, "channels_of"):
            bad = {k: v for k, v in self.channels_of.items() if len(v) > 1}
            assert not bad, bad

    @invariant()
    def no_page_sent_twice_after_the_switch(self):
        if hasattr(self, "sent_after"):
            twice = [k for k, n in self.sent_after.items() if n > 1]
            assert not twice, twice
            assert set(self.sent_after) <= self.at_switch  # nothing but what was dirty at the switch

    @invariant()
    def all_sent_when_finished(self):
        if getattr(self, "finished", False):
            assert not any(b.dirty.bits.any() for b in self.blocks)
            assert set(self.sent_after) == self.at_switch


SchedulerMachine.TestCase.settings = settings(stateful_step_count=80, deadline=None,
                                              max_examples=settings.default.max_examples)
test_scheduler_state_machine = SchedulerMachine.TestCase
