"""Each kind of bad input gives a ProtocolError naming the field and the value.

First against the pure decoder, then end to end: the same bytes written by a
raw socket to a real MigrationDestination, which must end "failed" with that
error (and answer SHUT 1 on the return path when one was opened). Last, a
real MigrationSource against a destination that rejects its stream ends
"failed" too, with the guest's memory untouched.
"""
from __future__ import annotations

import os
import socket
import struct

import numpy as np
import pytest

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels.channel import RamRecvChannel
from ferry_migrate.channels.codec import DeviceSpec, ReturnPathDecoder, StreamDecoder
from ferry_migrate.channels.errors import ProtocolError
from ferry_migrate.channels.qemufile import QEMUFileReader
from ferry_migrate.channels.transport import SocketTransport
from ferry_migrate.engine.destination import MigrationDestination
from ferry_migrate.engine.params import MigrationConfig
from ferry_migrate.engine.ram import GuestRAM, RAMBlock
from ferry_migrate.engine.source import MigrationSource

from .conftest import PAGE, decode_chunked, decode_rp_chunked, device_full, ram_part, ram_prologue

NPAGES = 16
BLOCKS = [codec.BlockInfo(0, "pc.ram", NPAGES * PAGE, C.PAGE_SIZE_4K)]
DEVICES = [DeviceSpec("ferry-guest", 1)]
HDR = codec.encode_header()
PRO = ram_prologue(BLOCKS)  # header + RAM START for the destination's one block
PART = codec.encode_section_part(C.QEMU_VM_SECTION_PART, 0)
be64 = struct.Struct(">Q").pack
LONG = "x" * 255

# name -> (stream, substrings the error must contain)
CASES = {
    "bad magic": (b"QEMU" + HDR[4:], ["bad magic 0x51454d55", "expected 0x5145564d"]),
    "bad version": (HDR[:4] + b"\x00\x00\x00\x04", ["unsupported version 4", "expected 3"]),
    "unknown section type": (HDR + b"\x42", ["unknown section type 0x42"]),
    "section type out of place": (HDR + b"\x05", ["section type SUBSECTION (0x05) not expected"]),
    "unknown section idstr": (PRO + codec.encode_section_start(C.QEMU_VM_SECTION_FULL, 1, "virtio-net", 0, 1),
                              ["unknown section 'virtio-net'", "section id 1"]),
    "device version too new": (PRO + codec.encode_section_start(C.QEMU_VM_SECTION_FULL, 1, "ferry-guest", 0, 2),
                               ["section 'ferry-guest': version 2 newer than supported 1"]),
    "unknown command": (HDR + codec.encode_command(42), ["unknown command 42"]),
    "invalid command 0": (HDR + codec.encode_command(0), ["unknown command 0"]),
    "wrong command length": (HDR + codec.encode_command(C.MIG_CMD_PING, b"\x00\x00\x00"),
                             ["command PING: length 3, expected 4"]),
    "wrong command length 0": (HDR + codec.encode_command(C.MIG_CMD_POSTCOPY_RUN, b"\x00"),
                               ["command POSTCOPY_RUN: length 1, expected 0"]),
    "advise length": (HDR + codec.encode_command(C.MIG_CMD_POSTCOPY_ADVISE, bytes(8)),
                      ["POSTCOPY_ADVISE: length 8, expected 0 or 16"]),
    "MEM_SIZE unknown block": (HDR + codec.encode_section_start(C.QEMU_VM_SECTION_START, 0, "ram", 0, 4)
                               + codec.encode_ram_mem_size([("nope", NPAGES * PAGE, PAGE)]),
                               ["MEM_SIZE: unknown RAM block 'nope'"]),
    "MEM_SIZE block size": (HDR + codec.encode_section_start(C.QEMU_VM_SECTION_START, 0, "ram", 0, 4)
                            + codec.encode_ram_mem_size([("pc.ram", 2 * NPAGES * PAGE, PAGE)]),
                            ["RAM block 'pc.ram' length 0x20000, destination has 0x10000"]),
    "ram section version": (HDR + codec.encode_section_start(C.QEMU_VM_SECTION_START, 0, "ram", 0, 5),
                            ["section 'ram': version 5, expected 4"]),
    "record unknown block": (PRO + PART + codec.encode_zero_page(0, "nope"), ["unknown RAM block 'nope'"]),
    "long unknown block": (PRO + PART + codec.encode_zero_page(0, LONG), [f"unknown RAM block '{LONG}'"]),
    "offset outside block": (PRO + PART + codec.encode_zero_page(NPAGES * PAGE, "pc.ram"),
                             ["offset 0x10000 outside block 'pc.ram' (length 0x10000)"]),
    "offset outside block, bulk": (PRO + PART + codec.encode_zero_page(0, "pc.ram")
                                   + codec.zero_run_records(np.arange(14, 18)),
                                   ["offset 0x10000 outside block 'pc.ram' (length 0x10000)"]),
    "misaligned offset": (PRO + PART + be64(0x1800 | C.RAM_SAVE_FLAG_PAGE) + b"\x06pc.ram",
                          ["unknown flag bits 0x800", "0x0000000000001808"]),
    "unsupported flag": (PRO + PART + be64(PAGE | C.RAM_SAVE_FLAG_XBZRLE) + b"\x06pc.ram",
                         ["unsupported flags XBZRLE", "0x0000000000001040"]),
    "no page kind": (PRO + PART + be64(PAGE | C.RAM_SAVE_FLAG_MEM_SIZE) + b"\x06pc.ram",
                     ["flags MEM_SIZE in 0x0000000000001004, expected PAGE, ZERO or EOS"]),
    "zero fill byte": (PRO + PART + codec.encode_page_header(0, C.RAM_SAVE_FLAG_ZERO, "pc.ram") + b"\x07",
                       ["RAM record ZERO at offset 0x0: fill byte 0x07, expected 0"]),
    "CONTINUE first": (PRO + PART + codec.encode_zero_page(PAGE, None),
                       ["CONTINUE before any block was named"]),
    "footer section id": (PRO + PART + codec.encode_eos() + codec.encode_footer(9),
                          ["section footer: section id 9, expected 0"]),
    "unknown part section": (PRO + codec.encode_section_part(C.QEMU_VM_SECTION_PART, 3),
                             ["SECTION_PART: unknown section id 3"]),
}
# Streams that end in the middle of something: the reader, not the decoder, sees it.
TRUNCATED = {
    "truncated page": (PRO + PART + codec.encode_page_header(0, C.RAM_SAVE_FLAG_PAGE, "pc.ram") + bytes(100),
                       ["truncated stream", "a RAM record needs 4111 bytes, only 115"]),
    "truncated header": (HDR[:5], ["truncated stream", "the stream header needs 8 bytes, only 5"]),
    "ends before EOF": (PRO + ram_part(b""), ["truncated stream", "a section or command needs 1 bytes, only 0"]),
}


