"""Round trips with a real QEMU (7.2 as Debian ships it) on the other end.

QEMU source -> Ferry destination and Ferry source -> QEMU destination, each in
precopy, postcopy and postcopy-preempt, with small paused TCG guests holding
a few MiB of known random bytes. RAM is compared with the known bytes and with
QEMU's own view of guest memory (pmemsave). In postcopy a page is requested
while it is still missing: by the Ferry destination (its fault handler), or by
the QEMU destination (HMP ``xp`` reads guest memory).
Skipped, saying why, when QEMU is not installed.
"""
import threading
import time

import numpy as np
import pytest

from ferry_migrate.engine.destination import MigrationDestination
from ferry_migrate.engine.params import MigrationConfig
from ferry_migrate.engine.source import MigrationSource

from .qemu_vm import (LAST_KNOWN_PAGE, LOAD_ADDR, LOAD_SIZE, assert_reads_known_page, free_port,  # noqa: F401
                      known_bytes, vms)

pytestmark = pytest.mark.timeout(240)

BIOS_ADDR, BIOS_SIZE = 0xFFFC0000, 256 << 10  # pc.bios mapped below 4 GiB
LOW = 1 << 20  # below 1 MiB guest-physical reads see ROM/VGA windows, not pc.ram
MODES = {
    "precopy": {},
    "postcopy": {"postcopy-ram": True},
    "postcopy-preempt": {"postcopy-ram": True, "postcopy-preempt": True},
}
KNOWN = known_bytes()


def config(caps=None, params=None) -> MigrationConfig:
    cfg = MigrationConfig()
    cfg.set_capabilities(caps or {})
    cfg.set_parameters({"peer": "qemu", **(params or {})})
    return cfg


def wait_status(getter, want, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        s = getter()
        if s in want:
            return s
        if s == "failed" or time.monotonic() > deadline:
            raise AssertionError(f"status {s}, waiting for {want}")
        time.sleep(0.02)


def check_ram_equals_qemu(ram, vm):
    """Ferry's pc.ram and pc.bios equal what QEMU's guest memory holds."""
    pc = ram.by_name["pc.ram"]
    assert bytes(pc.view[LOAD_ADDR:LOAD_ADDR + LOAD_SIZE]) == KNOWN
    assert vm.read_memory(LOW, pc.length - LOW) == bytes(pc.view[LOW:])
    assert vm.read_memory(BIOS_ADDR, BIOS_SIZE) == bytes(ram.by_name["pc.bios"].view)


# ---------------------------------------------------------------------------
# QEMU source -> Ferry destination
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(MODES))
def test_qemu_source_to_ferry_destination(vms, mode):
    caps = MODES[mode]
    d = MigrationDestination(None, config(caps))  # no fixed guest: takes QEMU's RAM layout
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    src = vms("src", load=KNOWN)
    src.caps(**{"return-path": True, **caps})
    if caps:
        # Slow enough that pages are still missing when the destination asks for one.
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 20, "max-postcopy-bandwidth": 1 << 20})
    src.cmd("migrate", uri=uri)
    if caps:
        src.cmd("migrate-start-postcopy")
        wait_status(lambda: d.status, ("postcopy-active", "completed"))
        blk = d.ram.by_name["pc.ram"]
        page = np.array([LAST_KNOWN_PAGE >> 12])
        # Background pages go out at 1 MiB/s: the last known page is still missing.
        assert d.status == "postcopy-active" and not d.received.bitmaps["pc.ram"].bits[page[0]]
        t = threading.Thread(target=d.faults.ensure, args=(blk, page))
        t.start()
        t.join(60)
        assert not t.is_alive()
        assert d.query()["postcopy-requests"] >= 1
    assert d.wait(120) == "completed", d.query().get("error-desc")
    q = src.wait_migration()
    assert q["status"] == "completed"
    dq = d.query()
    assert [b["idstr"] for b in dq["ram-layout"]][:1] == ["pc.ram"] and len(dq["ram-layout"]) >= 5
    assert dq["machine-type"].startswith("pc-i440fx")
    if mode == "precopy":
        assert "timer" in d.devices.sections and "cpu_common" in d.devices.sections
    else:
        assert len(d.devices.device_bytes) > 0 and d.devices.vmdesc_raw is None
    if mode == "postcopy-preempt":
        assert dq["channels"]["postcopy-1"]["pages-placed"] >= 1  # the request came on the POSTCOPY channel
    check_ram_equals_qemu(d.ram, src)


