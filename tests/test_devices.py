"""Opaque device state: delimited by the vmdesc (precopy) or PACKAGED (postcopy), never scanned."""
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels import devices as D
from ferry_migrate.channels.errors import DeviceStateError

be32 = struct.Struct(">I").pack


def section(sid, idstr, payload, inst=0, ver=1):
    return (codec.encode_section_start(C.QEMU_VM_SECTION_FULL, sid, idstr, inst, ver) + payload
            + codec.encode_footer(sid))


def sub(name, payload, ver=1):
    return bytes([C.QEMU_VM_SUBSECTION, len(name)]) + name.encode() + be32(ver) + payload


def sample():
    """Two devices as QEMU writes them: one with a subsection, and payloads holding 0x7e and footer-like bytes."""
    timer = b"\x7e" + be32(3) + b"\x00" * 11  # footer-like bytes inside the payload: data, not an end
    cpu = b"\x01\x02\x03\x04" * 3 + sub("cpu/extra", b"\x7e\x7e")
    data = section(3, "timer", timer) + section(4, "cpu_common", cpu, inst=0)
    desc = {"page_size": 4096, "devices": [
        {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 1,
         "fields": [{"name": "a", "type": "buffer", "size": 16}]},
        {"name": "cpu_common", "instance_id": 0, "vmsd_name": "cpu_common", "version": 1,
         "fields": [{"name": "r", "type": "uint32", "size": 4, "array_len": 3}],
         "subsections": [{"vmsd_name": "cpu/extra", "version": 1,
                          "fields": [{"name": "x", "type": "uint16", "size": 2}]}]},
    ]}
    raw = json.dumps(desc).encode()
    return data, raw, data + b"\x00" + bytes([C.QEMU_VM_VMDESCRIPTION]) + be32(len(raw)) + raw


def test_tail_delimited_by_vmdesc():
    data, raw, full = sample()
    t = D.try_device_tail(full)
    assert t is not None
    assert t.idstrs == ["timer", "cpu_common"]
    assert t.device_bytes == data and t.vmdesc_raw == raw
    assert [s.payload_size for s in t.sections] == [16, 12 + 2 + 9 + 4 + 2]
    assert b"".join(s.raw for s in t.sections) == data


@given(st.integers(min_value=1, max_value=200))
@settings(max_examples=60, deadline=None)
def test_tail_incomplete_until_the_last_byte(cut):
    _, _, full = sample()
    cut = min(cut, len(full) - 1)
    assert D.try_device_tail(full[:len(full) - cut]) is None


def test_tail_wrong_size_in_vmdesc_is_named():
    data, raw, _ = sample()
    desc = json.loads(raw)
    desc["devices"][0]["fields"][0]["size"] = 15
    raw = json.dumps(desc).encode()
    full = data + b"\x00\x06" + be32(len(raw)) + raw
    with pytest.raises(DeviceStateError, match="'timer'.*no footer after the 15 payload bytes"):
        D.try_device_tail(full)


def test_tail_wrong_subsection_is_named():
    data, raw, _ = sample()
    desc = json.loads(raw)
    desc["devices"][1]["subsections"][0]["vmsd_name"] = "cpu/other"
    raw = json.dumps(desc).encode()
    with pytest.raises(DeviceStateError, match="subsection 'cpu/other' not at"):
        D.try_device_tail(data + b"\x00\x06" + be32(len(raw)) + raw)


def test_tail_vmdesc_listing_another_device_is_named():
    data, raw, _ = sample()
    desc = json.loads(raw)
    desc["devices"][0]["name"] = "apic"
    raw = json.dumps(desc).encode()
    with pytest.raises(DeviceStateError, match="'timer' instance 0, the vmdesc lists 'apic'"):
        D.try_device_tail(data + b"\x00\x06" + be32(len(raw)) + raw)


def test_tail_error_names_first_section():
    data, _, _ = sample()
    e = D.tail_error(data)
    assert "'timer' (section id 3, instance 0)" in str(e) and isinstance(e, DeviceStateError)


@given(st.binary(max_size=300), st.booleans(), st.integers(0, 2**32 - 1))
@settings(max_examples=100, deadline=None)
def test_package_split_round_trip(payload, ping, value):
    dev = section(7, "timer", payload)
    blob = codec.encode_postcopy_listen() + dev + (codec.encode_ping(value) if ping else b"") \
        + codec.encode_postcopy_run()
    pkg = D.split_package(blob)
    assert pkg.head == [(C.MIG_CMD_POSTCOPY_LISTEN, b"")]
    assert pkg.device_bytes == dev
    want = ([(C.MIG_CMD_PING, be32(value))] if ping else []) + [(C.MIG_CMD_POSTCOPY_RUN, b"")]
    assert pkg.tail == want


def test_package_without_devices():
    blob = codec.encode_postcopy_listen() + codec.encode_ping(1) + codec.encode_postcopy_run()
    pkg = D.split_package(blob)
    assert pkg.device_bytes == b"" and [c for c, _ in pkg.head][-1] == C.MIG_CMD_POSTCOPY_RUN


@pytest.mark.parametrize("blob,msg", [
    (codec.encode_postcopy_listen() + section(1, "timer", b"x"), "not followed by POSTCOPY_RUN"),
    (codec.encode_postcopy_listen() + b"\x42junk" + codec.encode_postcopy_run(), "are not device sections"),
    (codec.encode_postcopy_listen()[:3], "command header truncated"),
])
def test_package_that_cannot_be_delimited(blob, msg):
    with pytest.raises(DeviceStateError, match=msg):
        D.split_package(blob)


def test_decoder_keeps_tail_verbatim_in_chunks():
    """A destination decoder hands out the device tail only once the vmdesc delimits it."""
    data, raw, full = sample()
    blocks = [codec.BlockInfo(0, "pc.ram", 4096, 4096)]
    stream = (codec.encode_header() + codec.encode_section_start(C.QEMU_VM_SECTION_START, 2, "ram", 0, 4)
              + codec.encode_ram_mem_size([("pc.ram", 4096, 4096)]) + codec.encode_footer(2)
              + codec.encode_section_part(C.QEMU_VM_SECTION_END, 2) + codec.encode_zero_page(0, "pc.ram")
              + codec.encode_eos() + codec.encode_footer(2) + full)
    dec = codec.StreamDecoder(blocks, opaque_devices=True)
    pos, tails = 0, []
    while pos < len(stream):
        ev, n = dec.next_event(memoryview(stream)[pos:min(len(stream), pos + 7)])
        while ev is codec.NEED_DATA:
            ev, n = dec.next_event(memoryview(stream)[pos:pos + n])
        pos += n
        if isinstance(ev, D.DeviceTail):
            tails.append(ev)
    assert len(tails) == 1 and tails[0].device_bytes == data
    assert dec.at_boundary()
