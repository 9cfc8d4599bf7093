"""What docs/architecture.md, docs/protocol.md and docs/user-guide.md claim, tested.

- A network migration whose destination RAM differs from the source's fails (digests).
- From the switch to postcopy on, every page is sent at most once (seen by a proxy
  between the two sides that decodes everything it forwards).
- migrate-cancel is refused in postcopy; max-postcopy-bandwidth changes live.
- The destination names its error for unaligned discards, LISTEN/RUN out of order and
  RAM pages inside PACKAGED.

Real sockets on loopback and real engine objects; no part of the migration is mocked.
"""
from __future__ import annotations

import collections
import socket
import threading
import time

import numpy as np
import pytest

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels.codec import ReturnPathDecoder, StreamDecoder
from ferry_migrate.engine.destination import MigrationDestination
from ferry_migrate.engine.params import MigrationConfig
from ferry_migrate.engine.ram import GuestRAM
from ferry_migrate.engine.source import GUEST_DEVICE, GUEST_DEVICE_VERSION, MigrationSource
from ferry_migrate.engine.workload import Workload, WorkloadConfig

from .conftest import decode_rp_chunked, wait_until

HUGE = 512  # target pages in a 2 MiB host page


def _config(caps: dict | None = None, params: dict | None = None) -> MigrationConfig:
    cfg = MigrationConfig()
    cfg.set_capabilities(caps or {})
    cfg.set_parameters(params or {})
    return cfg


# ---------------------------------------------------------------------------
# Digests: a destination whose RAM differs fails the migration
# ---------------------------------------------------------------------------

def test_network_migration_with_a_corrupted_destination_fails():
    """Page 0 is corrupted on the destination after it was placed and before the load
    ends: the source compares digests after SHUT and must report failed, not completed."""
    s_ram, d_ram = GuestRAM.create(16 << 20), GuestRAM.create(16 << 20)
    s_ram.fill("pattern")
    cfg = _config(params={"max-bandwidth": 1 << 20})  # slow until the corruption is done
    d = MigrationDestination(d_ram, _config())
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    s = MigrationSource(s_ram, None, cfg)
    s.start(uri)
    src0, dst0 = s_ram.blocks[0].pages[0], d_ram.blocks[0].pages[0]
    wait_until(lambda: np.array_equal(src0, dst0), what="page 0 placed on the destination")
    assert s.status == "active" and d.status == "active"  # the load is not over
    dst0[100] ^= 0xFF  # the destination's copy now differs (the source's guest does not run)
    cfg.set_parameters({"max-bandwidth": 0})
    s.parameters_changed()
    assert s.wait(120) == "failed"
    assert "digest mismatch after load" in s.stats.error and "pc.ram" in s.stats.error, s.stats.error
    d.wait(60)
    assert s.query()["digests"] != d.query()["digests"]


def test_the_same_migration_uncorrupted_completes():
    """The harness above without the corruption completes: the failure is the corruption's."""
    s_ram, d_ram = GuestRAM.create(16 << 20), GuestRAM.create(16 << 20)
    s_ram.fill("pattern")
    d = MigrationDestination(d_ram, _config())
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    s = MigrationSource(s_ram, None, _config())
    s.start(uri)
    assert s.wait(120) == "completed", s.stats.error
    assert d.wait(60) == "completed"
    assert s.query()["digests"] == d.query()["digests"]


# ---------------------------------------------------------------------------
# Each page at most once after the switch, seen on the wire
# ---------------------------------------------------------------------------

