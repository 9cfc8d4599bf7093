"""Migrations with a real QEMU 7.2 over TLS, both directions: QEMU's tls-creds-x509 with
verify-peer=on on its side, Ferry's tls-creds (the same directory, made by `ferry certs`) on
ours. With a QEMU peer there is no channel hello: QEMU's rule (arrival order) under TLS.
Skipped, saying why, when QEMU is not installed."""
import numpy as np
import pytest

from ferry_migrate.channels.tls import TLSTransport
from ferry_migrate.engine.certs import make_certs
from ferry_migrate.engine.destination import MigrationDestination
from ferry_migrate.engine.source import MigrationSource

from .qemu_vm import LAST_KNOWN_PAGE, assert_reads_known_page, free_port, vms  # noqa: F401
from .test_qemu_interop import KNOWN, MODES, check_ram_equals_qemu, config, saved_guest, wait_status  # noqa: F401

pytestmark = pytest.mark.timeout(240)
TLS_MODES = ("precopy", "postcopy-preempt")


@pytest.fixture
def creds(tmp_path):
    d = tmp_path / "tls"
    make_certs(str(d))
    return str(d)


def _qemu_tls(vm, creds, endpoint):
    vm.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": creds, "endpoint": endpoint,
                            "verify-peer": True})
    vm.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})


@pytest.mark.parametrize("mode", TLS_MODES)
def test_qemu_source_to_ferry_destination_over_tls(vms, creds, mode):
    caps = MODES[mode]
    d = MigrationDestination(None, config(caps, {"tls-creds": creds}))
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    src = vms("src", load=KNOWN)
    src.caps(**{"return-path": True, **caps})
    _qemu_tls(src, creds, "client")
    if caps:
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 20, "max-postcopy-bandwidth": 1 << 20})
    src.cmd("migrate", uri=uri)
    if caps:
        src.cmd("migrate-start-postcopy")
        wait_status(lambda: d.status, ("postcopy-active", "completed"))
        blk = d.ram.by_name["pc.ram"]
        d.faults.ensure(blk, np.array([LAST_KNOWN_PAGE >> 12]))
    assert d.wait(120) == "completed", d.query().get("error-desc")
    assert src.wait_migration()["status"] == "completed"
    assert isinstance(d._transport, TLSTransport)
    if mode == "postcopy-preempt":
        assert d._pc_channels and all(isinstance(c.reader.transport, TLSTransport) for c in d._pc_channels)
        chans = d.query()["channels"]
        assert sum(v.get("pages-placed", 0) for k, v in chans.items() if k.startswith("postcopy")) >= 1, chans
    check_ram_equals_qemu(d.ram, src)


@pytest.mark.parametrize("mode", TLS_MODES)
def test_ferry_source_to_qemu_destination_over_tls(vms, saved_guest, creds, mode):  # noqa: F811
    ram, devices, _ = saved_guest
    caps = MODES[mode]
    port = free_port()
    b = vms("dst", incoming="defer")
    if caps:
        b.caps(**caps)
    _qemu_tls(b, creds, "server")
    b.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    params = {"tls-creds": creds}
    if caps:
        params.update({"max-bandwidth": 8 << 20, "max-postcopy-bandwidth": 1 << 20, "postcopy-after-percent": 1})
    s = MigrationSource(ram, None, config(caps, params), devices=devices)
    s.start(f"tcp:127.0.0.1:{port}")
    if caps:
        b.wait_migration(want=("postcopy-active", "completed"))
        assert_reads_known_page(b, KNOWN)
    assert s.wait(120) == "completed", s.query().get("error-desc")
    b.wait_migration()
    assert isinstance(s.channel.writer.transport, TLSTransport)
    check_ram_equals_qemu(ram, b)


def test_qemu_source_with_a_certificate_from_another_ca_is_refused(vms, creds, tmp_path):
    other = tmp_path / "other"
    make_certs(str(other))
    d = MigrationDestination(None, config({}, {"tls-creds": creds}))
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    src = vms("src", load=KNOWN)
    src.caps(**{"return-path": True})
    _qemu_tls(src, str(other), "client")
    src.cmd("migrate", uri=uri)
    with pytest.raises(RuntimeError, match="failed"):
        src.wait_migration(timeout=60)
    assert d.status == "setup"
    assert d.gate.refused, "the destination logs the refused connection"
    d.cancel()
