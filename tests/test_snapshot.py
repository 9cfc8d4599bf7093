"""Saved VMs as guests (`ferry snapshot load|save`) with a real QEMU on the other end.

QEMU save -> Ferry load -> QEMU destination in postcopy-preempt, with a page the QEMU
destination requests answered from the file; QEMU live migration -> `ferry snapshot
save` (indexed image) -> `ferry snapshot load` -> QEMU destination. Skipped, saying why,
without QEMU.
"""
import json
import os
import subprocess
import sys
import threading

import pytest

from ferry_migrate.engine.ram import GuestRAM
from ferry_migrate.engine.snapshot import SnapshotError, load_image, write_image
from ferry_migrate.engine.snapshot_cli import run_load, run_save
from ferry_migrate.channels.devices import GuestDevices

from .qemu_vm import LOAD_ADDR, LOAD_SIZE, assert_reads_known_page, free_port, known_bytes, vms  # noqa: F401

pytestmark = pytest.mark.timeout(240)
KNOWN = known_bytes()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def listening_qemu(vms, caps):
    port = free_port()
    b = vms("dst", incoming="defer")
    if caps:
        b.caps(**caps)
    b.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    return b, f"tcp:127.0.0.1:{port}"


def test_image_round_trip_keeps_pages_and_devices(tmp_path):
    ram = GuestRAM.create(8 << 20)
    ram.fill("mixed")
    dev = GuestDevices(configuration=b"\x07\x00\x00\x00\x02pc", device_bytes=b"\x04abc", vmdesc_raw=b"{}",
                       ram_section_id=2, sections=["x"])
    path = str(tmp_path / "g.img")
    write_image(path, ram, dev)
    assert os.stat(path).st_blocks * 512 < 8 << 20  # zero pages are holes
    ram2, dev2, info = load_image(path)
    assert info["kind"] == "image"
    assert bytes(ram2.blocks[0].view) == bytes(ram.blocks[0].view)
    assert dev2 == dev


def test_bad_image_named(tmp_path):
    p = tmp_path / "bad.img"
    p.write_bytes(b"FERRYIMG" + b"\x00\x00\x00\x09" + b"\x00\x00\x00\x00")
    with pytest.raises(SnapshotError, match="image version 9, expected 1"):
        load_image(str(p))


def test_saved_stream_loaded_into_qemu_postcopy_preempt(vms, tmp_path):
    path = tmp_path / "saved.qemu"
    a = vms("saved", load=KNOWN)
    a.cmd("migrate", uri=f"exec:cat > {path}")
    a.wait_migration()
    b, uri = listening_qemu(vms, {"postcopy-ram": True, "postcopy-preempt": True})
    result = {}
    t = threading.Thread(target=lambda: result.update(run_load(
        str(path), uri, "postcopy-preempt", switch_at=1,
        params={"max-bandwidth": 8 << 20, "max-postcopy-bandwidth": 1 << 20})))
    t.start()
    b.wait_migration(want=("postcopy-active", "completed"))
    assert_reads_known_page(b, KNOWN)
    t.join(120)
    assert result["status"] == "completed", result.get("error")
    assert result["file-kind"] == "stream" and result["postcopy-requests"] >= 1
    assert result["query-migrate"]["channels"]["postcopy-1"]["normal"] >= 1
    b.wait_migration()
    assert b.read_memory(LOAD_ADDR, LOAD_SIZE) == KNOWN


def test_snapshot_save_then_load_cli(vms, tmp_path):
    """A live QEMU migration saved as an indexed image by `ferry snapshot save`, loaded back by the CLI."""
    img = str(tmp_path / "g.img")
    a = vms("src", load=KNOWN)
    a.caps(**{"return-path": True})
    got = {}
    ready = threading.Event()

    def save():
        got.update(run_save("tcp:127.0.0.1:0", img, on_listening=lambda u: (got.update(uri=u), ready.set())))

    t = threading.Thread(target=save)
    t.start()
    assert ready.wait(30)
    a.cmd("migrate", uri=got["uri"])
    t.join(120)
    assert got["status"] == "completed", got.get("error")
    assert got["device-sections"] > 10
    b, uri = listening_qemu(vms, {})
    r = subprocess.run([sys.executable, "-m", "ferry_migrate.engine.cli", "snapshot", "load", img, "--to", uri,
                        "--mode", "precopy", "--json"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    assert res["status"] == "completed" and res["file-kind"] == "image" and res["completion"] == "shut"
    b.wait_migration()
    assert b.read_memory(LOAD_ADDR, LOAD_SIZE) == KNOWN
    assert b.read_memory(1 << 20, (64 << 20) - (1 << 20)) == a.read_memory(1 << 20, (64 << 20) - (1 << 20))