def test_qemu_source_needs_no_peer_setting(vms):
    """A destination left at peer=ferry still completes with a QEMU source: no ferry-guest came, no digests go."""
    d = MigrationDestination(None)
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    src = vms("src", load=KNOWN)
    src.caps(**{"return-path": True})
    src.cmd("migrate", uri=uri)
    assert d.wait(120) == "completed", d.query().get("error-desc")
    assert src.wait_migration()["status"] == "completed"
    assert "digests" not in d.query() or not d.query()["digests"]


def test_qemu_destination_layout_over_limits_refused(vms):
    """A destination without a fixed guest refuses a layout over its limits, by name."""
    from ferry_migrate.engine.layout import LayoutLimits

    d = MigrationDestination(None, config(), layout=LayoutLimits(max_total=32 << 20))
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    src = vms("src", load=KNOWN)
    src.cmd("migrate", uri=uri)
    assert d.wait(60) == "failed"
    assert "accepts at most 32 MiB" in d.query()["error-desc"]
    assert d.ram is None  # no partial guest
    src.wait_migration(want=("failed",))


def test_machine_type_not_allowed_refused(vms):
    from ferry_migrate.engine.layout import LayoutLimits

    d = MigrationDestination(None, config(), layout=LayoutLimits(machine_types=("pc-q35-7.2",)))
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    src = vms("src", load=KNOWN)
    src.cmd("migrate", uri=uri)
    assert d.wait(60) == "failed"
    assert "machine type 'pc-i440fx-7.2' not allowed here (allowed: pc-q35-7.2)" in d.query()["error-desc"]
    assert d.ram is None
    src.wait_migration(want=("failed",))


# ---------------------------------------------------------------------------
# Ferry source -> QEMU destination (the guest: a QEMU-saved stream)
# ---------------------------------------------------------------------------

@pytest.fixture
def saved_guest(vms, tmp_path):
    """A QEMU guest saved to a file by QEMU itself, loaded into Ferry (RAM + device bytes)."""
    path = tmp_path / "saved.qemu"
    a = vms("saved", load=KNOWN)
    a.cmd("migrate", uri=f"exec:cat > {path}")
    a.wait_migration()
    d = MigrationDestination(None, config())
    d.listen(f"file:{path}")
    d.start()
    assert d.wait(60) == "completed", d.query().get("error-desc")
    return d.ram, d.devices, a


@pytest.mark.parametrize("mode", list(MODES))
def test_ferry_source_to_qemu_destination(vms, saved_guest, mode):
    ram, devices, original = saved_guest
    caps = MODES[mode]
    port = free_port()
    b = vms("dst", incoming="defer")
    if caps:
        b.caps(**caps)
    b.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    params = {}
    if caps:
        # Switch before the known bytes went out; they follow at 1 MiB/s, so the page read
        # below is still missing when QEMU asks for it.
        params = {"max-bandwidth": 8 << 20, "max-postcopy-bandwidth": 1 << 20, "postcopy-after-percent": 1}
    s = MigrationSource(ram, None, config(caps, params), devices=devices)
    s.start(f"tcp:127.0.0.1:{port}")
    if caps:
        b.wait_migration(want=("postcopy-active", "completed"))
        # QEMU's monitor reads guest memory: the page is requested over the return path.
        assert_reads_known_page(b, KNOWN)
    assert s.wait(120) == "completed", s.query().get("error-desc")
    b.wait_migration()
    sq = s.query()
    assert sq["completion"] == "shut"
    if caps:
        assert sq["postcopy-requests"] >= 1
        if mode == "postcopy-preempt":
            assert sq["channels"]["postcopy-1"]["normal"] >= 1
    check_ram_equals_qemu(ram, b)
    assert b.cmd("query-status")["status"] in ("paused", "prelaunch", "postmigrate", "running")


