"""The tools: dump_stream.py on a real saved stream, bench_precopy.py's JSON output.

dump_stream reads a stream a real MigrationSource wrote with ``file:``; the
benchmark runs its smallest configuration for real (two processes, a Unix
socket). No performance asserts: figures depend on the machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .qemu_vm import require_qemu

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.engine.ram import GuestRAM
from ferry_migrate.engine.source import MigrationSource

from .conftest import decode_chunked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")


def _tool(*args, timeout=120, stdin=None):
    return subprocess.run([sys.executable, os.path.join(TOOLS, args[0]), *args[1:]], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, stdin=stdin)


@pytest.fixture(scope="module")
def saved_stream(tmp_path_factory):
    """An 8 MiB guest (1 page in 4 zero) saved by a real MigrationSource."""
    path = tmp_path_factory.mktemp("stream") / "guest.stream"
    ram = GuestRAM.create(8 << 20)
    try:
        ram.fill("mixed")
        src = MigrationSource(ram)
        src.start(f"file:{path}")
        assert src.wait(60) == "completed", src.query().get("error-desc")
    finally:
        ram.close()
    return path


def test_dump_text(saved_stream):
    r = _tool("dump_stream.py", str(saved_stream))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "header: magic QEVM, version 3" in out
    assert "section START id 1 'ram' instance 0 version 4" in out
    assert "pc.ram: 8 MiB (0x800000)" in out
    assert "1536 PAGE, 512 ZERO records" in out
    assert "section FULL id 2 'ferry-guest'" in out
    assert "EOF" in out
    assert "VM description:" in out and '"page_size": 4096' in out


def test_dump_json_pages_from_stdin(saved_stream):
    with open(saved_stream, "rb") as f:
        r = _tool("dump_stream.py", "--json", "--pages", stdin=f)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    kinds = [i["kind"] for i in d["items"]]
    assert kinds[0] == "header" and kinds[-2:] == ["eof", "vmdesc"]
    ram = [i for i in d["items"] if i["kind"] == "section" and i["idstr"] == "ram"]
    assert ram[0]["type"] == "START" and ram[0]["blocks"] == [
        {"idstr": "pc.ram", "length": 8 << 20, "page-size": None}]
    assert sum(s["pages"] for s in ram) == 1536 and sum(s["zero"] for s in ram) == 512
    records = [r for s in ram for r in s["records"]]
    assert len(records) == 2048 and ["pc.ram", 0x3000, "ZERO"] in records
    assert sorted(r[1] for r in records) == [p * 4096 for p in range(2048)]
    assert d["blocks"]["pc.ram"] == {"length": 8 << 20, "pages": 1536, "zero": 512}
    assert d["items"][-1]["json"]["ram"] == [{"name": "pc.ram", "size": 8 << 20, "page-size": 4096}]
    assert d["bytes"] == os.path.getsize(saved_stream)


def test_dump_bad_stream(saved_stream, tmp_path):
    cut = tmp_path / "cut.stream"
    cut.write_bytes(saved_stream.read_bytes()[:100_000])
    r = _tool("dump_stream.py", str(cut))
    assert r.returncode == 1
    assert "truncated stream" in r.stderr and "header: magic QEVM" in r.stdout
    bad = tmp_path / "bad.stream"
    bad.write_bytes(b"QEVX\0\0\0\3")
    r = _tool("dump_stream.py", "--json", str(bad))
    assert r.returncode == 1 and "bad magic" in json.loads(r.stdout)["error"]


def test_decoder_learns_blocks_with_postcopy_page_sizes():
    """learn_blocks: a huge page size after a block is told from the next entry and from EOS."""
    stream = (codec.encode_header() + codec.encode_postcopy_advise((2 << 20) | 4096)
              + codec.encode_section_start(C.QEMU_VM_SECTION_START, 0, "ram", 0, 4)
              + codec.encode_ram_mem_size([("a", 4 << 20, 2 << 20), ("b", 8192, 4096), ("c", 1 << 30, 1 << 30)],
                                          postcopy=True)
              + codec.encode_footer(0) + codec.encode_eof())
    for chunks in ([1], [3], None):
        dec = codec.StreamDecoder([], learn_blocks=True)
        events, left = decode_chunked(dec, stream, chunks)
        assert left == 0 and ("blocks", (4 << 20) + 8192 + (1 << 30),
                              [("a", 4 << 20, 2 << 20), ("b", 8192, None), ("c", 1 << 30, 1 << 30)]) in events
        assert [(b.idstr, b.length, b.page_size) for b in dec.blocks.values()] == [
            ("a", 4 << 20, 2 << 20), ("b", 8192, 4096), ("c", 1 << 30, 1 << 30)]
    with pytest.raises(codec.ProtocolError, match="unknown RAM block"):
        decode_chunked(codec.StreamDecoder([]), stream)


def test_bench_json():
    r = _tool("bench_precopy.py", "--quick", "--size", "64M", "--transports", "unix", "--page-sizes", "2M",
              "--no-workload", "--json", timeout=240)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"date", "cpus", "size", "repeat", "prealloc", "cases", "all-pass"} <= d.keys()
    assert d["size"] == 64 << 20 and len(d["cases"]) == 2  # page-checksums on, then off
    for c, checks in zip(d["cases"], (True, False)):
        assert {"transport", "page-size", "workload", "page-checksums", "mibps", "ceiling-mibps", "ratio",
                "target", "pass", "downtime-ms", "passes", "transferred", "runs"} <= c.keys()
        assert (c["transport"], c["page-size"], c["workload"], c["page-checksums"]) == ("unix", 2 << 20, False,
                                                                                       checks)
        assert c["transferred"] >= 64 << 20 and c["mibps"] > 0 and c["ceiling-mibps"] > 0
    (ratio,) = d["page-checksums-ratio"]
    assert ratio["median"] == round(d["cases"][0]["mibps"] / d["cases"][1]["mibps"], 3)


def test_bench_json_multifd():
    r = _tool("bench_precopy.py", "--quick", "--size", "64M", "--transports", "tcp", "--page-sizes", "2M",
              "--no-workload", "--page-checksums", "on", "--multifd", "0,2", "--json", timeout=240)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert [c["multifd"] for c in d["cases"]] == [0, 2]
    for c in d["cases"]:
        assert c["transferred"] >= 64 << 20 and c["mibps"] > 0 and c["ceiling-mibps"] > 0
        assert c["mibps-worst"] <= c["mibps"] <= c["mibps-best"]
    assert "multifd 2/single channel" in r.stdout


def test_bench_json_qemu_peer():
    require_qemu()
    r = _tool("bench_precopy.py", "--size", "64M", "--transports", "tcp", "--page-sizes", "4K", "--no-workload",
              "--page-checksums", "off", "--multifd", "0,2", "--peer", "qemu", "--json", timeout=400)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    for c in d["cases"]:
        assert c["qemu-mibps"] > 0 and c["qemu-runs"][0]["transferred"] >= 60 << 20
        assert c["ferry-qemu-ratio"] == round(c["mibps"] / c["qemu-mibps"], 3)
    assert "Ferry/QEMU 7.2, tcp 4 KiB multifd 2" in r.stdout


def test_bench_pagecheck_json():
    r = _tool("bench_pagecheck.py", "--size", "32M", "--repeat", "1", "--json", timeout=240)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(d["source"]) == {f"{shape}: {case}" for shape in ("whole", "fragmented")
                                for case in ("off", "on, guest stopped", "on, guest running (staged)")}
    assert set(d["destination"]) == {"whole: off", "whole: on"}
    assert all(v >= 0 for side in ("source", "source user", "destination") for v in d[side].values())
    assert set(d["source user"]) == set(d["source"])
    assert set(d["ratios"]) == {"source (user) whole, stopped", "source (user) whole, running",
                                "source (user) fragmented, running", "destination whole"}
