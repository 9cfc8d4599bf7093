"""engine/uffd.py against the kernel: real registered memory, real faulting threads."""
import ctypes
import errno
import mmap
import os
import threading
import time

import numpy as np
import pytest

from ferry_migrate.engine import uffd as U

REASON = U.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"userfaultfd unavailable: {REASON}")
PAGE = 4096


def test_ioctl_numbers_are_the_kernels():
    # Values of include/uapi/linux/userfaultfd.h and fs.h as the kernel computes them.
    assert U.UFFDIO_API == 0xC018AA3F
    assert U.UFFDIO_REGISTER == 0xC020AA00
    assert U.UFFDIO_UNREGISTER == 0x8010AA01
    assert U.UFFDIO_WAKE == 0x8010AA02
    assert U.UFFDIO_COPY == 0xC028AA03
    assert U.UFFDIO_ZEROPAGE == 0xC020AA04
    assert U.UFFDIO_WRITEPROTECT == 0xC018AA06
    assert U.USERFAULTFD_IOC_NEW == 0xAA00
    assert U.PAGEMAP_SCAN == 0xC0606610


class Faulter:
    """A thread that reads 8 bytes at an address (ctypes: the GIL is released while it is stopped)."""

    def __init__(self, addr):
        self.buf = ctypes.create_string_buffer(8)
        self.t = threading.Thread(target=ctypes.memmove, args=(self.buf, addr, 8), daemon=True)
        self.t.start()

    def value(self, timeout=30):
        self.t.join(timeout)
        assert not self.t.is_alive(), "faulting thread was never woken"
        return bytes(self.buf.raw)


def anon(npages):
    m = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


