"""Postcopy: host-page assembly, demand paging (one request per host page in flight),
discard ranges, full two-process migrations with a faulting destination guest, and the
bad-input cases (advise mismatch, return-path garbage, connection lost after RUN)."""
import socket
import threading
import time

import numpy as np
import pytest

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels.codec import RamRun
from ferry_migrate.channels.errors import ProtocolError
from ferry_migrate.engine.destination import MigrationDestination
from ferry_migrate.engine.local import GuestConfig, run_local_migration
from ferry_migrate.engine.params import MigrationConfig
from ferry_migrate.engine.postcopy import FaultHandler, HostPageAssembler, ReceivedPages
from ferry_migrate.engine.ram import GuestRAM
from ferry_migrate.engine.source import MigrationSource, dirty_ranges
from ferry_migrate.engine.workload import WorkloadConfig

from .conftest import wait_until

HUGE = 512


def run(ram, block, pages, data=None):
    pages = np.asarray(pages, dtype=np.int64)
    return RamRun(ram.blocks[block].info, pages, data)


def page_data(n, seed):
    return np.random.default_rng(seed).integers(1, 255, size=(n, 4096), dtype=np.uint8)


# --- assembly ---

def test_huge_page_assembled_then_placed_whole():
    ram = GuestRAM.create(8 << 20, 2 << 20)
    rec = ReceivedPages(ram)
    asm = HostPageAssembler(ram, rec, "precopy")
    data = page_data(HUGE, 1)
    assert asm.add(run(ram, 0, range(HUGE, HUGE + 100), data[:100])) == []
    assert not rec.bitmaps["pc.ram"].bits[HUGE:2 * HUGE].any()  # nothing visible yet
    assert asm.busy
    assert asm.add(run(ram, 0, range(HUGE + 100, 2 * HUGE), data[100:])) == [(0, HUGE)]
    assert rec.bitmaps["pc.ram"].bits[HUGE:2 * HUGE].all()
    assert np.array_equal(ram.blocks[0].pages[HUGE:2 * HUGE], data)
    assert not asm.busy


def test_page_of_another_host_page_before_completion_names_both_offsets():
    ram = GuestRAM.create(8 << 20, 2 << 20)
    asm = HostPageAssembler(ram, ReceivedPages(ram), "postcopy")
    asm.add(run(ram, 0, range(0, 10), page_data(10, 2)))
    with pytest.raises(ProtocolError) as e:
        asm.add(run(ram, 0, [2 * HUGE], page_data(1, 3)))
    msg = str(e.value)
    assert "0x400000" in msg and "0x0" in msg and "incomplete" in msg and "postcopy" in msg


def test_out_of_order_and_mid_page_start_are_errors():
    ram = GuestRAM.create(8 << 20, 2 << 20)
    asm = HostPageAssembler(ram, ReceivedPages(ram), "precopy")
    with pytest.raises(ProtocolError, match="in its middle"):
        asm.add(run(ram, 0, [5], page_data(1, 4)))
    asm = HostPageAssembler(ram, ReceivedPages(ram), "precopy")
    asm.add(run(ram, 0, [0, 1], page_data(2, 4)))
    with pytest.raises(ProtocolError, match="out of order"):
        asm.add(run(ram, 0, [3], page_data(1, 4)))


def test_received_page_is_never_overwritten():
    ram = GuestRAM.create(4 << 20, 4096)
    rec = ReceivedPages(ram)
    asm = HostPageAssembler(ram, rec, "postcopy")
    first = page_data(1, 5)
    asm.add(run(ram, 0, [7], first))
    asm.add(run(ram, 0, [7, 8], page_data(2, 6)))  # a stale copy of 7 arrives later
    assert np.array_equal(ram.blocks[0].pages[7], first[0])
    assert rec.bitmaps["pc.ram"].bits[8]


def test_zero_run_completes_a_host_page():
    ram = GuestRAM.create(4 << 20, 2 << 20)
    ram.blocks[0].pages[:] = 9  # stale content
    rec = ReceivedPages(ram)
    asm = HostPageAssembler(ram, rec, "precopy")
    asm.add(run(ram, 0, range(0, 256), None))
    asm.add(run(ram, 0, range(256, HUGE), page_data(256, 7)))
    assert not ram.blocks[0].pages[:256].any()
    assert rec.bitmaps["pc.ram"].bits[:HUGE].all()


# --- demand paging ---

