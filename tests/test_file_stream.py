"""Migration to and from a ``file:`` stream (a saved guest).

A MigrationSource writes the stream to a file: it starts with the QEVM header
(magic 0x5145564d, version 3) and ends with EOF (0x00), then 0x06, a be32
length and the JSON VM description. A MigrationDestination listening on the
same ``file:`` URI loads it back, completes, and its digests equal the
source's. A corrupted or truncated file fails the load.
"""
from __future__ import annotations

import json
import struct

import pytest

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels.codec import DeviceSpec, StreamDecoder
from ferry_migrate.engine.destination import MigrationDestination
from ferry_migrate.engine.params import MigrationConfig
from ferry_migrate.engine.ram import GuestRAM
from ferry_migrate.engine.source import GUEST_DEVICE, GUEST_DEVICE_VERSION, MigrationSource
from ferry_migrate.engine.workload import Workload, WorkloadConfig


def _config(page_checksums: bool) -> MigrationConfig:
    cfg = MigrationConfig()
    cfg.set_capabilities({"page-checksums": page_checksums})
    return cfg


def save(path, size=16 << 20, page_size=4096, nblocks=2, fill="mixed", workload=False, page_checksums=True):
    """Migrate a fresh guest to file:path; returns (source query, source RAM digests after, ram)."""
    ram = GuestRAM.create(size, page_size, nblocks=nblocks)
    ram.fill(fill)
    wl = None
    if workload:
        wl = Workload(ram, WorkloadConfig(dirty_rate=16 << 20))
        wl.start()
    s = MigrationSource(ram, wl, _config(page_checksums))
    s.start(f"file:{path}")
    assert s.wait(60) == "completed", s.query().get("error-desc")
    return s.query(), ram


def load(path, size=16 << 20, page_size=4096, nblocks=2, page_checksums=True):
    ram = GuestRAM.create(size, page_size, nblocks=nblocks)
    d = MigrationDestination(ram, _config(page_checksums))
    assert d.listen(f"file:{path}") == f"file:{path}"
    d.start()
    d.wait(60)
    return d, ram


def decode_with_offsets(data: bytes, blocks):
    """[(offset, event)] for the whole file, non-page events only."""
    dec = StreamDecoder(blocks, devices=[DeviceSpec(GUEST_DEVICE, GUEST_DEVICE_VERSION)])
    pos, out = 0, []
    while pos < len(data):
        ev, n = dec.next_event(memoryview(data)[pos:])
        assert ev is not codec.NEED_DATA, f"file ends inside {dec.expecting()} at {pos}"
        if not isinstance(ev, codec.RamRun):
            out.append((pos, ev))
        pos += n
    assert dec.at_boundary()
    return out


@pytest.mark.parametrize("page_size,workload", [(4096, False), (4096, True), (2 << 20, True)])
def test_file_round_trip(tmp_path, page_size, workload):
    path = tmp_path / "guest.mig"
    sq, src = save(path, page_size=page_size, workload=workload)
    try:
        data = path.read_bytes()
        # Header.
        assert struct.unpack(">II", data[:8]) == (0x5145564D, 3)
        # The stream ends with EOF, then VMDESCRIPTION: 0x06, be32 length, JSON.
        events = decode_with_offsets(data, src.infos())
        (eof_at, eof), (desc_at, desc) = events[-2], events[-1]
        assert isinstance(eof, codec.EndOfStream) and isinstance(desc, codec.VMDescription)
        assert data[eof_at] == C.QEMU_VM_EOF and desc_at == eof_at + 1
        assert data[desc_at] == 0x06
        (n,) = struct.unpack(">I", data[desc_at + 1:desc_at + 5])
        assert desc_at + 5 + n == len(data)
        vmdesc = json.loads(data[desc_at + 5:])
        assert vmdesc == desc.json
        assert vmdesc["page_size"] == 4096
        assert isinstance(vmdesc["devices"], list)
        assert [d["name"] for d in vmdesc["devices"]] == [GUEST_DEVICE]
        # No return path on a file.
        cmds = [ev for _, ev in events if isinstance(ev, codec.Command)]
        assert all(c.cmd != C.MIG_CMD_OPEN_RETURN_PATH for c in cmds)

        assert sq["digests"] == {n: d.hex() for n, d in src.digests().items()}  # guest stopped at the end
        d, dst = load(path, page_size=page_size)
        try:
            q = d.query()
            assert q["status"] == "completed", q.get("error-desc")
            assert q["digests"] == sq["digests"]
            assert dst.digests() == src.digests()
            assert d.vmdesc == vmdesc
            assert set(d.guest_state["digests"]) == {b.idstr for b in src.blocks}
            assert q["ram"]["normal"] == sq["ram"]["normal"]
            assert q["ram"]["duplicate"] == sq["ram"]["duplicate"]
            assert q["ram"]["transferred"] == len(data) == sq["ram"]["transferred"]
        finally:
            dst.close()
    finally:
        src.close()


@pytest.mark.parametrize("page_checksums,error", [
    (True, "page integrity: channel precopy, block 'pc.ram', offset 0x5000"),
    (False, "digest mismatch after load: blocks ['pc.ram']"),
])
def test_corrupted_file_fails_the_load(tmp_path, page_checksums, error):
    """With page-checksums the damaged page is refused before it is placed; without, the digests catch it."""
    path = tmp_path / "guest.mig"
    _, src = save(path, size=4 << 20, nblocks=1, fill="pattern", page_checksums=page_checksums)
    try:
        data = bytearray(path.read_bytes())
        at = data.find(src.blocks[0].pages[5].tobytes())
        assert at > 0
        data[at + 100] ^= 0x01  # one bit of page 5's data
        path.write_bytes(bytes(data))
        d, dst = load(path, size=4 << 20, nblocks=1, page_checksums=page_checksums)
        try:
            q = d.query()
            assert q["status"] == "failed"
            assert error in q["error-desc"]
            if page_checksums:
                assert not dst.blocks[0].pages[5].any()  # never placed
        finally:
            dst.close()
    finally:
        src.close()


def test_truncated_file_fails_the_load(tmp_path):
    path = tmp_path / "guest.mig"
    _, src = save(path, size=4 << 20, nblocks=1)
    src.close()
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    d, dst = load(path, size=4 << 20, nblocks=1)
    try:
        q = d.query()
        assert q["status"] == "failed"
        assert "truncated stream" in q["error-desc"]
    finally:
        dst.close()


def test_missing_file_fails_the_load(tmp_path):
    d, dst = load(tmp_path / "nothing.mig", size=4 << 20, nblocks=1)
    try:
        assert d.status == "failed"
        assert "nothing.mig" in d.query()["error-desc"]
    finally:
        dst.close()