class TeeProxy:
    """A TCP proxy: each accepted connection is connected onward, in arrival order, and
    everything the source sends is kept for decoding afterwards (the return path is
    forwarded as is)."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.lst = socket.create_server(("127.0.0.1", 0))
        self.port = self.lst.getsockname()[1]
        self.streams: list[bytearray] = []
        self.threads: list[threading.Thread] = []
        self._closed = False
        t = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self):
        while not self._closed:
            try:
                a, _ = self.lst.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            buf = bytearray()
            self.streams.append(buf)
            for src, dst, keep, name in ((a, b, buf, "up"), (b, a, None, "down")):
                t = threading.Thread(target=self._pump, args=(src, dst, keep), name=f"proxy-{name}", daemon=True)
                t.start()
                self.threads.append(t)

    @staticmethod
    def _pump(src, dst, keep):
        try:
            while data := src.recv(1 << 20):
                if keep is not None:
                    keep += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass

    def close(self):
        self._closed = True
        self.lst.close()


def _pages_after_switch(streams, infos) -> tuple[collections.Counter, int]:
    """Decode what the source sent: (count of each (block, target page) sent after
    PACKAGED on any channel, pages sent before it)."""
    after = collections.Counter()
    before = 0
    for i, data in enumerate(streams):
        mode = "stream" if i == 0 else "pages"
        dec = StreamDecoder(infos, mode=mode, devices=[codec.DeviceSpec(GUEST_DEVICE, GUEST_DEVICE_VERSION)],
                            channel_name=f"conn{i}")
        switched = i > 0  # POSTCOPY channels carry only requested pages, after the switch
        mv = memoryview(data)
        pos = 0
        end = len(data)
        if i == 0 and end >= C.FERRY_VERDICT_SIZE:
            try:  # Ferry's verdict follows the end of the stream (docs/reliability.md)
                codec.parse_ferry_verdict(bytes(mv[end - C.FERRY_VERDICT_SIZE:]))
                end -= C.FERRY_VERDICT_SIZE
            except Exception:
                pass
        while pos < end:
            ev, n = dec.next_event(mv[pos:end])
            assert ev is not codec.NEED_DATA, f"connection {i}: stream cut at byte {pos} of {end}"
            pos += n
            if isinstance(ev, codec.Command) and ev.cmd == C.MIG_CMD_PACKAGED:
                switched = True
            elif isinstance(ev, codec.RamRun):
                if switched:
                    after.update((ev.block.idstr, int(p)) for p in ev.pages)
                else:
                    before += len(ev)
            del ev
        assert dec.at_boundary(), f"connection {i} ended while expecting {dec.expecting()}"
    return after, before


@pytest.mark.parametrize("caps, page_size", [
    ({"postcopy-ram": True}, 4096),
    ({"postcopy-ram": True, "postcopy-preempt": True}, 2 << 20),
], ids=["postcopy-4k", "preempt-2m"])
def test_each_page_is_sent_at_most_once_after_the_switch(caps, page_size):
    size = 32 << 20
    s_ram, d_ram = GuestRAM.create(size, page_size), GuestRAM.create(size, page_size)
    s_ram.fill("pattern")
    params = {"postcopy-after-percent": 10, "max-postcopy-bandwidth": 16 << 20}
    swl = Workload(s_ram, WorkloadConfig(threads=1, pattern="random", dirty_rate=32 << 20))
    dwl = Workload(d_ram, WorkloadConfig(threads=2, pattern="random", dirty_rate=8 << 20, batch=1))
    d = MigrationDestination(d_ram, _config(caps, params), workload=dwl)
    host, port = d.listen("tcp:127.0.0.1:0")[4:].rsplit(":", 1)
    d.start()
    proxy = TeeProxy((host, int(port)))
    s = MigrationSource(s_ram, swl, _config(caps, params))
    swl.start()
    try:
        s.start(f"tcp:127.0.0.1:{proxy.port}")
        assert s.wait(180) == "completed", s.stats.error
        assert d.wait(60) == "completed", d.stats.error
    finally:
        swl.stop()
        dwl.stop()
        proxy.close()
    assert s.query()["digests"] == d.query()["digests"]
    assert len(proxy.streams) == (2 if "postcopy-preempt" in caps else 1)
    for t in proxy.threads[1:]:
        t.join(60)
    after, before = _pages_after_switch(proxy.streams, s_ram.infos())
    assert before > 0 and len(after) > 0  # both phases really happened
    assert d.query()["postcopy-requests"] > 0
    twice = [(k, n) for k, n in after.items() if n > 1]
    assert not twice, f"{len(twice)} pages sent more than once after the switch, e.g. {twice[:5]}"


# ---------------------------------------------------------------------------
# In postcopy: cancel refused, max-postcopy-bandwidth live
# ---------------------------------------------------------------------------

def test_cancel_refused_in_postcopy_and_max_postcopy_bandwidth_changes_live():
    size = 32 << 20
    s_ram, d_ram = GuestRAM.create(size, 2 << 20), GuestRAM.create(size, 2 << 20)
    s_ram.fill("pattern")
    rate = 1 << 20
    caps = {"postcopy-ram": True}
    cfg = _config(caps, {"max-postcopy-bandwidth": rate})
    d = MigrationDestination(d_ram, _config(caps))
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    s = MigrationSource(s_ram, None, cfg)
    s.start(uri)
    wait_until(lambda: s.status in ("active", "completed"), what="the migration to start")
    s.start_postcopy()
    wait_until(lambda: s.status == "postcopy-active" and d.status == "postcopy-active",
               what="both sides in postcopy")
    # Held to max-postcopy-bandwidth: after the switch no more than the rate allows (one
    # 2 MiB host page may be ahead of the budget, the limiter waits after each write).
    t0, sent0 = time.monotonic(), s.query()["ram"]["transferred"]
    wait_until(lambda: s.query()["ram"]["transferred"] > sent0 + (3 << 20), what="3 MiB more sent in postcopy")
    sent1 = s.query()["ram"]["transferred"]
    assert sent1 - sent0 <= rate * (time.monotonic() - t0) + (4 << 20)
    # The guest runs on the destination now: cancel is refused, and nothing changes.
    with pytest.raises(RuntimeError, match="refused in postcopy"):
        s.cancel()
    assert s.status == "postcopy-active"
    remaining = s.query()["ram"]["remaining"]
    assert remaining > 8 << 20  # still 8+ seconds of work at 1 MiB/s
    # Lifted live: the rest goes out at once, far sooner than the old limit allowed.
    t1 = time.monotonic()
    cfg.set_parameters({"max-postcopy-bandwidth": 0})
    s.parameters_changed()
    assert s.wait(120) == "completed", s.stats.error
    assert time.monotonic() - t1 < remaining / rate  # the old limit would have taken this long at least
    assert d.wait(60) == "completed"
    assert s.query()["digests"] == d.query()["digests"]


# ---------------------------------------------------------------------------
# Named errors of the postcopy commands
# ---------------------------------------------------------------------------

def _postcopy_prologue() -> bytes:
    return (codec.encode_header() + codec.encode_open_return_path() + codec.encode_postcopy_advise(2 << 20)
            + codec.encode_section_start(C.QEMU_VM_SECTION_START, 0, "ram", 0, 4)
            + codec.encode_ram_mem_size([("pc.ram", 8 << 20, 2 << 20)], postcopy=True)
            + codec.encode_footer(0))


def _page_part() -> bytes:
    return (codec.encode_section_part(C.QEMU_VM_SECTION_PART, 0)
            + codec.encode_page_header(0, C.RAM_SAVE_FLAG_PAGE, "pc.ram") + bytes([1]) * 4096
            + codec.encode_eos() + codec.encode_footer(0))


LISTEN, RUN = codec.encode_postcopy_listen(), codec.encode_postcopy_run()

BAD_POSTCOPY = {
    "discard start not host-page aligned": (
        b"".join(codec.encode_postcopy_discard("pc.ram", [(4096, 2 << 20)])),
        ["POSTCOPY_RAM_DISCARD", "0x1000+0x200000", "not host-page aligned (0x200000)"]),
    "discard length not host-page aligned": (
        b"".join(codec.encode_postcopy_discard("pc.ram", [(0, 4096)])),
        ["POSTCOPY_RAM_DISCARD", "0x0+0x1000", "not host-page aligned"]),
    "discard after LISTEN": (
        codec.encode_packaged(LISTEN) + b"".join(codec.encode_postcopy_discard("pc.ram", [(0, 2 << 20)])),
        ["POSTCOPY_RAM_DISCARD: after POSTCOPY_LISTEN"]),
    "RUN before LISTEN": (codec.encode_packaged(RUN), ["POSTCOPY_RUN: before POSTCOPY_LISTEN"]),
    "LISTEN twice": (codec.encode_packaged(LISTEN + LISTEN), ["POSTCOPY_LISTEN: received twice"]),
    "RUN twice": (codec.encode_packaged(LISTEN + codec.encode_device_full(1, GUEST_DEVICE, GUEST_DEVICE_VERSION, b"{}")
                                        + RUN + RUN), ["POSTCOPY_RUN: received twice"]),
    "RAM pages inside PACKAGED": (
        codec.encode_packaged(LISTEN + codec.encode_section_start(C.QEMU_VM_SECTION_START, 0, "ram", 0, 4)
                              + codec.encode_ram_mem_size([("pc.ram", 8 << 20, 2 << 20)]) + codec.encode_footer(0)
                              + _page_part() + RUN),
        ["PACKAGED: RAM pages inside the package"]),
    # A package is a stream of its own: the main stream's RAM section is not known in it.
    "RAM section part inside PACKAGED": (codec.encode_packaged(LISTEN + _page_part() + RUN),
                                         ["SECTION_PART: unknown section id 0 (channel packaged"]),
}


@pytest.mark.parametrize("name", list(BAD_POSTCOPY))
def test_postcopy_commands_out_of_place_get_named_errors(name):
    body, words = BAD_POSTCOPY[name]
    d = MigrationDestination(GuestRAM.create(8 << 20, 2 << 20), _config({"postcopy-ram": True}))
    host, port = d.listen("tcp:127.0.0.1:0")[4:].rsplit(":", 1)
    d.start()
    reply = bytearray()
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(60)
        sock.sendall(_postcopy_prologue() + body)
        if name == "RUN twice":
            # The first RUN started the guest here: from then on a fault pauses (the guest
            # waits for its pages), it never fails (docs/reliability.md).
            assert d.sm.wait_for(("postcopy-paused", "failed"), 60) == "postcopy-paused"
            for w in words:
                assert w in d.stats.error, d.stats.error
            d.quit()
            return
        try:
            while chunk := sock.recv(4096):
                reply += chunk
        except OSError:
            pass
        assert d.wait(60) == "failed"
    for w in words:
        assert w in d.stats.error, d.stats.error
    msgs, _ = decode_rp_chunked(ReturnPathDecoder(), bytes(reply))
    assert [(m.name, m.value) for m in msgs][-1:] == [("SHUT", 1)]  # the source is told it failed


def test_the_same_postcopy_commands_in_order_are_accepted():
    """Aligned discards, then PACKAGED [LISTEN, state, RUN], then the pages: no error,
    the destination reaches postcopy-active (the harness above fails only for the fault)."""
    d = MigrationDestination(GuestRAM.create(8 << 20, 2 << 20), _config({"postcopy-ram": True}))
    host, port = d.listen("tcp:127.0.0.1:0")[4:].rsplit(":", 1)
    d.start()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(_postcopy_prologue() + b"".join(codec.encode_postcopy_discard("pc.ram", [(0, 8 << 20)]))
                     + codec.encode_packaged(LISTEN + codec.encode_device_full(1, GUEST_DEVICE, GUEST_DEVICE_VERSION,
                                                                               b"{}") + RUN))
        wait_until(lambda: d.status == "postcopy-active" and d.running, what="the destination to run the guest")
        assert d.stats.error is None
    # The source vanished mid-postcopy: not a success, and not a failure either: the guest runs
    # here and waits for a recovery (docs/reliability.md).
    assert d.sm.wait_for(("postcopy-paused", "failed", "completed"), 60) == "postcopy-paused"
    d.quit()
    assert d.wait(60) == "postcopy-paused"
