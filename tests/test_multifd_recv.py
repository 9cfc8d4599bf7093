"""The destination's multifd receivers (engine/multifd_recv.py) over real socket pairs.

Real receiver threads read real sockets into real guest RAM; the test plays the
source's side with the codec's encoders. Checked: pages of pass 2 are not
placed before every channel reached its SYNC of pass 1 (one channel held
back); a channel id connecting twice, a channel that never connects, a packet
with too many pages, an offset outside the block, a packet for a pass already
synced, a page whose check value differs, a page after LISTEN: each a named
error, and nothing of the bad packet placed. A channel is closed once its FIN was read.
"""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from ferry_migrate.channels import constants as C
from ferry_migrate.channels import multifd_codec as M
from ferry_migrate.channels.errors import PageIntegrityError
from ferry_migrate.channels.pagecheck import check_values
from ferry_migrate.channels.transport import SocketTransport
from ferry_migrate.engine.multifd_recv import MultifdReceiver
from ferry_migrate.engine.postcopy import ReceivedPages
from ferry_migrate.engine.ram import GuestRAM

from .conftest import wait_until

PAGE = C.TARGET_PAGE_SIZE


class Rig:
    """A receiver of ``n`` channels on one guest of ``size`` bytes, fed through socket pairs."""

    def __init__(self, n: int, checks: bool = False, timeout: float = 30.0, size: int = 4 << 20):
        self.ram = GuestRAM.create(size)
        self.received = ReceivedPages(self.ram)
        self.errors: list = []
        self.rx = MultifdReceiver(n, lambda: self.ram, lambda: self.received, lambda: checks,
                                  self.errors.append, timeout)
        self.socks = []

    def connect(self, index: int) -> socket.socket:
        a, b = socket.socketpair()
        self.socks.append(a)
        self.rx.add(SocketTransport(b, f"test-{index}"), index)
        return a

    def close(self):
        self.rx.close()
        for s in self.socks:
            s.close()
        self.ram.close()


