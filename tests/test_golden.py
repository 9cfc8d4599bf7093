"""Golden vectors: Ferry's encoder and decoder against records written down from QEMU.

tests/data/golden-records.txt holds every record kind of the stream and the return path
as bytes written by hand from QEMU 7.2's definitions (savevm.c, ram.c, migration.c),
so a wrong constant or byte order shared by encoder and decoder fails here, where a
round trip would pass. Each record is checked against the encoder (the same bytes)
and the decoder (the fields it names, typed in here, not taken from the encoder).

Every record, postcopy recovery's included, is checked against the encoder and the
decoder; test_every_golden_record_has_an_encoder keeps it so.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels.codec import BlockInfo, ReturnPathDecoder, StreamDecoder

from .conftest import decode_chunked, decode_rp_chunked

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden-records.txt")
_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|fill:(\d+):([0-9a-fA-F]{2})|([0-9a-fA-F]+)|(\S+)')


def load_golden(path: str = GOLDEN) -> dict[str, bytes]:
    """{record name: bytes} from the golden file (format described at its top)."""
    out: dict[str, bytearray] = {}
    cur = None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = re.sub(r'#(?=(?:[^"]*"[^"]*")*[^"]*$).*', "", line).strip()  # a # outside quotes
            if not line:
                continue
            if line.startswith("[") and line.endswith("]"):
                cur = line[1:-1]
                assert cur not in out, f"{path}:{lineno}: record {cur} twice"
                out[cur] = bytearray()
                continue
            assert cur is not None, f"{path}:{lineno}: bytes before any [record]"
            for text, n, fill, hexs, bad in _TOKEN.findall(line):
                if bad:
                    raise AssertionError(f"{path}:{lineno}: cannot read {bad!r}")
                if hexs:
                    assert len(hexs) % 2 == 0, f"{path}:{lineno}: odd hex {hexs}"
                    out[cur] += bytes.fromhex(hexs)
                elif n:
                    out[cur] += bytes([int(fill, 16)]) * int(n)
                else:
                    out[cur] += text.replace('\\"', '"').encode()
    return {k: bytes(v) for k, v in out.items()}


G = load_golden()
BLOCKS = [BlockInfo(0, "pc.ram", 64 << 20, C.PAGE_SIZE_4K), BlockInfo(1, "vga.vr", 128 << 10, C.PAGE_SIZE_4K)]
BLOCKS_2M = [BlockInfo(0, "pc.ram", 8 << 20, C.PAGE_SIZE_2M)]


def test_golden_file_has_every_record_kind():
    assert {"header", "configuration", "section_start_ram", "section_full_device", "section_part",
            "section_end", "section_footer", "ram_mem_size", "ram_mem_size_postcopy_2m", "ram_page_named",
            "ram_page_continue", "ram_zero_named", "ram_zero_continue", "ram_eos", "eof", "vmdescription",
            "cmd_open_return_path", "cmd_ping", "cmd_postcopy_advise", "cmd_postcopy_advise_empty",
            "cmd_postcopy_listen", "cmd_postcopy_run", "cmd_postcopy_ram_discard", "cmd_packaged",
            "cmd_postcopy_resume", "cmd_recv_bitmap", "rp_shut_ok", "rp_shut_error", "rp_pong",
            "rp_req_pages_id", "rp_req_pages", "rp_recv_bitmap", "rp_resume_ack"} == set(G)


def test_constants_are_qemus():
    """The numbers of QEMU 7.2's enums and defines (savevm.c, ram.c, migration.c), typed in."""
    assert (C.QEMU_VM_FILE_MAGIC, C.QEMU_VM_FILE_VERSION) == (0x5145564D, 3)
    assert [C.QEMU_VM_EOF, C.QEMU_VM_SECTION_START, C.QEMU_VM_SECTION_PART, C.QEMU_VM_SECTION_END,
            C.QEMU_VM_SECTION_FULL, C.QEMU_VM_SUBSECTION, C.QEMU_VM_VMDESCRIPTION, C.QEMU_VM_CONFIGURATION,
            C.QEMU_VM_COMMAND, C.QEMU_VM_SECTION_FOOTER] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0x7E]
    assert [C.RAM_SAVE_FLAG_FULL, C.RAM_SAVE_FLAG_ZERO, C.RAM_SAVE_FLAG_MEM_SIZE, C.RAM_SAVE_FLAG_PAGE,
            C.RAM_SAVE_FLAG_EOS, C.RAM_SAVE_FLAG_CONTINUE, C.RAM_SAVE_FLAG_XBZRLE, C.RAM_SAVE_FLAG_HOOK,
            C.RAM_SAVE_FLAG_COMPRESS_PAGE] == [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x100]
    assert (C.TARGET_PAGE_BITS, C.RAM_SECTION_IDSTR, C.RAM_SECTION_VERSION) == (12, "ram", 4)
    assert [C.MIG_CMD_INVALID, C.MIG_CMD_OPEN_RETURN_PATH, C.MIG_CMD_PING, C.MIG_CMD_POSTCOPY_ADVISE,
            C.MIG_CMD_POSTCOPY_LISTEN, C.MIG_CMD_POSTCOPY_RUN, C.MIG_CMD_POSTCOPY_RAM_DISCARD,
            C.MIG_CMD_PACKAGED, C.MIG_CMD_ENABLE_COLO, C.MIG_CMD_POSTCOPY_RESUME, C.MIG_CMD_RECV_BITMAP,
            C.MIG_CMD_MAX] == list(range(12))
    # savevm.c mig_cmd_args
    assert {k: v for k, v in C.MIG_CMD_ARGS_LEN.items() if k != C.MIG_CMD_ENABLE_COLO} == {
        1: 0, 2: 4, 3: -1, 4: 0, 5: 0, 6: -1, 7: 4, 9: 0, 10: -1}
    assert [C.MIG_RP_MSG_INVALID, C.MIG_RP_MSG_SHUT, C.MIG_RP_MSG_PONG, C.MIG_RP_MSG_REQ_PAGES_ID,
            C.MIG_RP_MSG_REQ_PAGES, C.MIG_RP_MSG_RECV_BITMAP, C.MIG_RP_MSG_RESUME_ACK] == list(range(7))
    # migration.c rp_cmd_args
    assert {k: v for k, v in C.MIG_RP_MSG_ARGS_LEN.items() if k in range(7)} == {
        1: 4, 2: 4, 3: -1, 4: 12, 5: -1, 6: 4}
    assert (C.POSTCOPY_RAM_DISCARD_VERSION, C.MAX_DISCARDS_PER_COMMAND) == (0, 12)
    assert (C.RAMBLOCK_RECV_BITMAP_ENDING, C.MIGRATION_RESUME_ACK_VALUE) == (0x0123456789ABCDEF, 1)
    # Ferry's own return-path message stays outside QEMU's range.
    assert C.MIG_RP_MSG_FERRY_DIGESTS >= 7