def test_fault_on_page_in_flight_sends_no_second_request():
    ram = GuestRAM.create(8 << 20, 2 << 20)
    rec = ReceivedPages(ram)
    sent = []
    fh = FaultHandler(ram, rec, lambda blk, start, length: sent.append((blk.idstr, start, length)))
    fh.enabled = True
    blk = ram.blocks[0]
    done = []

    def guest(pages):
        fh.ensure(blk, np.asarray(pages))
        done.append(pages)

    threads = [threading.Thread(target=guest, args=([HUGE + i],), name=f"vcpu{i}") for i in (1, 2, 3)]
    for t in threads:
        t.start()
    # Each fault is counted under the lock before its thread waits: three = all waiting.
    wait_until(lambda: fh.faults == 3, what="three guest threads to fault")
    t_waiting = time.monotonic()
    assert sent == [("pc.ram", 2 << 20, 2 << 20)]  # one request for the host page
    assert not done  # all blocked
    asm = HostPageAssembler(ram, rec, "precopy")
    t_place = time.monotonic()
    asm.add(run(ram, 0, range(HUGE, 2 * HUGE), page_data(HUGE, 8)))
    for t in threads:
        t.join(60)
    assert len(done) == 3
    m = fh.metrics()
    assert m["postcopy-requests"] == 1 and m["postcopy-latency"]["count"] == 1
    # Every thread was blocked at least from t_waiting until the page was placed.
    assert sorted(m["postcopy-vcpu-blocktime"]) == ["vcpu1", "vcpu2", "vcpu3"]
    assert m["postcopy-blocktime"] >= int(3 * (t_place - t_waiting) * 1000) - 1


def test_dirty_ranges_and_discard_commands():
    bits = np.zeros(100, dtype=bool)
    bits[3:5] = True
    bits[10] = True
    bits[97:] = True
    assert dirty_ranges(bits) == [(3, 2), (10, 1), (97, 3)]
    ranges = [(i * 8192, 4096) for i in range(30)]
    cmds = codec.encode_postcopy_discard("pc.ram", ranges)
    assert len(cmds) == 3  # at most 12 pairs per command
    got = []
    for c in cmds:
        name, pairs = codec.parse_postcopy_discard(c[5:])
        assert name == "pc.ram" and len(pairs) <= 12
        got += pairs
    assert got == ranges


# --- end to end, two processes ---

@pytest.mark.parametrize("page_size", [4096, 2 << 20])
def test_postcopy_migration_with_faulting_destination(page_size):
    guest = GuestConfig(size=128 << 20, page_size=page_size, fill="mixed",
                        workload=WorkloadConfig(dirty_rate=32 << 20),
                        dest_workload=WorkloadConfig(threads=2, pattern="random", dirty_rate=8 << 20))
    src, dst = run_local_migration("tcp:127.0.0.1:0", guest, caps={"postcopy-ram": True},
                                   params={"postcopy-after-percent": 10}, timeout=120)
    assert src["status"] == "completed", src.get("error-desc")
    assert dst["status"] == "completed", dst.get("error-desc")
    assert src["digests"] == dst["digests"]
    assert dst["postcopy-requests"] > 0
    lat = dst["postcopy-latency"]
    assert lat["count"] > 0 and lat["p50"] <= lat["p99"] <= lat["max"]
    assert sum(lat["histogram"]) == lat["count"]
    assert dst["postcopy-blocktime"] > 0
    assert src["postcopy-bytes"] > 0 and dst["guest-state"]["pages_written"] > 0


def test_postcopy_switch_by_passes_and_by_command(tmp_path):
    guest = GuestConfig(size=64 << 20, page_size=2 << 20, workload=WorkloadConfig(dirty_rate=64 << 20))
    src, dst = run_local_migration(f"unix:{tmp_path}/m.sock", guest, caps={"postcopy-ram": True},
                                   params={"postcopy-after-passes": 1}, timeout=120)
    assert src["status"] == dst["status"] == "completed"
    # pass 1, the sync that ends it (pass 2 would start: the switch instead), the sync at the switch
    assert src["ram"]["dirty-sync-count"] == 3
    # migrate-start-postcopy, in one process
    s_ram, d_ram = GuestRAM.create(32 << 20), GuestRAM.create(32 << 20)
    s_ram.fill("pattern")
    cfg = MigrationConfig()
    cfg.set_capabilities({"postcopy-ram": True})
    cfg.set_parameters({"max-bandwidth": 8 << 20})  # slow enough to switch mid-way
    d = MigrationDestination(d_ram, cfg)
    states = []
    s = MigrationSource(s_ram, None, cfg, on_event=lambda name, data: states.append(data.get("status")))
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    s.start(uri)
    # Mid-way: some pages are out (the first pass is far from done at 8 MiB/s).
    wait_until(lambda: s.status == "active" and s.query()["ram"]["transferred"] > 1 << 20,
               what="precopy to be under way")
    s.start_postcopy()
    assert s.wait(120) == "completed", s.stats.error
    assert d.wait(60) == "completed"
    q = s.query()
    assert q["digests"] == d.query()["digests"]
    assert [x for x in states if x] == ["setup", "active", "postcopy-active", "completed"]
    assert q["postcopy-bytes"] > 0