def test_dump_stream_reads_a_qemu_saved_stream(vms, tmp_path):
    """tools/dump_stream.py lists QEMU's device sections, sized by the vmdesc, bytes untouched."""
    import json as _json
    import os
    import subprocess
    import sys

    path = tmp_path / "saved.qemu"
    a = vms("saved", load=KNOWN)
    a.cmd("migrate", uri=f"exec:cat > {path}")
    a.wait_migration()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "tools", "dump_stream.py"), "--json", str(path)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 0, r.stderr
    out = _json.loads(r.stdout)
    secs = [it for it in out["items"] if it["kind"] == "section" and it.get("type") == "FULL"]
    assert "timer" in [s["idstr"] for s in secs] and all(s["size"] is not None for s in secs)
    assert out["items"][-1]["kind"] == "vmdesc"
    # Truncated inside the vmdesc: a named error, not a guess.
    cut = tmp_path / "cut.qemu"
    cut.write_bytes(path.read_bytes()[:-10])
    r = subprocess.run([sys.executable, os.path.join(root, "tools", "dump_stream.py"), str(cut)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root})
    assert r.returncode != 0 and "without a VM description" in r.stderr


def test_truncated_vmdesc_no_guest_loaded(vms, tmp_path):
    """A QEMU file cut inside its vmdesc: the load fails by name, no guest is reported loaded."""
    path = tmp_path / "saved.qemu"
    a = vms("saved", load=KNOWN)
    a.cmd("migrate", uri=f"exec:cat > {path}")
    a.wait_migration()
    cut = tmp_path / "cut.qemu"
    cut.write_bytes(path.read_bytes()[:-100])
    d = MigrationDestination(None, config())
    d.listen(f"file:{cut}")
    d.start()
    assert d.wait(60) == "failed"
    err = d.query()["error-desc"]
    assert "device state" in err and "'timer'" in err and "without a VM description" in err


def test_destination_worker_takes_qemu_layout(vms, tmp_path):
    """`ferry worker --role destination --ram-layout source` receives a QEMU guest over the control plane."""
    import json as _json
    import subprocess
    import sys

    from ferry_migrate.engine.control.spawn import spawn_worker

    from .conftest import group_gone

    ctl = f"ipc://{tmp_path}/dst.ctl"
    w = spawn_worker("destination", ctl, ["--ram-layout", "source", "--max-ram", "128M", "--max-blocks", "16",
                                          "--workload-threads", "0"],
                     log_path=str(tmp_path / "dst.log"), new_session=True)
    try:
        w.wait_ready(30)

        def call(verb, args=None):
            r = subprocess.run([sys.executable, "-m", "ferry_migrate.engine.cli", "call", ctl, verb, _json.dumps(args or {}),
                                "--json"], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
            out = _json.loads(r.stdout)
            return out["return"] if isinstance(out, dict) and "return" in out else out

        call("migrate-set-parameters", {"peer": "qemu"})
        shape = call("query-status")["guest"]
        assert shape["blocks"] == [] and shape["layout"]["max-blocks"] == 16
        uri = call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})["uri"]
        src = vms("src", load=KNOWN)
        src.caps(**{"return-path": True})
        src.cmd("migrate", uri=uri)
        src.wait_migration()
        deadline = time.monotonic() + 60
        while (q := call("query-migrate"))["status"] != "completed":
            assert q["status"] != "failed" and time.monotonic() < deadline, q
            time.sleep(0.1)
        shape = call("query-status")["guest"]
        assert [b["idstr"] for b in shape["blocks"]][0] == "pc.ram" and shape["size"] > 64 << 20
    finally:
        w.kill()
        assert group_gone(w.pid)