# ---------------------------------------------------------------------------
# Encoder: the same bytes
# ---------------------------------------------------------------------------

# The received bitmap of the golden RECV_BITMAP: 100 pages, 0, 1, 2 and 64 received.
_RECEIVED_100 = np.zeros(100, dtype=bool)
_RECEIVED_100[[0, 1, 2, 64]] = True

ENCODED = {
    "header": lambda: codec.encode_header(),
    "configuration": lambda: codec.encode_configuration("pc-i440fx-7.2"),
    "section_start_ram": lambda: codec.encode_section_start(C.QEMU_VM_SECTION_START, 2, "ram", 0, 4),
    "section_full_device": lambda: codec.encode_section_start(C.QEMU_VM_SECTION_FULL, 3, "ferry-guest", 0, 1),
    "section_part": lambda: codec.encode_section_part(C.QEMU_VM_SECTION_PART, 2),
    "section_end": lambda: codec.encode_section_part(C.QEMU_VM_SECTION_END, 2),
    "section_footer": lambda: codec.encode_footer(2),
    "ram_mem_size": lambda: codec.encode_ram_mem_size([("pc.ram", 64 << 20, 4096), ("vga.vr", 128 << 10, 4096)]),
    "ram_mem_size_postcopy_2m": lambda: codec.encode_ram_mem_size([("pc.ram", 8 << 20, 2 << 20)], postcopy=True),
    "ram_page_named": lambda: codec.encode_page_header(0x3000, C.RAM_SAVE_FLAG_PAGE, "pc.ram") + b"\xab" * 4096,
    "ram_page_continue": lambda: codec.encode_page_header(0x4000, C.RAM_SAVE_FLAG_PAGE, None) + b"\xcd" * 4096,
    "ram_zero_named": lambda: codec.encode_zero_page(0x5000, "pc.ram"),
    "ram_zero_continue": lambda: codec.encode_zero_page(0x6000, None),
    "ram_eos": lambda: codec.encode_eos(),
    "eof": lambda: codec.encode_eof(),
    "vmdescription": lambda: codec.encode_vmdesc({"page_size": 4096}),
    "cmd_open_return_path": lambda: codec.encode_open_return_path(),
    "cmd_ping": lambda: codec.encode_ping(7),
    "cmd_postcopy_advise": lambda: codec.encode_postcopy_advise((2 << 20) | 4096),
    "cmd_postcopy_advise_empty": lambda: codec.encode_postcopy_advise(None),
    "cmd_postcopy_listen": lambda: codec.encode_postcopy_listen(),
    "cmd_postcopy_run": lambda: codec.encode_postcopy_run(),
    "cmd_postcopy_ram_discard": lambda: b"".join(
        codec.encode_postcopy_discard("pc.ram", [(2 << 20, 2 << 20), (6 << 20, 4 << 20)])),
    "cmd_packaged": lambda: codec.encode_packaged(codec.encode_postcopy_listen() + codec.encode_postcopy_run()),
    "rp_shut_ok": lambda: codec.encode_rp_shut(0),
    "rp_shut_error": lambda: codec.encode_rp_shut(1),
    "rp_pong": lambda: codec.encode_rp_pong(7),
    "rp_req_pages_id": lambda: codec.encode_rp_req_pages(4 << 20, 2 << 20, "pc.ram"),
    "rp_req_pages": lambda: codec.encode_rp_req_pages(6 << 20, 2 << 20, None),
    "cmd_postcopy_resume": lambda: codec.encode_postcopy_resume(),
    "cmd_recv_bitmap": lambda: codec.encode_recv_bitmap("pc.ram"),
    "rp_recv_bitmap": lambda: codec.encode_rp_recv_bitmap("pc.ram", _RECEIVED_100),
    "rp_resume_ack": lambda: codec.encode_rp_resume_ack(),
}