def test_start_postcopy_without_capability_is_refused():
    s = MigrationSource(GuestRAM.create(4 << 20))
    with pytest.raises(RuntimeError, match="postcopy-ram"):
        s.start_postcopy()


def test_advise_page_size_mismatch_refuses_postcopy_before_the_guest_moves():
    s_ram = GuestRAM.create(16 << 20, 2 << 20)
    d_ram = GuestRAM.create(16 << 20, 4096)
    s_ram.fill("pattern")
    before = s_ram.digests()
    cfg = MigrationConfig()
    cfg.set_capabilities({"postcopy-ram": True})
    d = MigrationDestination(d_ram, cfg)
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    s = MigrationSource(s_ram, None, cfg)
    s.start(uri)
    assert s.wait(30) == "failed"
    assert d.wait(10) == "failed"
    assert "POSTCOPY_ADVISE" in d.stats.error and "0x200000" in d.stats.error and "0x1000" in d.stats.error
    assert s_ram.digests() == before


# --- raw peers for bad input ---

def _raw_destination(events_until, reply):
    """Accept one source, read its stream until ``events_until`` says stop, then send ``reply``."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(2)
    result = {}

    def serve():
        conn, _ = lst.accept()
        ram = GuestRAM.create(16 << 20, 2 << 20)
        dec = codec.StreamDecoder(ram.infos(), devices=[codec.DeviceSpec("ferry-guest")])
        buf, pos = b"", 0
        try:
            while True:
                ev, n = dec.next_event(memoryview(buf)[pos:])
                if ev is codec.NEED_DATA:
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        break
                    buf, pos = buf[pos:] + chunk, 0  # a new buffer: events may still view the old one
                    continue
                pos += n
                if isinstance(ev, codec.Command) and ev.cmd == C.MIG_CMD_PING:
                    # As a real destination: PONG, which also admits the switch to postcopy.
                    conn.sendall(codec.encode_rp_pong(codec.parse_ping(ev.payload)))
                if events_until(ev):
                    conn.sendall(reply)
                    break
            conn.settimeout(60)
            while conn.recv(1 << 16):  # drain until the source gives up on us
                pass
            result["closed"] = True
        except socket.timeout:
            result["closed"] = False  # the source never closed the connection
        except OSError:
            result["closed"] = True  # reset by the source: closed too
        finally:
            conn.close()
            lst.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return f"tcp:127.0.0.1:{lst.getsockname()[1]}", t, result


def _is_package(ev):
    return isinstance(ev, codec.Command) and ev.cmd == C.MIG_CMD_PACKAGED


def _postcopy_source(uri):
    ram = GuestRAM.create(16 << 20, 2 << 20)
    ram.fill("pattern")
    cfg = MigrationConfig()
    cfg.set_capabilities({"postcopy-ram": True})
    cfg.set_parameters({"postcopy-after-percent": 1, "max-bandwidth": 4 << 20})
    s = MigrationSource(ram, None, cfg)
    s.start(uri)
    return s


@pytest.mark.parametrize("reply, words", [
    (codec.encode_rp(99, b"\0\0\0\0"), ["unknown message type 99"]),
    (codec.encode_rp(C.MIG_RP_MSG_SHUT, b"\0\0"), ["SHUT", "length 2", "expected 4"]),
    (codec.encode_rp_req_pages(0, 2 << 20, "nope"), ["unknown RAM block 'nope'"]),
    (codec.encode_rp_req_pages(4096, 2 << 20, "pc.ram"), ["0x1000", "not aligned"]),
    (codec.encode_rp_req_pages(0, 4096, "pc.ram"), ["length 0x1000", "host page size 0x200000"]),
    (codec.encode_rp_req_pages(16 << 20, 2 << 20, "pc.ram"), ["0x1000000", "outside"]),
    (codec.encode_rp_req_pages(0, 2 << 20, None), ["REQ_PAGES before any REQ_PAGES_ID"]),
    (codec.encode_rp_shut(0) + codec.encode_rp_req_pages(0, 2 << 20, "pc.ram"), ["after completion"]),
])
def test_return_path_garbage_after_the_switch_pauses_the_source_with_a_named_error(reply, words):
    """After the package with RUN left, bad input is a fault like any other: postcopy-paused,
    never failed, and the source's guest is never resumed."""
    uri, t, result = _raw_destination(_is_package, reply)
    s = _postcopy_source(uri)
    try:
        assert s.sm.wait_for(("postcopy-paused", "failed", "completed"), 30) == "postcopy-paused"
        for w in words:
            assert w in s.stats.error, s.stats.error
        assert all(new != "failed" for _, _, new in s.sm.history)
        t.join(90)
        assert not t.is_alive() and result["closed"] is True  # the paused source closed its connection
    finally:
        s.quit()
        s.wait(10)
    assert s.status == "postcopy-paused"


