"""Shared helpers and fixtures for the data-path tests.

Helpers build migration streams with the encoders of channels/codec.py and run
the sans-I/O StreamDecoder over them the way a reader does: a growing buffer,
fed in chunks, decoded from a memoryview of what is buffered.
"""
from __future__ import annotations

import os
import re
import time

import psutil
import pytest
from hypothesis import HealthCheck, settings

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels.codec import NEED_DATA

PAGE = C.TARGET_PAGE_SIZE


# ---------------------------------------------------------------------------
# CI: no silent skips, more Hypothesis examples
# ---------------------------------------------------------------------------

def in_ci() -> bool:
    """True when the CI environment variable is set (to anything but empty, 0, false or no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# Skip reasons CI may keep (regex searched in the reason -> why the CI machine cannot
# provide it). Any other skip in CI is turned into a failure: .ci/run installs
# everything else the tests need (iproute2, QEMU, ...), and root reserves 2 MiB pages.
CI_ALLOWED_SKIPS = {
    r"1 GiB huge page":
        "a 1 GiB huge page needs 1 GiB of contiguous physical memory, which the kernel can "
        "rarely reserve after boot (hugepagesz=1G on the kernel command line)",
}
_allowed_skips_seen: list[tuple[str, str]] = []


def _skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _ci_refuses_skip(report, where: str) -> None:
    """In CI, turn a skip whose reason is not allow-listed into a failure (in place)."""
    if not in_ci() or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report.longrepr)
    if any(re.search(p, reason) for p in CI_ALLOWED_SKIPS):
        _allowed_skips_seen.append((where, reason))
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped in CI: {reason}\n"
                       "CI must run everything the machine can provide: install what is missing in "
                       ".ci/run, or add the reason (with why CI cannot provide it) to CI_ALLOWED_SKIPS "
                       "in tests/conftest.py")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _ci_refuses_skip(outcome.get_result(), item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _ci_refuses_skip(outcome.get_result(), collector.nodeid)


def pytest_terminal_summary(terminalreporter):
    if in_ci():
        terminalreporter.section("skips CI keeps (CI_ALLOWED_SKIPS)")
        if not _allowed_skips_seen:
            terminalreporter.write_line("none")
        for where, reason in _allowed_skips_seen:
            terminalreporter.write_line(f"{where}: {reason}")


# Hypothesis: "ci" explores more; tests that take max_examples from the profile
# (settings without max_examples, or a multiple of settings.default.max_examples)
# scale with it.
settings.register_profile("dev", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=400, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if in_ci() else "dev")


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

NR_HUGEPAGES_2M = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
NR_HUGEPAGES_1G = "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"
COMPACT_MEMORY = "/proc/sys/vm/compact_memory"


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read())


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


@pytest.fixture
def hugepages():
    """Reserve 2 MiB huge pages for a test: ``hugepages(n)`` makes n free, or skips.

    As root the pool of 2 MiB pages (sysfs, whatever the default huge page size) is
    grown by what is missing, memory compacted once if the kernel falls short, and
    the pages added are given back afterwards, so the host is left as it was (other
    users of the pool keep theirs: only our increment is taken back). In CI a skip
    here is a failure (tests/conftest.py CI_ALLOWED_SKIPS).
    """
    yield from _pool_reserver(2 << 20, NR_HUGEPAGES_2M, "2 MiB huge pages")


@pytest.fixture
def huge_1g():
    """Reserve 1 GiB huge pages: ``huge_1g(n)`` makes n free or skips (the reason names
    "1 GiB huge page", the one skip CI allows: the kernel may not find 1 GiB of contiguous
    memory); the pages added are given back."""
    yield from _pool_reserver(1 << 30, NR_HUGEPAGES_1G, "1 GiB huge pages",
                              "(1 GiB of contiguous physical memory each)")


def _pool_reserver(page_size: int, nr_path: str, what: str, short_why: str = ""):
    """The body of a huge-page fixture: yields ``reserve(n)``, then gives back what it added."""
    from ferry_migrate.engine.ram import hugepage_status

    added = 0

    def reserve(n: int) -> None:
        nonlocal added
        free, _ = hugepage_status(page_size)
        if free >= n:
            return
        try:
            total = _read_int(nr_path)
            want = total + n - free
            _write(nr_path, want)
            added = _read_int(nr_path) - total
            if hugepage_status(page_size)[0] < n:
                _write(COMPACT_MEMORY, 1)  # fragmented memory: compact, then ask again
                _write(nr_path, want)
                added = _read_int(nr_path) - total
        except OSError as e:
            pytest.skip(f"needs {n} free {what} and cannot reserve them ({e.strerror}); "
                        f"as root: echo N > {nr_path}")
        got = hugepage_status(page_size)[0]
        if got < n:
            pytest.skip(f"needs {n} free {what}; the kernel reserved only {got} {short_why}".rstrip())

    yield reserve
    if added > 0:
        _write(nr_path, max(0, _read_int(nr_path) - added))


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


# ---------------------------------------------------------------------------
# Synchronising on states, not on time
# ---------------------------------------------------------------------------

# Syscalls a thread sleeps in when it waits for another Python thread or for time,
# not for I/O: futex (the GIL, locks, Event.wait), nanosleep, clock_nanosleep.
_NOT_IO_SYSCALLS = {"x86_64": {202, 35, 230}, "aarch64": {98, 101, 115}}


def wait_until(pred, timeout: float = 60.0, what: str = "condition", interval: float = 0.005):
    """Poll ``pred()`` until it is true; fail naming ``what`` after ``timeout`` seconds.

    The timeout is a safety net against hangs, far above the expected wait, never the
    thing under test.
    """
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def blocked_in_io(thread) -> bool:
    """True when ``thread`` sleeps in the kernel in an I/O system call (recv, send, poll...).

    Read from /proc/self/task/TID/{stat,syscall}: state S and a syscall that is not a
    futex or a sleep (a thread waiting for the GIL or a lock sleeps in futex).
    """
    import platform

    tid = thread.native_id
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/self/task/{tid}/syscall") as f:
            sc = f.read().split()
    except OSError:
        return False
    if state != "S" or not sc or sc[0] == "running":
        return False
    return int(sc[0]) not in _NOT_IO_SYSCALLS.get(platform.machine(), set())


def wait_blocked_in_io(thread, timeout: float = 60.0) -> None:
    """Wait until ``thread`` is blocked in an I/O system call (twice in a row, to be sure)."""
    wait_until(lambda: blocked_in_io(thread) and (time.sleep(0.01) or blocked_in_io(thread)),
               timeout, f"thread {thread.name} to block in an I/O system call")