@pytest.mark.parametrize("name", sorted(ENCODED))
def test_encoder_writes_the_golden_bytes(name):
    assert ENCODED[name]() == G[name]


def test_every_golden_record_has_an_encoder():
    """Recovery's records (POSTCOPY_RESUME, RECV_BITMAP both ways, RESUME_ACK) are written too."""
    assert set(G) - set(ENCODED) == set()


def test_page_run_headers_are_the_golden_continue_headers():
    """The bulk encoders (numpy) write the same CONTINUE headers as the golden records."""
    hdr = codec.page_run_headers(np.array([4]), C.RAM_SAVE_FLAG_PAGE).tobytes()
    assert hdr == G["ram_page_continue"][:8]
    assert codec.zero_run_records(np.array([6])) == G["ram_zero_continue"]


# ---------------------------------------------------------------------------
# Decoder: the fields QEMU meant
# ---------------------------------------------------------------------------

def _stream(*names: str) -> bytes:
    return b"".join(G[n] for n in names)


RAM_PROLOGUE = ("section_start_ram", "ram_mem_size", "section_footer")


@pytest.mark.parametrize("chunks", [None, [1], [7, 4096, 3]])
def test_decoder_reads_a_golden_precopy_stream(chunks):
    stream = _stream("header", "configuration", "cmd_open_return_path", "cmd_ping", *RAM_PROLOGUE,
                     "section_part", "ram_page_named", "ram_page_continue", "ram_zero_named", "ram_zero_continue",
                     "ram_eos", "section_footer", "section_end", "ram_eos", "section_footer",
                     "section_full_device") + bytes.fromhex("00000002") + b"{}" + _stream("section_footer")
    # The device section's footer names section 2 in the golden record; the FULL section is 3.
    stream = stream[:-5] + bytes.fromhex("7e00000003") + _stream("eof", "vmdescription")
    events, left = decode_chunked(StreamDecoder(BLOCKS, devices=[codec.DeviceSpec("ferry-guest", 1)]), stream, chunks)
    assert left == 0
    assert events == [
        ("header", 3), ("config", "pc-i440fx-7.2"),
        ("cmd", 1, b""), ("cmd", 2, b"\x00\x00\x00\x07"),
        ("start", 1, 2, "ram", 0, 4),
        ("blocks", (64 << 20) + (128 << 10), [("pc.ram", 64 << 20, None), ("vga.vr", 128 << 10, None)]),
        ("eos",), ("footer", 2),
        ("part", 2, 2),
        ("page", "pc.ram", 3, b"\xab" * 4096), ("page", "pc.ram", 4, b"\xcd" * 4096),
        ("zero", "pc.ram", 5), ("zero", "pc.ram", 6),
        ("eos",), ("footer", 2),
        ("part", 3, 2), ("eos",), ("footer", 2),
        ("start", 4, 3, "ferry-guest", 0, 1), ("dev", "ferry-guest", 0, 1, b"{}"), ("footer", 3),
        ("eof",), ("vmdesc", {"page_size": 4096}),
    ]


