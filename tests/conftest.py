"""Shared helpers and fixtures for the data-path tests.

Helpers build migration streams with the encoders of channels/codec.py and run
the sans-I/O StreamDecoder over them the way a reader does: a growing buffer,
fed in chunks, decoded from a memoryview of what is buffered.
"""
from __future__ import annotations

import os
import time

import psutil
import pytest

from channels import codec
from channels import constants as C
from channels.codec import NEED_DATA

PAGE = C.TARGET_PAGE_SIZE


# ---------------------------------------------------------------------------
# Event normalisation: turn decoder events into plain, comparable tuples
# ---------------------------------------------------------------------------

def normalize(ev) -> list[tuple]:
    """Plain tuples for one decoder event; a RamRun becomes one tuple per page.

    Copies page data, so the event (and its view into the caller's buffer)
    can be dropped right after.
    """
    if isinstance(ev, codec.RamRun):
        name = ev.block.idstr
        pages = [int(p) for p in ev.pages]
        if ev.data is None:
            return [("zero", name, p) for p in pages]
        assert ev.data.shape == (len(pages), PAGE)
        return [("page", name, p, ev.data[i].tobytes()) for i, p in enumerate(pages)]
    if isinstance(ev, codec.Header):
        return [("header", ev.version)]
    if isinstance(ev, codec.Configuration):
        return [("config", ev.name)]
    if isinstance(ev, codec.SectionStart):
        return [("start", ev.section_type, ev.section_id, ev.idstr, ev.instance_id, ev.version_id)]
    if isinstance(ev, codec.RamBlockList):
        return [("blocks", ev.total, [tuple(b) for b in ev.blocks])]
    if isinstance(ev, codec.RamEOS):
        return [("eos",)]
    if isinstance(ev, codec.PageChecks):
        return [("checks", ev.count)]
    if isinstance(ev, codec.SectionPart):
        return [("part", ev.section_type, ev.section_id)]
    if isinstance(ev, codec.SectionFooter):
        return [("footer", ev.section_id)]
    if isinstance(ev, codec.Command):
        return [("cmd", ev.cmd, bytes(ev.payload))]
    if isinstance(ev, codec.DeviceState):
        return [("dev", ev.idstr, ev.instance_id, ev.version_id, bytes(ev.payload))]
    if isinstance(ev, codec.EndOfStream):
        return [("eof",)]
    if isinstance(ev, codec.VMDescription):
        return [("vmdesc", ev.json)]
    raise AssertionError(f"unexpected event {ev!r}")


def decode_chunked(decoder, data: bytes, chunks=None, run_sizes: list | None = None):
    """Feed ``data`` to ``decoder`` in chunks of the given sizes (cycled; None = all at once).

    Simulates a reader: a bytearray of fed bytes that grows, decoded through
    ``memoryview(buf)[pos:]``; on NEED_DATA the next chunk is fed. Returns
    (normalised events, bytes left undecoded when the data ran out). Page
    runs' lengths are appended to ``run_sizes`` when given.
    """
    buf = bytearray()
    fed = pos = 0
    ci = 0
    events: list[tuple] = []
    sizes = list(chunks) if chunks else [max(1, len(data))]
    while True:
        mv = memoryview(buf)[pos:]
        try:
            ev, n = decoder.next_event(mv)
            need = ev is NEED_DATA
            if need:
                # The decoder must ask for more than it has, or it would never progress.
                assert n > len(mv), f"NEED_DATA {n} with {len(mv)} bytes buffered"
            else:
                assert 0 < n <= len(mv), f"consumed {n} of {len(mv)}"
                if run_sizes is not None and isinstance(ev, codec.RamRun):
                    run_sizes.append(len(ev))
                events.extend(normalize(ev))
                pos += n
            del ev  # drops any view into buf, so buf can grow
        finally:
            mv.release()
        if need:
            if fed >= len(data):
                return events, len(buf) - pos
            step = sizes[ci % len(sizes)]
            ci += 1
            buf += data[fed:fed + step]
            fed += step