def wait_fault(uf, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = uf.read_events(1.0)
        if len(ev):
            return ev
    raise AssertionError("no fault message")


def test_fault_served_by_copy_and_zeropage():
    m, base = anon(8)
    src = np.arange(PAGE // 8, dtype=np.uint64) + 7
    with U.Userfaultfd(U.F["THREAD_ID"]) as uf:
        uf.register(base, 8 * PAGE)
        f = Faulter(base + 3 * PAGE + 16)
        ev = wait_fault(uf)
        assert ev["event"][0] == U.UFFD_EVENT_PAGEFAULT
        assert int(ev["a1"][0]) & ~(PAGE - 1) == base + 3 * PAGE
        assert not int(ev["a0"][0]) & U.UFFD_PAGEFAULT_FLAG_WRITE
        assert int(ev["a2"][0]) & 0xFFFFFFFF == f.t.native_id
        uf.copy(base + 3 * PAGE, src.ctypes.data, PAGE)
        assert f.value() == src[2:3].tobytes()
        g = Faulter(base + 5 * PAGE)
        ev = wait_fault(uf)
        uf.zeropage(base + 5 * PAGE, PAGE)
        assert g.value() == bytes(8)


def test_second_copy_is_page_exists_and_wake_unblocks():
    m, base = anon(4)
    src = np.full(PAGE, 0xAB, np.uint8)
    with U.Userfaultfd() as uf:
        uf.register(base, 4 * PAGE)
        uf.copy(base, src.ctypes.data, PAGE)
        with pytest.raises(U.UffdPageExists) as ei:
            uf.copy(base, src.ctypes.data, PAGE)
        assert ei.value.errno == errno.EEXIST and "UFFDIO_COPY" in str(ei.value)
        # DONTWAKE: the page is there but the faulting thread sleeps until WAKE.
        f = Faulter(base + PAGE)
        wait_fault(uf)
        uf.copy(base + PAGE, src.ctypes.data, PAGE, wake=False)
        f.t.join(0.3)
        assert f.t.is_alive()
        uf.wake(base + PAGE, PAGE)
        assert f.value() == bytes([0xAB]) * 8


def test_copy_outside_registered_range_is_named():
    m, base = anon(4)
    m2, other = anon(1)
    src = np.zeros(PAGE, np.uint8)
    with U.Userfaultfd() as uf:
        uf.register(base, 4 * PAGE)
        with pytest.raises(U.UffdRangeGone) as ei:
            uf.copy(other, src.ctypes.data, PAGE)
        assert f"0x{other:x}" in str(ei.value)
        with pytest.raises(U.UffdError):
            uf.register(base + 1, PAGE)  # not page aligned: EINVAL


def test_feature_missing_is_named():
    with pytest.raises(U.UffdFeatureMissing, match="lacks"):
        U.Userfaultfd(1 << 60)


def test_memfd_punch_hole_faults_again_and_remove_event():
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4 * PAGE)
    m = mmap.mmap(fd, 4 * PAGE, flags=mmap.MAP_SHARED)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    src = np.full(PAGE, 5, np.uint8)
    with U.Userfaultfd(U.F["MISSING_SHMEM"] | U.F["EVENT_REMOVE"]) as uf:
        uf.register(base, 4 * PAGE)
        uf.copy(base + PAGE, src.ctypes.data, PAGE)
        assert m[PAGE] == 5
        # A discard: MADV_REMOVE drops the page (REMOVE event, the madvise waits until it is read;
        # through ctypes, which lets go of the GIL while it waits, unlike mmap.madvise).
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        t = threading.Thread(target=libc.madvise, args=(base + PAGE, PAGE, mmap.MADV_REMOVE), daemon=True)
        t.start()
        ev = wait_fault(uf)
        assert ev["event"][0] == U.UFFD_EVENT_REMOVE
        assert (int(ev["a0"][0]), int(ev["a1"][0])) == (base + PAGE, base + 2 * PAGE)
        t.join(10)
        f = Faulter(base + PAGE)  # gone for real: a MISSING fault again
        ev = wait_fault(uf)
        assert ev["event"][0] == U.UFFD_EVENT_PAGEFAULT
        uf.zeropage(base + PAGE, PAGE)
        assert f.value() == bytes(8)
    # punch_hole on the file does the same without a mapping.
    m[0] = 9
    U.punch_hole(fd, 0, PAGE)
    assert m[0] == 0
    m.close()
    os.close(fd)


def test_async_write_protect_pagemap_scan():
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, 16 * PAGE)
    m = mmap.mmap(fd, 16 * PAGE, flags=mmap.MAP_SHARED)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    m[:] = b"\1" * (16 * PAGE)
    feats = U.F["WP_ASYNC"] | U.F["WP_HUGETLBFS_SHMEM"] | U.F["WP_UNPOPULATED"]
    with U.Userfaultfd(feats) as uf:
        uf.register(base, 16 * PAGE, missing=False, wp=True)
        uf.writeprotect(base, 16 * PAGE)
        sc = U.PagemapScanner()
        assert len(sc.collect(base, base + 16 * PAGE)) == 0
        m[2 * PAGE] = 7
        m[5 * PAGE + 9] = 7
        m[6 * PAGE] = 7
        got = sc.collect(base, base + 16 * PAGE)
        assert [(int(a) - base) // PAGE for a in got[:, 0]] == [2, 5]
        assert [(int(b) - base) // PAGE for b in got[:, 1]] == [3, 7]
        assert len(sc.collect(base, base + 16 * PAGE)) == 0  # re-protected by the scan
        sc.close()
    m.close()
    os.close(fd)


def test_permission_error_says_what_to_change():
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        if f.read().strip() != "0":
            pytest.skip("vm.unprivileged_userfaultfd=1: an unprivileged user may open a uffd")
    if os.path.exists("/dev/userfaultfd") and os.stat("/dev/userfaultfd").st_mode & 0o006:
        pytest.skip("/dev/userfaultfd is world-accessible")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child drops to user nobody and tries
        try:
            os.setgid(65534)
            os.setuid(65534)
            U._supported = None
            U.supported()
            msg = b"OPENED"
        except U.UffdPermissionError as e:
            msg = b"PERM " + str(e).encode()
        except BaseException as e:  # noqa: BLE001
            msg = repr(e).encode()
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    assert out.startswith("PERM"), out
    assert "vm.unprivileged_userfaultfd" in out and "/dev/userfaultfd" in out


HUGE = 2 << 20


@pytest.fixture
def huge_pages():
    """Reserve 2 huge pages of 2 MiB for the test and give them back after."""
    path = "/proc/sys/vm/nr_hugepages"
    from ferry_migrate.engine.ram import hugepage_status
    _, total = hugepage_status(HUGE)
    added = max(0, 2 - _available_huge())
    try:
        if added:
            with open(path, "w") as f:
                f.write(str(total + added))
    except OSError as e:
        pytest.skip(f"cannot reserve huge pages: {e}")
    if _available_huge() < 2:
        _give_back(path, added)
        pytest.skip("2 MiB huge pages could not be reserved")
    yield
    _give_back(path, added)


def _available_huge() -> int:
    """Free 2 MiB pages not yet promised to a mapping (free - resv): others' tests use them too."""
    d = "/sys/kernel/mm/hugepages/hugepages-2048kB"
    try:
        with open(f"{d}/free_hugepages") as f, open(f"{d}/resv_hugepages") as g:
            return int(f.read()) - int(g.read())
    except OSError:
        return 0


def _give_back(path, added):
    if added:
        from ferry_migrate.engine.ram import hugepage_status
        _, total = hugepage_status(HUGE)
        with open(path, "w") as f:
            f.write(str(max(0, total - added)))


def test_hugetlb_copy_whole_huge_page(huge_pages):
    fd = os.memfd_create("h", os.MFD_CLOEXEC | os.MFD_HUGETLB | (21 << 26))
    os.ftruncate(fd, 2 * HUGE)
    try:
        m = mmap.mmap(fd, 2 * HUGE, flags=mmap.MAP_SHARED)
    except OSError as e:
        os.close(fd)
        pytest.skip(f"huge pages taken by other processes on this host: {e}")
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    tmp = np.zeros(HUGE, np.uint8)
    tmp[::PAGE] = 3
    with U.Userfaultfd(U.F["MISSING_HUGETLBFS"]) as uf:
        uf.register(base, 2 * HUGE)
        f = Faulter(base + HUGE + 5 * PAGE)
        ev = wait_fault(uf)
        assert int(ev["a1"][0]) & ~(HUGE - 1) == base + HUGE
        uf.copy(base + HUGE, tmp.ctypes.data, HUGE)
        assert f.value() == bytes([3]) + bytes(7)
        with pytest.raises(U.UffdError) as ei:
            uf.zeropage(base, HUGE)  # refused on hugetlb: a zero huge page is a COPY of zeros
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(U.UffdPageExists):
            uf.copy(base + HUGE, tmp.ctypes.data, HUGE)
    del ev
    m.close()
    os.close(fd)