def _check_message(msg: str, subs):
    for s in subs:
        assert s in msg, f"{s!r} not in {msg!r}"


@pytest.mark.parametrize("name", list(CASES))
def test_decoder_rejects(name):
    data, subs = CASES[name]
    for chunks in (None, [1], [3, 4096]):
        with pytest.raises(ProtocolError) as ei:
            decode_chunked(StreamDecoder(BLOCKS, devices=DEVICES), data, chunks)
        _check_message(str(ei.value), subs + ["stream offset"])


@pytest.mark.parametrize("name", ["truncated page", "truncated header"])
def test_reader_reports_truncation(name):
    data, subs = TRUNCATED[name]
    a, b = socket.socketpair()
    try:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        ch = RamRecvChannel(QEMUFileReader(SocketTransport(b)), StreamDecoder(BLOCKS, devices=DEVICES), "precopy")
        with pytest.raises(ProtocolError) as ei:
            while ch.next_event() is not None:
                pass
        _check_message(str(ei.value), subs + ["channel precopy"])
    finally:
        a.close()
        b.close()


def test_idstr_longer_than_255_bytes():
    """The encoder refuses (the length is a u8 on the wire); RAMBlock refuses such a name too."""
    long = "é" * 128  # 256 bytes in UTF-8
    with pytest.raises(ValueError, match="256 bytes, at most 255"):
        codec.encode_section_start(C.QEMU_VM_SECTION_FULL, 1, long, 0, 1)
    with pytest.raises(ValueError, match="RAM block idstr.*256 bytes, at most 255"):
        codec.encode_page_header(0, C.RAM_SAVE_FLAG_PAGE, long)
    with pytest.raises(ValueError, match="RAM block idstr.*300 bytes"):
        codec.encode_ram_mem_size([("y" * 300, PAGE, PAGE)])
    with pytest.raises(ValueError, match="RAM block idstr.*300 bytes"):
        codec.encode_postcopy_discard("y" * 300, [(0, PAGE)])
    with pytest.raises(ValueError, match="RAM block idstr.*300 bytes"):
        codec.encode_rp_req_pages(0, PAGE, "y" * 300)
    with pytest.raises(ValueError, match="1 to 255 bytes"):
        RAMBlock(long, PAGE)
    # 255 bytes is the limit and is fine.
    assert len(codec.encode_page_header(0, C.RAM_SAVE_FLAG_PAGE, LONG)) == 8 + 1 + 255


# ---------------------------------------------------------------------------
# End to end: a real destination fed by a raw socket
# ---------------------------------------------------------------------------

def _with_return_path(data: bytes) -> bytes:
    """Open the return path right after a valid header, so the destination can answer SHUT."""
    if data[:8] == HDR:
        return HDR + codec.encode_open_return_path() + data[8:]
    return data