def decode_rp_chunked(decoder, data: bytes, chunks=None):
    """Like decode_chunked for a ReturnPathDecoder; returns (messages, leftover)."""
    buf = bytearray()
    fed = pos = 0
    ci = 0
    msgs = []
    sizes = list(chunks) if chunks else [max(1, len(data))]
    while True:
        mv = memoryview(buf)[pos:]
        try:
            msg, n = decoder.next_event(mv)
        finally:
            mv.release()
        if msg is NEED_DATA:
            assert n > len(buf) - pos
            if fed >= len(data):
                return msgs, len(buf) - pos
            step = sizes[ci % len(sizes)]
            ci += 1
            buf += data[fed:fed + step]
            fed += step
        else:
            msgs.append(msg)
            pos += n


def page_bytes(seed: int) -> bytes:
    """A distinct, non-zero 4 KiB page for a seed (cheap to make)."""
    head = seed.to_bytes(8, "big")
    return (head + bytes([(seed * 7 + 1) & 0xFF or 1]) * 8) * (PAGE // 16)


# ---------------------------------------------------------------------------
# Stream builders
# ---------------------------------------------------------------------------

RAM_SID = 0


def ram_prologue(blocks, postcopy: bool = False, header: bool = True) -> bytes:
    """Header + RAM START section (MEM_SIZE block list, EOS, footer).

    ``blocks``: BlockInfo list (what both sides have).
    """
    return ((codec.encode_header() if header else b"")
            + codec.encode_section_start(C.QEMU_VM_SECTION_START, RAM_SID, C.RAM_SECTION_IDSTR,
                                         C.RAM_SECTION_INSTANCE, C.RAM_SECTION_VERSION)
            + codec.encode_ram_mem_size([(b.idstr, b.length, b.page_size) for b in blocks], postcopy)
            + codec.encode_footer(RAM_SID))


def ram_part(records: bytes, end: bool = False) -> bytes:
    """A PART (or END) RAM section around pre-encoded records, with EOS and footer."""
    t = C.QEMU_VM_SECTION_END if end else C.QEMU_VM_SECTION_PART
    return codec.encode_section_part(t, RAM_SID) + records + codec.encode_eos() + codec.encode_footer(RAM_SID)


def device_full(sid: int, idstr: str, version: int, payload: bytes) -> bytes:
    """A FULL device section as PrecopyChannel.device_full writes it."""
    return (codec.encode_section_start(C.QEMU_VM_SECTION_FULL, sid, idstr, 0, version)
            + len(payload).to_bytes(4, "big") + payload + codec.encode_footer(sid))


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

def _own_children():
    """Our child processes, without multiprocessing's long-lived resource tracker."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if "resource_tracker" in cmd or p.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        out.append(p)
    return out


@pytest.fixture
def no_child_processes():
    """Fails the test if it leaves child processes behind (run_local_migration must reap its workers)."""
    before = {p.pid for p in _own_children()}
    yield
    deadline = time.monotonic() + 10
    left = [p for p in _own_children() if p.pid not in before]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in _own_children() if p.pid not in before]
    assert not left, f"child processes left behind: {[(p.pid, p.name()) for p in left]}"



# ---------------------------------------------------------------------------
# Real huge pages
# ---------------------------------------------------------------------------

NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


@pytest.fixture
def hugepages():
    """Reserve 2 MiB huge pages for a test: ``hugepages(n)`` makes n free, or skips.

    Only what is missing is added, as root, and the old reservation is put
    back afterwards, so the host is left as it was.
    """
    from engine.ram import hugepage_status

    M2 = 2 << 20
    old = None

    def reserve(n: int) -> None:
        nonlocal old
        free, total = hugepage_status(M2)
        if free >= n:
            return
        try:
            with open(NR_HUGEPAGES) as f:
                old = int(f.read())
            with open(NR_HUGEPAGES, "w") as f:
                f.write(str(total + n - free))
        except OSError as e:
            pytest.skip(f"needs {n} free 2 MiB huge pages and cannot reserve them ({e.strerror}); "
                        f"as root: echo {total + n - free} > {NR_HUGEPAGES}")
        if hugepage_status(M2)[0] < n:
            pytest.skip(f"needs {n} free 2 MiB huge pages; the kernel reserved only {hugepage_status(M2)[0]}")

    yield reserve
    if old is not None:
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(old))


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

def group_gone(pgid: int) -> bool:
    """True when no process is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False
