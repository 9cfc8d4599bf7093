"""The page scheduler: which pages go out next, and on which channel. Pure, no I/O.

The migration thread asks :meth:`PageScheduler.next` for a :class:`SendOrder`
(one host page, or a run of small pages), sends it chunk by chunk, and asks
:meth:`PageScheduler.should_preempt` between target pages. The scheduler
owns the dirty bitmaps' *reading* policy, the request queue and the preempt
state; it never touches sockets, so it is tested on its own.

Policy (QEMU's, from the postcopy preemption work):

- Requested host pages go first. With postcopy-preempt they go on a POSTCOPY
  channel (spread over ``postcopy_channels`` of them); without it, on the
  PRECOPY channel, and the background scan then continues right after the
  requested page (locality).
- A request pending while a huge page is partly sent on the PRECOPY channel
  interrupts it at the next target-page boundary (``break_huge``); the
  position is saved and resumed exactly there once the queue is empty.
- A request for the host page that is currently interrupted is dropped: that
  page completes on the PRECOPY channel, so no host page ever spans two
  channels.
- A request for a host page with no dirty target page left is skipped: it is
  already on its way.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .bitmap import PageBitmap

PRECOPY = 0  # channel index of the main stream; POSTCOPY channels are 1..N
RUN_PAGES = 256  # most target pages in one background order on small-page blocks
# With preemption, a small-page background order is cut this short so a request
# waits behind at most this much of it (64 KiB).
PREEMPT_RUN_PAGES = 16


@dataclass(slots=True)
class SendOrder:
    """Send the dirty target pages of [start, end) of a block on a channel."""

    block: int
    start: int
    end: int
    channel: int
    requested: bool = False
    restored: bool = False
    switched: bool = False  # the channel differs from the previous order's: forget its last block
    # A request for this host page was dropped because it is on its way here: the
    # guest waits for it, so it is not held behind requested pages (send_loop).
    wanted: bool = False


@dataclass(slots=True)
class SchedBlock:
    """What the scheduler needs of a RAM block."""

    npages: int  # target pages
    tp_per_hp: int  # target pages per host page
    dirty: PageBitmap


class PageScheduler:
    """Decides the next SendOrder; keeps the request queue and preempt state."""

    def __init__(self, blocks: list[SchedBlock], preempt: bool = False, break_huge: bool = True,
                 postcopy_channels: int = 1):
        if postcopy_channels < 1:
            raise ValueError(f"postcopy-channels {postcopy_channels}: at least 1")
        self.blocks = blocks
        self.preempt = preempt
        self.break_huge = break_huge
        self.postcopy_channels = postcopy_channels
        self.postcopy = False  # set at the switch to postcopy
        self.queue: deque[tuple[int, int]] = deque()  # (block, first target page of host page)
        self.cursor = (0, 0)  # background scan position
        self.interrupted: tuple[int, int] | None = None  # (block, next target page) of a preempted huge page
        self.interrupted_wanted = False  # a request for the interrupted page was dropped
        self.current: SendOrder | None = None  # order being sent (for should_preempt)
        self.last_channel = PRECOPY
        self.preempt_run = PREEMPT_RUN_PAGES  # small-page background order in postcopy with preemption
        self._rr = 0  # round robin over POSTCOPY channels
        # counters
        self.requests = 0
        self.requests_already_sent = 0
        self.dropped_in_flight = 0
        self.preemptions = 0
        self.restores = 0

    # --- requests ---
    def host_page(self, block: int, page: int) -> int:
        tph = self.blocks[block].tp_per_hp
        return page - page % tph

    def request(self, block: int, host_page: int) -> None:
        """Queue a destination request for the host page starting at target page ``host_page``."""
        self.requests += 1
        self.queue.append((block, host_page))

    def has_requests(self) -> bool:
        return bool(self.queue)

    def _is_interrupted(self, block: int, hp: int) -> bool:
        it = self.interrupted
        return it is not None and it[0] == block and self.host_page(block, it[1]) == hp

    def _pop_request(self) -> SendOrder | None:
        while self.queue:
            block, hp = self.queue.popleft()
            if self._is_interrupted(block, hp):
                self.dropped_in_flight += 1  # finishes on the PRECOPY channel
                self.interrupted_wanted = True
                continue
            b = self.blocks[block]
            end = hp + b.tp_per_hp
            if b.dirty.next_set(hp, end) >= end:
                self.requests_already_sent += 1
                continue
            if self.preempt:
                ch = 1 + self._rr % self.postcopy_channels
                self._rr += 1
            else:
                ch = PRECOPY
                self.cursor = (block, end)  # locality: the guest likely reads on from there
            return SendOrder(block, hp, end, ch, requested=True)
        return None

    # --- what next ---
    def next(self) -> SendOrder | None:
        """The next order, or None when no dirty page is left and no request waits."""
        order = self._pop_request()
        if order is None and self.interrupted is not None:
            block, page = self.interrupted
            self.interrupted = None
            self.restores += 1
            b = self.blocks[block]
            order = SendOrder(block, page, self.host_page(block, page) + b.tp_per_hp, PRECOPY, restored=True,
                              wanted=self.interrupted_wanted)
            self.interrupted_wanted = False
        if order is None:
            order = self._background()
        if order is not None and order.channel != self.last_channel:
            # As QEMU: after a channel switch the next record names its block.
            order.switched = True
            self.last_channel = order.channel
        self.current = order
        return order

    def _background(self) -> SendOrder | None:
        nb = len(self.blocks)
        block, page = self.cursor
        for _ in range(nb + 1):
            b = self.blocks[block]
            p = b.dirty.next_set(page)
            if p < b.npages:
                if b.tp_per_hp > 1:
                    start = p
                    end = p - p % b.tp_per_hp + b.tp_per_hp
                else:
                    run = self.preempt_run if self.preempt and self.postcopy else RUN_PAGES
                    start, end = p, min(p + run, b.npages)
                self.cursor = (block, end)
                return SendOrder(block, start, end, PRECOPY)
            block, page = (block + 1) % nb, 0
        return None

    def claim(self, block: int, host_page: int) -> SendOrder | None:
        """Serve a request at once (from the return-path thread), or None if it must not be.

        Dropped: the host page is interrupted, or is being sent right now on
        the PRECOPY channel (it completes there). Skipped: nothing of it is
        dirty any more. Otherwise its dirty bits are cleared here, so the
        migration thread will not pick it, and the caller sends it.
        """
        self.requests += 1
        if self._is_interrupted(block, host_page):
            self.dropped_in_flight += 1
            self.interrupted_wanted = True
            return None
        b = self.blocks[block]
        end = host_page + b.tp_per_hp
        first = b.dirty.next_set(host_page, end)
        if first >= end:
            self.requests_already_sent += 1
            return None
        cur = self.current
        if (cur is not None and cur.block == block and cur.channel == PRECOPY
                and self.host_page(block, cur.start) == host_page):
            self.dropped_in_flight += 1
            cur.wanted = True
            return None
        b.dirty.bits[host_page:end] = False
        ch = 1 + self._rr % self.postcopy_channels
        self._rr += 1
        return SendOrder(block, host_page, end, ch, requested=True)

    def reset_connection(self) -> None:
        """A recovery replaced every channel: forget requests, the interrupted page and
        the last channel. What is left to send is in the (rebuilt) dirty bitmaps; the
        destination asks again for what it still waits for.
        """
        self.queue.clear()
        self.interrupted = None
        self.interrupted_wanted = False
        self.current = None
        self.last_channel = PRECOPY
        self.cursor = (0, 0)

    # --- interruption ---
    def interruptible(self, order: SendOrder) -> bool:
        """Can this order be cut at a target-page boundary by a request?"""
        return (self.preempt and self.break_huge and self.postcopy and not order.requested
                and order.channel == PRECOPY and self.blocks[order.block].tp_per_hp > 1)

    def should_preempt(self, order: SendOrder) -> bool:
        """Asked between target pages of an interruptible order."""
        return bool(self.queue) and self.interruptible(order)

    def preempted(self, order: SendOrder, at_page: int) -> None:
        """The sender stopped ``order`` before ``at_page``; resume there later."""
        self.interrupted = (order.block, at_page)
        self.preemptions += 1

    def counters(self) -> dict:
        return {
            "postcopy-requests": self.requests,
            "requests-already-sent": self.requests_already_sent,
            "requests-dropped-in-flight": self.dropped_in_flight,
            "preemptions": self.preemptions,
            "restores": self.restores,
        }