def _feed_destination(uri: str, data: bytes, page_checksums: bool = False):
    """A destination fed ``data`` over a real socket; hand-made streams are QEMU's (no page checks)."""
    ram = GuestRAM.create(NPAGES * PAGE)
    cfg = MigrationConfig()
    cfg.set_capabilities({"page-checksums": page_checksums})
    d = MigrationDestination(ram, cfg)
    try:
        real = d.listen(uri)
        d.start()
        if real.startswith("unix:"):
            s = socket.socket(socket.AF_UNIX)
            s.connect(real[5:])
        else:
            host, port = real[4:].rsplit(":", 1)
            s = socket.create_connection((host, int(port)))
        reply = bytearray()
        with s:
            s.settimeout(10)
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the destination may already have given up
            try:
                while chunk := s.recv(4096):
                    reply += chunk
            except OSError:
                pass
        assert d.wait(10) in ("failed", "completed")
        return d, bytes(reply)
    finally:
        ram.close()


@pytest.mark.parametrize("name", list(CASES) + list(TRUNCATED))
def test_destination_fails_on_bad_stream(name, tmp_path):
    data, subs = {**CASES, **TRUNCATED}[name]
    if name == "unknown section idstr":
        # A destination keeps unknown device sections as opaque bytes; only a
        # vmdesc could delimit them, and this stream has none.
        subs = ["device section 'virtio-net'", "section id 1", "without a VM description"]
    data = _with_return_path(data)
    d, reply = _feed_destination(f"unix:{tmp_path}/in.sock", data)
    q = d.query()
    assert q["status"] == "failed"
    _check_message(q["error-desc"], subs)
    if data[:8] == HDR:
        msgs, left = decode_rp_chunked(ReturnPathDecoder(), reply)
        assert left == 0
        assert [(m.name, m.value) for m in msgs] == [("SHUT", 1)]
    assert not os.path.exists(f"{tmp_path}/in.sock")  # the listener cleaned up


@pytest.mark.parametrize("name", ["offset outside block", "unknown command"])
def test_destination_fails_on_bad_stream_tcp(name):
    data, subs = CASES[name]
    d, _ = _feed_destination("tcp:127.0.0.1:0", data)
    assert d.status == "failed"
    _check_message(d.query()["error-desc"], subs)


def test_destination_accepts_a_good_hand_made_stream(tmp_path):
    """The same harness with a valid stream completes: the failures above are about the bytes."""
    recs = codec.encode_zero_page(0, "pc.ram") + codec.zero_run_records(np.arange(1, NPAGES))
    data = (PRO + ram_part(recs, end=True) + device_full(1, "ferry-guest", 1, b"{}")
            + codec.encode_eof())
    d, _ = _feed_destination(f"unix:{tmp_path}/in.sock", data)
    assert d.status == "completed", d.query().get("error-desc")


def test_destination_with_page_checksums_refuses_a_stream_without_checks(tmp_path):
    """The same good stream, to a destination that requires page check values (the default)."""
    recs = codec.encode_zero_page(0, "pc.ram") + codec.zero_run_records(np.arange(1, NPAGES))
    data = (PRO + ram_part(recs, end=True) + device_full(1, "ferry-guest", 1, b"{}")
            + codec.encode_eof())
    d, reply = _feed_destination(f"unix:{tmp_path}/in.sock", data, page_checksums=True)
    q = d.query()
    assert q["status"] == "failed"
    _check_message(q["error-desc"], ["page record at offset 0x0 of block 'pc.ram' is not covered by a "
                                     "FERRY_PAGE_CHECKS record"])


# ---------------------------------------------------------------------------
# A real source against a destination that rejects its stream
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dest_shape,dest_error", [
    ({"size": NPAGES * PAGE}, "RAM block 'pc.ram' length 0x20000, destination has 0x10000"),
    ({"size": 2 * NPAGES * PAGE, "name": "other"}, "MEM_SIZE: unknown RAM block 'pc.ram'"),
])
def test_source_fails_when_destination_rejects(tmp_path, dest_shape, dest_error):
    src_ram = GuestRAM.create(2 * NPAGES * PAGE)
    src_ram.fill("mixed")
    dst_ram = GuestRAM.create(**dest_shape)
    try:
        before = src_ram.digests()
        d = MigrationDestination(dst_ram)
        uri = d.listen(f"unix:{tmp_path}/m.sock")
        d.start()
        s = MigrationSource(src_ram)  # no workload: the guest is paused
        s.start(uri)
        assert s.wait(30) == "failed"
        assert d.wait(10) == "failed"
        _check_message(d.query()["error-desc"], [dest_error])
        q = s.query()
        assert q["status"] == "failed"
        # The return path's SHUT 1 is the reason, even when a write hit the closed socket first.
        assert "destination reported failure (SHUT 1)" in q["error-desc"]
        assert src_ram.digests() == before, "the source's guest memory changed"
    finally:
        src_ram.close()
        dst_ram.close()
