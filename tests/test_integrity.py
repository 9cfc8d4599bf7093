"""A page damaged in flight never reaches the guest (capability page-checksums).

Two real worker processes migrate over TCP loopback through a small relay
(threads, real sockets) that flips one byte of one page payload on a chosen
channel. The relay finds the payload with the stream decoder itself, so the
flipped byte is page data, never a header.

- precopy, main channel: the destination refuses the page before placing it
  (PageIntegrityError naming channel, block and offset), fails and sends SHUT 1;
  both sides end ``failed``, the destination never ``completed``, the source's
  guest keeps running. With page-checksums off on both sides the same flip is
  placed and the destination completes (only the source's digest check fails):
  the relay really damages the stream.
- postcopy with 2 MiB pages and preempt on, on the main channel and on the
  POSTCOPY channel: the damaged host page is never placed (received bitmap
  clear, memory without the damaged bytes) and the named error is raised.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import socket
import threading
import time
from dataclasses import asdict

import pytest

from ferry_migrate.channels import codec
from ferry_migrate.channels.codec import BlockInfo, DeviceSpec, StreamDecoder
from ferry_migrate.engine.local import GuestConfig
from ferry_migrate.engine.workload import WorkloadConfig

PAGE = 4096
TIMEOUT = 120


# --- a minimal relay that flips one payload byte ------------------------------------

class _Relay:
    """TCP relay 127.0.0.1:port -> the destination, one pair of pump threads per connection.

    Connections are relayed in the order they arrive (the destination tells
    channels apart by that order). On connection ``channel`` (0 = main, 1 =
    first POSTCOPY channel) the source-to-destination bytes are decoded until
    the page to damage is found: the ``skip``-th data page, counted from the
    PACKAGED command when ``after_package``. One byte of its payload is
    flipped; ``flipped`` = (block, page index, sha256 of the damaged page).
    """

    def __init__(self, upstream: str, blocks, channel: int, skip: int = 0, after_package: bool = False):
        host, port = upstream[4:].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.blocks, self.channel, self.skip, self.after_package = blocks, channel, skip, after_package
        self.flipped: tuple[str, int, str] | None = None
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self.srv.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        t = threading.Thread(target=self._accept, name="relay-accept", daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        n = 0
        while not self._closed:
            try:
                a, _ = self.srv.accept()
            except OSError:
                return
            b = socket.create_connection(self.upstream)
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks += [a, b]
            flip = n == self.channel
            for args in ((a, b, flip, "stream" if n == 0 else "pages"), (b, a, False, None)):
                t = threading.Thread(target=self._pump, args=args, daemon=True)
                t.start()
                self._threads.append(t)
            n += 1

    def _pump(self, src: socket.socket, dst: socket.socket, flip: bool, mode: str | None) -> None:
        try:
            if flip:
                self._pump_flipping(src, dst, mode)
            while chunk := src.recv(1 << 16):
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            # The far side is gone. Swallow what this side still sends instead of
            # resetting it, so the other direction (the destination's SHUT 1)
            # still gets through, as it would on a direct connection.
            try:
                while src.recv(1 << 16):
                    pass
            except OSError:
                pass

    def _pump_flipping(self, src, dst, mode: str) -> None:
        """Decode and forward until one payload byte is flipped; the caller copies the rest."""
        dec = StreamDecoder(self.blocks, mode=mode, devices=[DeviceSpec("ferry-guest", 1)])
        buf = bytearray()
        seen = 0
        armed = not self.after_package
        while True:
            mv = memoryview(buf)
            ev, n = dec.next_event(mv)
            if ev is codec.NEED_DATA:
                del mv
                chunk = src.recv(1 << 16)
                if not chunk:
                    dst.sendall(buf)
                    return
                buf += chunk
                continue
            if isinstance(ev, codec.Command) and ev.cmd == 7:  # PACKAGED: the switch to postcopy
                armed = True
            done = False
            if armed and isinstance(ev, codec.RamRun) and ev.data is not None:
                if seen + len(ev) > self.skip:
                    i = self.skip - seen
                    ev.data[i, 100] ^= 0xFF
                    self.flipped = (ev.block.idstr, int(ev.pages[i]), hashlib.sha256(ev.data[i].tobytes()).hexdigest())
                    done = True
                seen += len(ev)
            del ev, mv
            dst.sendall(buf[:n])
            del buf[:n]
            if done:
                dst.sendall(buf)
                return

    def close(self) -> None:
        self._closed = True
        self.srv.close()
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(5)


# --- worker processes ---------------------------------------------------------------

def _dest_child(conn, guest: dict, caps: dict, params: dict) -> None:
    from ferry_migrate.engine.destination import MigrationDestination
    from ferry_migrate.engine.params import MigrationConfig
    from ferry_migrate.engine.process import configure_worker_process
    from ferry_migrate.engine.workload import Workload

    configure_worker_process()
    try:
        dwl = guest.get("dest_workload")
        g = GuestConfig(**{**guest, "workload": None, "dest_workload": None})
        ram = g.make_ram()
        cfg = MigrationConfig()
        cfg.set_capabilities(caps)
        cfg.set_parameters(params)
        events = []
        workload = Workload(ram, WorkloadConfig(**dwl)) if dwl else None
        d = MigrationDestination(ram, cfg, on_event=lambda name, data: events.append(data.get("status")),
                                 workload=workload)
        conn.send(("listening", d.listen("tcp:127.0.0.1:0")))
        d.start()
        # A final state, or postcopy-paused (a fault after RUN waits for a recovery).
        d.sm.wait_for(("completed", "failed", "cancelled", "postcopy-paused"), TIMEOUT)
        conn.send(("done", {**d.query(), "events": events}))
        d.quit()
        # The parent asks about the damaged page: was it placed, what does memory hold there.
        if conn.poll(30):
            block, page = conn.recv()
            blk = ram.by_name[block]
            hp = blk.host_page_of(page)
            conn.send(("page", {"received": bool(d.received.bitmaps[block].bits[hp:hp + blk.tp_per_hp].any()),
                                "sha256": hashlib.sha256(blk.pages[page].tobytes()).hexdigest()}))
    except Exception as e:  # noqa: BLE001 - report to the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _source_child(conn, guest: dict, caps: dict, params: dict, uri: str) -> None:
    from ferry_migrate.engine.params import MigrationConfig
    from ferry_migrate.engine.process import configure_worker_process
    from ferry_migrate.engine.source import MigrationSource
    from ferry_migrate.engine.workload import Workload

    configure_worker_process()
    try:
        g = GuestConfig(**{**guest, "workload": None, "dest_workload": None})
        ram = g.make_ram()
        ram.fill(g.fill)
        cfg = MigrationConfig()
        cfg.set_capabilities(caps)
        cfg.set_parameters(params)
        workload = Workload(ram, WorkloadConfig(**guest["workload"]))
        workload.start()
        time.sleep(0.2)
        s = MigrationSource(ram, workload, cfg)
        s.start(uri)
        s.sm.wait_for(("completed", "failed", "cancelled", "postcopy-paused"), TIMEOUT)
        res = s.query()
        s.quit()
        # Does the guest still run here? Its progress counter must move.
        w0 = workload.pages_written
        time.sleep(0.5)
        res["guest-running"] = workload.running
        res["guest-progress"] = workload.pages_written - w0
        workload.stop()
        conn.send(("done", res))
    except Exception as e:  # noqa: BLE001
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _recv(conn, proc, what: str):
    if not conn.poll(TIMEOUT + 30):
        raise AssertionError(f"{what} did not report (exit code {proc.exitcode})")
    kind, val = conn.recv()
    if kind == "error":
        raise AssertionError(f"{what}: {val}")
    return val


def _migrate_through_relay(guest: GuestConfig, caps: dict, params: dict, channel: int, skip: int = 0,
                           after_package: bool = False):
    """Source -> relay (flipping one payload byte on ``channel``) -> destination, two processes.

    Returns (source query, destination query, relay.flipped, destination's view of the flipped page).
    """
    ctx = mp.get_context("spawn")
    gd = asdict(guest)
    dp, dc = ctx.Pipe()
    sp, sc = ctx.Pipe()
    dproc = ctx.Process(target=_dest_child, args=(dc, gd, caps, params), daemon=True)
    sproc = None
    relay = None
    try:
        dproc.start()
        kind, uri = dp.recv() if dp.poll(60) else ("timeout", None)
        assert kind == "listening", (kind, uri)
        blocks = [BlockInfo(0, "pc.ram", guest.size, guest.page_size)]
        relay = _Relay(uri, blocks, channel, skip, after_package)
        sproc = ctx.Process(target=_source_child, args=(sc, gd, caps, params, relay.uri), daemon=True)
        sproc.start()
        src = _recv(sp, sproc, "source")
        dst = _recv(dp, dproc, "destination")
        view = None
        if relay.flipped is not None:
            dp.send(relay.flipped[:2])
            view = _recv(dp, dproc, "destination")
        return src, dst, relay.flipped, view
    finally:
        if relay is not None:
            relay.close()
        for p in (sproc, dproc):
            if p is not None and p.pid is not None:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join(5)


# --- precopy -------------------------------------------------------------------------

def _precopy_guest():
    return GuestConfig(size=64 << 20, page_size=PAGE, fill="pattern",
                       workload=WorkloadConfig(threads=1, pattern="hotset", dirty_rate=16 << 20))


def test_precopy_flipped_payload_byte_fails_both_sides_and_the_source_guest_runs_on():
    src, dst, flipped, view = _migrate_through_relay(_precopy_guest(), {}, {}, channel=0, skip=300)
    assert flipped is not None, "the relay found no page to damage"
    block, page, damaged = flipped
    assert dst["status"] == "failed"
    assert "completed" not in dst["events"]
    assert (f"page integrity: channel precopy, block {block!r}, offset 0x{page * PAGE:x}" in dst["error-desc"]
            and "page not placed" in dst["error-desc"]), dst["error-desc"]
    assert view["sha256"] != damaged and not view["received"]  # never placed
    assert src["status"] == "failed"
    assert "destination reported failure (SHUT 1)" in src["error-desc"]
    assert src["guest-running"] and src["guest-progress"] > 0


def test_precopy_without_page_checksums_the_same_flip_is_placed():
    """The control: page-checksums off on both sides, the damaged page is placed and only digests
    catch it; the source's verdict then fails the destination too (its guest never ran)."""
    off = {"page-checksums": False}
    src, dst, flipped, view = _migrate_through_relay(_precopy_guest(), off, {}, channel=0, skip=300)
    assert flipped is not None
    assert dst["status"] == "failed" and "verdict is failed" in dst["error-desc"], dst.get("error-desc")
    assert view["received"]
    assert src["status"] == "failed" and "digest mismatch" in src["error-desc"]


# --- postcopy, 2 MiB pages, preempt on -----------------------------------------------------

PREEMPT = {"postcopy-ram": True, "postcopy-preempt": True}
SLOW = {"postcopy-after-percent": 5, "max-postcopy-bandwidth": 48 << 20}


def _huge_guest():
    return GuestConfig(size=64 << 20, page_size=2 << 20, fill="pattern",
                       workload=WorkloadConfig(dirty_rate=16 << 20),
                       dest_workload=WorkloadConfig(threads=2, pattern="random", dirty_rate=4 << 20, batch=1))


@pytest.mark.parametrize("channel,name", [(0, "precopy"), (1, "postcopy-1")])
def test_postcopy_damaged_page_is_never_placed(channel, name):
    src, dst, flipped, view = _migrate_through_relay(_huge_guest(), PREEMPT, SLOW, channel=channel,
                                                     after_package=channel == 0)
    assert flipped is not None, f"no page went over channel {name} after the switch"
    block, page, damaged = flipped
    assert "postcopy-active" in dst["events"] and "completed" not in dst["events"]
    # After RUN a damaged page is a fault like a broken link: both sides pause (a recovery sends
    # the page again: tests/test_fault_matrix.py), never failed, never completed.
    assert dst["status"] == "postcopy-paused" and "failed" not in dst["events"]
    err = dst["error-desc"]
    assert f"page integrity: channel {name}, block {block!r}, offset 0x{page * PAGE:x}" in err, err
    # The whole host page holding it was never placed: not received, and memory does not hold the damage.
    assert not view["received"]
    assert view["sha256"] != damaged
    assert src["status"] == "postcopy-paused"


def test_postcopy_without_page_checksums_the_damaged_page_is_placed():
    """The control for the POSTCOPY channel: with page-checksums off the same flip reaches guest RAM."""
    caps = {**PREEMPT, "page-checksums": False}
    src, dst, flipped, view = _migrate_through_relay(_huge_guest(), caps, SLOW, channel=1)
    assert flipped is not None
    assert "page integrity" not in (dst.get("error-desc") or "")
    assert view["received"]
    # Only the digests at the end catch it; past the point of no return that pauses the source.
    assert src["status"] == "postcopy-paused" and "digest mismatch" in src["error-desc"]


# --- file: streams that lost what verifies them ---------------------------------------------

def _saved_stream(tmp_path):
    from ferry_migrate.engine.ram import GuestRAM
    from ferry_migrate.engine.source import MigrationSource

    ram = GuestRAM.create(4 << 20, nblocks=1)
    ram.fill("mixed")
    path = tmp_path / "guest.mig"
    s = MigrationSource(ram)
    s.start(f"file:{path}")
    assert s.wait(60) == "completed", s.query().get("error-desc")
    return path, path.read_bytes(), ram


def _spans(data: bytes, infos):
    """(start, end, event) of every decoded event of a saved stream."""
    dec = StreamDecoder(infos, devices=[DeviceSpec("ferry-guest", 1)])
    pos, out = 0, []
    while pos < len(data):
        ev, n = dec.next_event(memoryview(data)[pos:])
        assert ev is not codec.NEED_DATA
        out.append((pos, pos + n, ev if not isinstance(ev, codec.RamRun) else None))
        pos += n
    return out


def _load(path, page_checksums: bool = True):
    from ferry_migrate.engine.destination import MigrationDestination
    from ferry_migrate.engine.params import MigrationConfig
    from ferry_migrate.engine.ram import GuestRAM

    ram = GuestRAM.create(4 << 20, nblocks=1)
    cfg = MigrationConfig()
    cfg.set_capabilities({"page-checksums": page_checksums})
    d = MigrationDestination(ram, cfg)
    d.listen(f"file:{path}")
    d.start()
    d.wait(60)
    q = d.query()
    ram.close()
    return q


def test_file_stream_stripped_of_its_page_checks_does_not_load(tmp_path):
    path, data, ram = _saved_stream(tmp_path)
    try:
        spans = _spans(data, ram.infos())
        cut = [(a, b) for a, b, ev in spans if isinstance(ev, codec.PageChecks)]
        assert cut, "the saved stream carries no FERRY_PAGE_CHECKS records"
        keep, at = bytearray(), 0
        for a, b in cut:
            keep += data[at:a]
            at = b
        keep += data[at:]
        path.write_bytes(bytes(keep))
        q = _load(path)
        assert q["status"] == "failed"
        assert "is not covered by a FERRY_PAGE_CHECKS record" in q["error-desc"]
        # Loaded as QEMU's stream (page-checksums off), the same bytes are fine: only the requirement differs.
        assert _load(path, page_checksums=False)["status"] == "completed"
    finally:
        ram.close()


def test_file_stream_without_its_guest_section_or_digests_does_not_load(tmp_path):
    import json

    path, data, ram = _saved_stream(tmp_path)
    try:
        spans = _spans(data, ram.infos())
        i = next(k for k, (_, _, ev) in enumerate(spans)
                 if isinstance(ev, codec.SectionStart) and ev.idstr == "ferry-guest")
        start, (_, _, dev), (_, end, foot) = spans[i][0], spans[i + 1], spans[i + 2]
        assert isinstance(dev, codec.DeviceState) and isinstance(foot, codec.SectionFooter)
        # Dropped whole.
        path.write_bytes(data[:start] + data[end:])
        q = _load(path)
        assert q["status"] == "failed"
        assert "stream ended without the 'ferry-guest' section" in q["error-desc"]
        # Kept, but without its digests.
        state = json.loads(dev.payload)
        del state["digests"]
        section = codec.encode_device_full(foot.section_id, "ferry-guest", 1, json.dumps(state).encode())
        path.write_bytes(data[:start] + section + data[end:])
        q = _load(path)
        assert q["status"] == "failed"
        assert "carries no digests and the stream has no return path" in q["error-desc"]
    finally:
        ram.close()


def test_check_values_present_are_checked_even_when_not_required(tmp_path):
    """A destination with page-checksums off (QEMU's streams accepted) still checks the values a stream carries."""
    path, data, ram = _saved_stream(tmp_path)
    try:
        bad = bytearray(data)
        at = bad.find(ram.blocks[0].pages[9].tobytes())
        assert at > 0
        bad[at + 7] ^= 0x40
        path.write_bytes(bytes(bad))
        q = _load(path, page_checksums=False)
        assert q["status"] == "failed"
        assert "page integrity: channel precopy, block 'pc.ram', offset 0x9000" in q["error-desc"]
    finally:
        ram.close()


def test_without_page_checksums_the_stream_is_qemus(tmp_path):
    """page-checksums off on the source: not one FERRY_PAGE_CHECKS record, every flag within QEMU's range."""
    from ferry_migrate.engine.params import MigrationConfig
    from ferry_migrate.engine.ram import GuestRAM
    from ferry_migrate.engine.source import MigrationSource

    ram = GuestRAM.create(4 << 20, nblocks=1)
    ram.fill("mixed")
    try:
        cfg = MigrationConfig()
        cfg.set_capabilities({"page-checksums": False})
        path = tmp_path / "qemu.mig"
        s = MigrationSource(ram, None, cfg)
        s.start(f"file:{path}")
        assert s.wait(60) == "completed"
        spans = _spans(path.read_bytes(), ram.infos())
        assert not [ev for _, _, ev in spans if isinstance(ev, codec.PageChecks)]
        assert sum(1 for _, _, ev in spans if ev is None) > 0  # page runs were there
    finally:
        ram.close()
