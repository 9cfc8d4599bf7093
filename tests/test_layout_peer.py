"""RAM layouts taken from MEM_SIZE, and the peer kind's Ferry-only features."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels import devices as D
from ferry_migrate.channels.errors import LayoutError
from ferry_migrate.engine.destination import MigrationDestination
from ferry_migrate.engine.layout import LayoutLimits, check_layout, check_machine_type, ram_from_layout
from ferry_migrate.engine.params import MigrationConfig
from ferry_migrate.engine.peer import effective_capability, peer_features
from ferry_migrate.engine.ram import GuestRAM
from ferry_migrate.engine.source import MigrationSource


def test_layout_taken_with_page_sizes():
    ram = ram_from_layout([("pc.ram", 8 << 20, None), ("huge", 4 << 20, 2 << 20), ("/rom@etc/x", 4096, None)],
                          LayoutLimits())
    try:
        assert [(b.idstr, b.length, b.page_size, b.index) for b in ram.blocks] == [
            ("pc.ram", 8 << 20, 4096, 0), ("huge", 4 << 20, 2 << 20, 1), ("/rom@etc/x", 4096, 4096, 2)]
    finally:
        ram.close()


@pytest.mark.parametrize("blocks,limits,msg", [
    ([("a", 4096, None)] * 3, LayoutLimits(max_blocks=2), "3 RAM blocks, this destination accepts at most 2"),
    ([("a", 2 << 20, None)], LayoutLimits(max_total=1 << 20), "accepts at most 1 MiB"),
    ([("a", 4096, 3 << 20)], LayoutLimits(), "'a': page size 0x300000 not one of"),
    ([("a", 4096, 2 << 20)], LayoutLimits(), "'a': length 0x1000 is not a positive multiple"),
])
def test_layout_refused_by_name(blocks, limits, msg):
    with pytest.raises(LayoutError, match=msg):
        check_layout(blocks, limits)


def test_machine_type_allow_list():
    check_machine_type("pc-i440fx-7.2", LayoutLimits())
    with pytest.raises(LayoutError, match="'pc-q35-7.2' not allowed here"):
        check_machine_type("pc-q35-7.2", LayoutLimits(machine_types=("pc-i440fx-7.2",)))


def test_peer_features_switch_ferry_only_things_in_one_place():
    f, q = peer_features("ferry"), peer_features("qemu")
    assert f.digests and f.guest_device and not f.configuration
    assert not q.digests and not q.guest_device and q.configuration and q.completion == "shut"
    assert effective_capability(f, "page-checksums", True) is True
    assert effective_capability(q, "page-checksums", True) is False
    assert effective_capability(q, "postcopy-ram", True) is True
    with pytest.raises(ValueError, match="peer 'kvm'"):
        peer_features("kvm")


@pytest.mark.parametrize("caps", [{}, {"postcopy-ram": True}])
def test_ferry_source_as_qemu_to_layout_taking_destination(caps):
    """peer=qemu between Ferry workers: CONFIGURATION sent, no ferry-guest, completion on SHUT and close."""
    ram = GuestRAM.create(16 << 20, nblocks=2)
    ram.fill("mixed")
    cfg = MigrationConfig()
    cfg.set_capabilities(caps)
    cfg.set_parameters({"peer": "qemu", "machine-type": "pc-q35-7.2",
                        **({"postcopy-after-passes": 1} if caps else {})})
    dcfg = MigrationConfig()
    dcfg.set_parameters({"peer": "qemu"})
    d = MigrationDestination(None, dcfg)
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    s = MigrationSource(ram, None, cfg)
    s.start(uri)
    assert s.wait(60) == "completed", s.query().get("error-desc")
    assert d.wait(60) == "completed", d.query().get("error-desc")
    assert s.query()["completion"] == "shut"
    dq = d.query()
    assert dq["machine-type"] == "pc-q35-7.2" and d.guest_state is None
    assert d.devices.ram_section_id not in (None, 0)
    for a, b in zip(ram.blocks, d.ram.blocks):
        assert (a.idstr, bytes(a.view)) == (b.idstr, bytes(b.view))


# Device sections of random shapes: fields (with compressed arrays) and nested subsections.
_field = st.tuples(st.integers(0, 40), st.integers(1, 4))
_sub = st.recursive(st.fixed_dictionaries({"f": st.lists(_field, max_size=3), "s": st.just([])}),
                    lambda inner: st.fixed_dictionaries({"f": st.lists(_field, max_size=3),
                                                         "s": st.lists(inner, max_size=2)}), max_leaves=4)


def _build(shape, name, rnd):
    desc = {"vmsd_name": name, "version": 1,
            "fields": [{"name": f"f{i}", "type": "buffer", "size": sz, **({"array_len": n} if n > 1 else {})}
                       for i, (sz, n) in enumerate(shape["f"])]}
    payload = b"".join(rnd(sz * n) for sz, n in shape["f"])
    subs = []
    for j, s in enumerate(shape["s"]):
        sname = f"{name}/s{j}"
        sd, sp = _build(s, sname, rnd)
        subs.append(sd)
        payload += bytes([C.QEMU_VM_SUBSECTION, len(sname)]) + sname.encode() + b"\x00\x00\x00\x01" + sp
    if subs:
        desc["subsections"] = subs
    return desc, payload


@given(st.lists(_sub, min_size=1, max_size=4), st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None)
def test_vmdesc_delimits_random_sections(shapes, r):
    def rnd(n):  # payload bytes full of footer-like 0x7e
        return bytes(r.choice((0x7E, 0x00, 0x05, r.randrange(256))) for _ in range(n))

    devs, data = [], b""
    for i, shape in enumerate(shapes):
        name = f"dev{i}"
        desc, payload = _build(shape, name, rnd)
        devs.append({"name": name, "instance_id": i, **desc})
        data += (codec.encode_section_start(C.QEMU_VM_SECTION_FULL, i + 3, name, i, 1) + payload
                 + codec.encode_footer(i + 3))
    import json
    raw = json.dumps({"page_size": 4096, "devices": devs}).encode()
    tail = D.try_device_tail(data + b"\x00\x06" + len(raw).to_bytes(4, "big") + raw)
    assert tail is not None and tail.device_bytes == data
    assert [s.idstr for s in tail.sections] == [d["name"] for d in devs]


def test_carried_qemu_devices_between_ferry_workers_verified_by_digests():
    """A QEMU guest's device sections carried Ferry to Ferry (peer=ferry): verbatim, and digests compared."""
    import json

    from ferry_migrate.channels.devices import GuestDevices

    payload = b"\x7e\x00\x00\x00\x05" * 3
    dev = (codec.encode_section_start(C.QEMU_VM_SECTION_FULL, 5, "timer", 0, 2) + payload
           + codec.encode_footer(5))
    vmdesc = json.dumps({"page_size": 4096, "devices": [
        {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
         "fields": [{"name": "t", "type": "buffer", "size": len(payload)}]}]}).encode()
    carried = GuestDevices(device_bytes=dev, vmdesc_raw=vmdesc, ram_section_id=2, sections=["timer"])
    ram = GuestRAM.create(8 << 20)
    ram.fill("mixed")
    d = MigrationDestination(None)
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    s = MigrationSource(ram, None, MigrationConfig(), devices=carried)
    s.start(uri)
    assert s.wait(60) == "completed", s.query().get("error-desc")
    assert d.wait(60) == "completed", d.query().get("error-desc")
    assert s.query()["completion"] == "digests"
    assert d.devices.device_bytes == dev and d.devices.vmdesc_raw == vmdesc
    assert d.devices.ram_section_id == 2