def rigs(cls):
    """Fixture body: a maker of ``cls`` rigs, every one closed at the end."""
    made = []

    def make(*a, **kw):
        r = cls(*a, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


@pytest.fixture
def rig():
    yield from rigs(Rig)


def packet(pages, fill: int, num: int, pass_: int, flags: int = 0, checks=None, nnormal=None) -> bytes:
    pages = np.asarray(pages, np.int64)
    nnormal = len(pages) if nnormal is None else nnormal
    head = M.encode_packet_head(flags, "pc.ram" if len(pages) else "", pages, nnormal, num, pass_, checks)
    return head + bytes([fill]) * (PAGE * nnormal)


def sync(num, pass_):
    return packet([], 0, num, pass_, C.FERRY_MULTIFD_FLAG_SYNC)


def placed(r: Rig, page: int) -> int:
    return int(r.ram.blocks[0].pages[page][0])


def test_no_page_of_the_next_pass_before_every_channel_synced(rig):
    r = rig(2)
    a, b = r.connect(1), r.connect(2)
    a.sendall(M.encode_init(1, 2) + packet([5], 0x11, 1, 1) + sync(2, 1) + packet([5], 0x22, 3, 2))
    b.sendall(M.encode_init(2, 2))  # channel 2 is slow: its pass 1 not done yet
    wait_until(lambda: placed(r, 5) == 0x11, 30, "pass 1 of channel 1 placed")
    done = threading.Event()
    t = threading.Thread(target=lambda: (r.rx.sync_main(), done.set()))
    t.start()
    assert not done.wait(0.3)  # the flush waits for channel 2
    assert placed(r, 5) == 0x11  # pass 2 of channel 1 is held back
    b.sendall(packet([6], 0x33, 1, 1) + sync(2, 1))
    t.join(30)
    assert done.is_set()
    wait_until(lambda: placed(r, 5) == 0x22, 30, "pass 2 placed after the flush")
    assert placed(r, 6) == 0x33 and not r.errors
    assert r.received.bitmaps["pc.ram"].bits[[5, 6]].all()


def test_a_channel_that_connects_twice_is_named(rig):
    r = rig(2)
    r.connect(1).sendall(M.encode_init(1, 2))
    r.connect(2).sendall(M.encode_init(1, 2))
    wait_until(lambda: r.errors, 30, "an error")
    assert isinstance(r.errors[0], M.MultifdChannelTwice) and "channel id 1 connected twice" in str(r.errors[0])
    with pytest.raises(M.MultifdChannelTwice):
        r.rx.sync_main()


def test_a_channel_that_never_connects_is_named(rig):
    r = rig(3, timeout=0.5)
    r.connect(1).sendall(M.encode_init(1, 3) + sync(1, 1))
    with pytest.raises(M.MultifdChannelMissing, match=r"channel\(s\) \[2, 3\] of 3 never connected"):
        r.rx.sync_main()


def test_a_channel_that_ends_before_fin_is_named(rig):
    r = rig(1)
    s = r.connect(1)
    s.sendall(M.encode_init(1, 1) + packet([1], 0x44, 1, 1)[:100])
    s.close()
    wait_until(lambda: r.errors, 30, "an error")
    assert isinstance(r.errors[0], M.MultifdChannelMissing) and "before its FIN" in str(r.errors[0])
    assert not r.received.bitmaps["pc.ram"].bits.any()


@pytest.mark.parametrize("case", ["too-many", "outside", "synced", "check", "after-listen"])
def test_bad_packets_are_named_and_nothing_of_them_is_placed(rig, case):
    r = rig(1, checks=(case == "check"))
    s = r.connect(1)
    s.sendall(M.encode_init(1, 1))
    if case == "too-many":
        bad = bytearray(packet([1], 0x55, 1, 1))
        bad[8:12] = (C.FERRY_MULTIFD_PACKET_PAGES + 1).to_bytes(4, "big")
        want = M.MultifdPacketTooLarge
    elif case == "outside":
        bad = bytearray(packet([1, 2], 0x55, 1, 1))
        pos = C.FERRY_MULTIFD_HEADER_SIZE + len("pc.ram") + 8
        bad[pos:pos + 8] = (4 << 20).to_bytes(8, "big")  # the block is 4 MiB
        want = M.MultifdOffsetOutside
    elif case == "synced":
        s.sendall(sync(1, 1))
        wait_until(lambda: r.rx.channels[0].reached == 1, 30, "the SYNC")
        r.rx.sync_main()
        bad = packet([1], 0x55, 2, 1)  # pass 1 again, after its flush
        want = M.MultifdPassSynced
    elif case == "check":
        good = check_values("pc.ram", np.array([1]), np.full((1, PAGE // 8), 0x5555555555555555, np.uint64))
        bad = packet([1], 0x55, 1, 1, checks=good ^ np.uint64(1))
        want = PageIntegrityError
    else:
        r.rx.close_placement()
        bad = packet([1], 0x55, 1, 1)
        want = M.MultifdError
    s.sendall(bytes(bad))
    wait_until(lambda: r.errors, 30, "an error")
    assert isinstance(r.errors[0], want), r.errors
    assert "multifd-1" in str(r.errors[0])
    assert not r.received.bitmaps["pc.ram"].bits.any()
    assert placed(r, 1) == 0 and placed(r, 2) == 0


def test_checked_pages_place_and_zero_pages_clear(rig):
    r = rig(1, checks=True)
    blk = r.ram.blocks[0]
    blk.pages[9] = 0x77  # a zero page arriving must clear this
    words = np.full((2, PAGE // 8), 0x6666666666666666, np.uint64)
    checks = np.concatenate((check_values("pc.ram", np.array([3, 4]), words), check_values("pc.ram", np.array([9]), None)))
    s = r.connect(1)
    s.sendall(M.encode_init(1, 1) + packet([3, 4, 9], 0x66, 1, 1, checks=checks, nnormal=2)
              + packet([], 0, 2, 1, C.FERRY_MULTIFD_FLAG_FIN))
    wait_until(lambda: r.rx.channels[0].done, 30, "FIN")
    assert not r.errors
    assert placed(r, 3) == placed(r, 4) == 0x66 and not blk.pages[9].any()
    assert r.rx.stats()["multifd-1"]["normal"] == 2 and r.rx.stats()["multifd-1"]["duplicate"] == 1


def test_a_channel_is_closed_once_its_fin_was_read(rig):
    """After FIN the receiver closes its connection at once (the source's side reads EOF),
    not only when the migration ends: in postcopy that is long after the switch."""
    r = rig(2)
    a, b = r.connect(1), r.connect(2)
    a.sendall(M.encode_init(1, 2) + packet([2], 0x12, 1, 1) + packet([], 0, 2, 1, C.FERRY_MULTIFD_FLAG_FIN))
    b.sendall(M.encode_init(2, 2))  # channel 2 goes on
    wait_until(lambda: r.rx.channels[0].done, 30, "FIN of channel 1")
    a.settimeout(30)
    reply = b""
    while len(reply) < C.FERRY_MULTIFD_REPLY_SIZE:  # the init reply comes first
        got = a.recv(C.FERRY_MULTIFD_REPLY_SIZE - len(reply))
        assert got, f"connection closed after {len(reply)} bytes of the init reply"
        reply += got
    assert a.recv(1) == b""  # then closed by the receiver
    assert placed(r, 2) == 0x12 and not r.errors
    assert r.rx.stats()["multifd-1"]["normal"] == 1 and r.rx.stats()["multifd-1"]["done"]
    b.sendall(packet([], 0, 1, 1, C.FERRY_MULTIFD_FLAG_FIN))
    wait_until(lambda: r.rx.channels[1].done, 30, "FIN of channel 2")
    r.rx.close()  # closing again is harmless
    assert not r.errors