def test_decoder_reads_golden_postcopy_commands():
    stream = _stream("header", "cmd_postcopy_advise", "section_start_ram", "ram_mem_size_postcopy_2m",
                     "section_footer", "cmd_postcopy_ram_discard", "cmd_packaged", "cmd_postcopy_resume",
                     "cmd_recv_bitmap", "cmd_postcopy_advise_empty")
    dec = StreamDecoder(BLOCKS_2M)
    events, left = decode_chunked(dec, stream, [3])
    assert left == 0
    assert events[1] == ("cmd", C.MIG_CMD_POSTCOPY_ADVISE, bytes.fromhex("0000000000201000 0000000000001000"))
    assert codec.parse_postcopy_advise(events[1][2]) == ((2 << 20) | 4096, 4096)
    # After ADVISE the 2 MiB block's page size is read from MEM_SIZE.
    assert events[3] == ("blocks", 8 << 20, [("pc.ram", 8 << 20, 2 << 20)])
    name, ranges = codec.parse_postcopy_discard(events[6][2])
    assert events[6][1] == C.MIG_CMD_POSTCOPY_RAM_DISCARD
    assert (name, ranges) == ("pc.ram", [(2 << 20, 2 << 20), (6 << 20, 4 << 20)])
    # PACKAGED hands out the blob (LISTEN, RUN) whole, which decodes as a nested stream.
    assert events[7] == ("cmd", C.MIG_CMD_PACKAGED, bytes.fromhex("0800040000 0800050000"))
    nested, _ = decode_chunked(StreamDecoder(BLOCKS_2M, mode="packaged"), events[7][2])
    assert nested == [("cmd", C.MIG_CMD_POSTCOPY_LISTEN, b""), ("cmd", C.MIG_CMD_POSTCOPY_RUN, b"")]
    assert events[8] == ("cmd", C.MIG_CMD_POSTCOPY_RESUME, b"")
    assert events[9] == ("cmd", C.MIG_CMD_RECV_BITMAP, b"\x06pc.ram")
    assert events[10] == ("cmd", C.MIG_CMD_POSTCOPY_ADVISE, b"")


def test_decoder_reads_golden_postcopy_channel_records():
    """A POSTCOPY channel carries bare page records ended by EOS (no header)."""
    stream = _stream("ram_page_named", "ram_zero_continue", "ram_page_continue", "ram_eos")
    dec = StreamDecoder(BLOCKS, mode="pages")
    events, left = decode_chunked(dec, stream, [5])
    assert left == 0 and dec.at_boundary()
    assert events == [("page", "pc.ram", 3, b"\xab" * 4096), ("zero", "pc.ram", 6),
                      ("page", "pc.ram", 4, b"\xcd" * 4096), ("eos",)]


def test_decoder_reads_golden_return_path_messages():
    data = _stream("rp_shut_error", "rp_pong", "rp_req_pages_id", "rp_req_pages", "rp_recv_bitmap",
                   "rp_resume_ack", "rp_shut_ok")
    msgs, left = decode_rp_chunked(ReturnPathDecoder({"pc.ram": 100}), data, [1, 2, 3])
    assert left == 0
    got = [(m.type, m.value, m.start, m.length, m.block) for m in msgs]
    assert got == [
        (C.MIG_RP_MSG_SHUT, 1, 0, 0, None),
        (C.MIG_RP_MSG_PONG, 7, 0, 0, None),
        (C.MIG_RP_MSG_REQ_PAGES_ID, 0, 4 << 20, 2 << 20, "pc.ram"),
        (C.MIG_RP_MSG_REQ_PAGES, 0, 6 << 20, 2 << 20, "pc.ram"),  # the block of the previous request
        (C.MIG_RP_MSG_RECV_BITMAP, 0, 0, 0, "pc.ram"),
        (C.MIG_RP_MSG_RESUME_ACK, C.MIGRATION_RESUME_ACK_VALUE, 0, 0, None),
        (C.MIG_RP_MSG_SHUT, 0, 0, 0, None),
    ]
    assert [m.name for m in msgs] == ["SHUT", "PONG", "REQ_PAGES_ID", "REQ_PAGES", "RECV_BITMAP", "RESUME_ACK",
                                      "SHUT"]
    assert np.array_equal(msgs[4].received, _RECEIVED_100)
