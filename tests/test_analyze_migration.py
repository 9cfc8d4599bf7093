"""Ferry ``file:`` streams read by QEMU's own scripts/analyze-migration.py (QEMU 7.2).

Its ``-d state``, ``-d desc`` and ``-x`` modes, on a stream of Ferry's own guest
and on a QEMU guest (saved by QEMU, loaded into Ferry, saved again by Ferry with
its device state carried verbatim). The latter file is also loaded by QEMU.
The script is LGPL and not in this repository: tools/get_analyze_migration.sh
fetches it; tests skip, saying so, when it is absent.
"""
import json
import os
import subprocess
import sys

import pytest

from ferry_migrate.engine.destination import MigrationDestination
from ferry_migrate.engine.params import MigrationConfig
from ferry_migrate.engine.ram import GuestRAM
from ferry_migrate.engine.source import MigrationSource

from .qemu_vm import LOAD_ADDR, LOAD_SIZE, QemuVM, known_bytes, require_qemu

SCRIPT = os.environ.get("QEMU_ANALYZE_MIGRATION", os.path.expanduser("~/.cache/ferry/analyze-migration.py"))


def analyze(path, *args, cwd=None) -> str:
    if not os.path.exists(SCRIPT):
        pytest.skip(f"QEMU's analyze-migration.py not found at {SCRIPT}: run tools/get_analyze_migration.sh "
                    "(or set QEMU_ANALYZE_MIGRATION)")
    r = subprocess.run([sys.executable, SCRIPT, "-f", str(path), *args], capture_output=True, text=True,
                       cwd=cwd, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def save(ram, path, peer="ferry", devices=None):
    cfg = MigrationConfig()
    cfg.set_parameters({"peer": peer})
    # QEMU's tools do not know Ferry's page check records (docs/interop.md).
    cfg.set_capabilities({"page-checksums": False})
    s = MigrationSource(ram, None, cfg, devices=devices)
    s.start(f"file:{path}")
    assert s.wait(60) == "completed", s.query().get("error-desc")


def test_ferry_guest_stream(tmp_path):
    ram = GuestRAM.create(8 << 20)
    ram.fill("mixed")
    path = tmp_path / "ferry.stream"
    save(ram, path)
    state = json.loads(analyze(path, "-d", "state"))
    assert state["ram (1)"]["section sizes"] == {"pc.ram": "0x0000000000800000"}
    guest = state["ferry-guest (2)"]
    payload = bytes.fromhex(guest["state"].replace(" ", ""))
    assert int(guest["length"], 16) == len(payload) and "digests" in json.loads(payload)
    desc = json.loads(analyze(path, "-d", "desc"))
    assert [d["name"] for d in desc["devices"]] == ["ferry-guest"]
    out = tmp_path / "x"
    out.mkdir()
    analyze(path, "-x", cwd=out)
    assert (out / "pc.ram").read_bytes() == bytes(ram.blocks[0].view)


def test_qemu_guest_saved_by_ferry(tmp_path):
    require_qemu()
    known = known_bytes()
    qemu_file = tmp_path / "saved.qemu"
    a = QemuVM(str(tmp_path), "saved", load=known)
    try:
        a.cmd("migrate", uri=f"exec:cat > {qemu_file}")
        a.wait_migration()
    finally:
        a.close()
    d = MigrationDestination(None)
    d.listen(f"file:{qemu_file}")
    d.start()
    assert d.wait(60) == "completed", d.query().get("error-desc")
    path = tmp_path / "ferry.stream"
    save(d.ram, path, peer="qemu", devices=d.devices)
    state = json.loads(analyze(path, "-d", "state"))
    names = [k.split(" (")[0] for k in state]
    assert names[0] == "ram" and "timer" in names and "cpu_common" in names
    assert json.loads(analyze(path, "-d", "desc"))["devices"] == json.loads(d.devices.vmdesc_raw)["devices"]
    out = tmp_path / "x"
    out.mkdir()
    analyze(path, "-x", cwd=out)
    assert (out / "pc.ram").read_bytes()[LOAD_ADDR:LOAD_ADDR + LOAD_SIZE] == known
    assert (out / "pc.bios").read_bytes() == bytes(d.ram.by_name["pc.bios"].view)
    # And QEMU loads Ferry's file.
    b = QemuVM(str(tmp_path), "load", incoming=f"exec:cat {path}")
    try:
        b.wait_migration()
        assert b.read_memory(LOAD_ADDR, LOAD_SIZE) == known
    finally:
        b.close()