def test_request_outside_postcopy_is_rejected():
    uri, t, result = _raw_destination(lambda ev: isinstance(ev, codec.RamBlockList),
                                 codec.encode_rp_req_pages(0, 2 << 20, "pc.ram"))
    ram = GuestRAM.create(16 << 20, 2 << 20)
    cfg = MigrationConfig()
    cfg.set_parameters({"max-bandwidth": 4 << 20})
    s = MigrationSource(ram, None, cfg)
    s.start(uri)
    assert s.wait(30) == "failed"
    assert "while not in postcopy" in s.stats.error
    t.join(90)
    assert not t.is_alive() and result["closed"] is True


def test_connection_lost_after_run_pauses_and_guest_stays_blocked():
    """A raw source sends a stream up to RUN, with one page never sent, then vanishes."""
    d_ram = GuestRAM.create(8 << 20, 2 << 20)
    cfg = MigrationConfig()
    cfg.set_capabilities({"postcopy-ram": True, "page-checksums": False})  # a hand-made stream, as QEMU's
    d = MigrationDestination(d_ram, cfg)
    host, port = d.listen("tcp:127.0.0.1:0")[4:].rsplit(":", 1)
    d.start()
    sock = socket.create_connection((host, int(port)))
    out = bytearray(codec.encode_header() + codec.encode_open_return_path()
                    + codec.encode_postcopy_advise(2 << 20))
    out += codec.encode_section_start(C.QEMU_VM_SECTION_START, 0, "ram", 0, 4)
    out += codec.encode_ram_mem_size([("pc.ram", 8 << 20, 2 << 20)], postcopy=True)
    out += codec.encode_footer(0)
    for cmd in codec.encode_postcopy_discard("pc.ram", [(0, 8 << 20)]):
        out += cmd
    out += codec.encode_packaged(codec.encode_postcopy_listen() + codec.encode_postcopy_run())
    out += codec.encode_section_part(C.QEMU_VM_SECTION_PART, 0)
    for p in range(3 * HUGE):  # three of the four host pages
        out += codec.encode_page_header(p << 12, C.RAM_SAVE_FLAG_PAGE, "pc.ram" if p == 0 else None)
        out += bytes([1]) * 4096
    sock.sendall(out)
    wait_until(lambda: d.received.bitmaps["pc.ram"].bits[2 * HUGE], what="the third host page placed")
    blk = d_ram.blocks[0]
    reached = []
    guest = threading.Thread(target=lambda: (d.faults.ensure(blk, np.array([3 * HUGE + 5])),
                                             reached.append(1)), daemon=True)
    guest.start()
    wait_until(lambda: d.faults.faults >= 1, what="the guest thread to fault on the missing page")
    sock.close()  # the source is gone
    # After RUN a fault pauses: the guest is here and waits for a recovery, never "failed".
    assert d.sm.wait_for(("postcopy-paused", "failed"), 10) == "postcopy-paused"
    assert d.stats.error
    guest.join(1.0)
    assert guest.is_alive() and not reached  # it did not read a page that never arrived
    assert d.query()["status"] == "postcopy-paused"
    assert all(new != "failed" for _, _, new in d.sm.history)
    d.quit()
    assert d.wait(10) == "postcopy-paused"
    guest.join(0.5)
    assert guest.is_alive() and not reached  # still blocked: no page, no wake-up
