"""userfaultfd from Python with ctypes: demand paging done by the kernel.

A process registers a range of its memory with a userfaultfd (uffd); a thread
that touches a page missing there is stopped by the kernel, and a *fault
message* is queued on the uffd. Whoever holds the uffd (the same process, or
another one that received the fd over a Unix socket) fills the page with
UFFDIO_COPY (or UFFDIO_ZEROPAGE), which also wakes the stopped thread. QEMU's
postcopy does exactly this (migration/postcopy-ram.c); so do CRIU's lazy pages
and Firecracker's page fault handler.

Write-protect (UFFDIO_REGISTER_MODE_WP): writes to protected pages fault (or, in
the asynchronous mode UFFD_FEATURE_WP_ASYNC, just mark the page written,
which the PAGEMAP_SCAN ioctl of /proc/PID/pagemap collects and re-protects in
one call: dirty tracking without a fault per write).

Kernel ABI from include/uapi/linux/userfaultfd.h and fs.h (Linux 6.7+ for
PAGEMAP_SCAN and WP_ASYNC). The ioctl numbers are computed with the generic
_IOC encoding, which x86_64 and aarch64 share; only the userfaultfd syscall
number differs between them.

Errors are named: :class:`UffdPermissionError` (EPERM/EACCES: says which knob to
change), :class:`UffdPageExists` (EEXIST: the page is already there; not fatal,
wake the waiter), :class:`UffdRangeGone` (ENOENT/EAGAIN/ESRCH: the target's
memory layout changed or it exited), :class:`UffdFeatureMissing` (a kernel
without a needed feature or ioctl).
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import select

import numpy as np

# --- ioctl encoding (include/uapi/asm-generic/ioctl.h; x86_64 and aarch64 alike) ---
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(d: int, t: int, nr: int, size: int) -> int:
    return (d << 30) | (size << 16) | (t << 8) | nr


def _IO(t, nr):
    return _IOC(_IOC_NONE, t, nr, 0)


def _IOR(t, nr, size):
    return _IOC(_IOC_READ, t, nr, size)


def _IOWR(t, nr, size):
    return _IOC(_IOC_READ | _IOC_WRITE, t, nr, size)


# --- structures (linux/userfaultfd.h) ---
class uffdio_api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class uffdio_zeropage(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


class uffdio_writeprotect(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64)]


# struct uffd_msg (packed, 32 bytes), read in bulk as a numpy record array.
UFFD_MSG_DTYPE = np.dtype([("event", "u1"), ("reserved1", "u1"), ("reserved2", "<u2"), ("reserved3", "<u4"),
                           ("a0", "<u8"), ("a1", "<u8"), ("a2", "<u8")])
UFFD_MSG_SIZE = 32
assert UFFD_MSG_DTYPE.itemsize == UFFD_MSG_SIZE

UFFD_API = 0xAA
UFFDIO = 0xAA  # ioctl type
_UFFDIO_REGISTER = 0x00
_UFFDIO_UNREGISTER = 0x01
_UFFDIO_WAKE = 0x02
_UFFDIO_COPY = 0x03
_UFFDIO_ZEROPAGE = 0x04
_UFFDIO_WRITEPROTECT = 0x06
_UFFDIO_CONTINUE = 0x07
_UFFDIO_API = 0x3F

UFFDIO_API = _IOWR(UFFDIO, _UFFDIO_API, ctypes.sizeof(uffdio_api))  # 0xc018aa3f
UFFDIO_REGISTER = _IOWR(UFFDIO, _UFFDIO_REGISTER, ctypes.sizeof(uffdio_register))  # 0xc020aa00
UFFDIO_UNREGISTER = _IOR(UFFDIO, _UFFDIO_UNREGISTER, ctypes.sizeof(uffdio_range))  # 0x8010aa01
UFFDIO_WAKE = _IOR(UFFDIO, _UFFDIO_WAKE, ctypes.sizeof(uffdio_range))  # 0x8010aa02
UFFDIO_COPY = _IOWR(UFFDIO, _UFFDIO_COPY, ctypes.sizeof(uffdio_copy))  # 0xc028aa03
UFFDIO_ZEROPAGE = _IOWR(UFFDIO, _UFFDIO_ZEROPAGE, ctypes.sizeof(uffdio_zeropage))  # 0xc020aa04
UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, ctypes.sizeof(uffdio_writeprotect))  # 0xc018aa06

USERFAULTFD_IOC = 0xAA
USERFAULTFD_IOC_NEW = _IO(USERFAULTFD_IOC, 0x00)  # /dev/userfaultfd: a new uffd (Linux 6.1+)
UFFD_USER_MODE_ONLY = 1  # userfaultfd() flag: only user-mode faults (unprivileged use)

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2

UFFD_FEATURES = {
    "PAGEFAULT_FLAG_WP": 1 << 0, "EVENT_FORK": 1 << 1, "EVENT_REMAP": 1 << 2, "EVENT_REMOVE": 1 << 3,
    "MISSING_HUGETLBFS": 1 << 4, "MISSING_SHMEM": 1 << 5, "EVENT_UNMAP": 1 << 6, "SIGBUS": 1 << 7,
    "THREAD_ID": 1 << 8, "MINOR_HUGETLBFS": 1 << 9, "MINOR_SHMEM": 1 << 10, "EXACT_ADDRESS": 1 << 11,
    "WP_HUGETLBFS_SHMEM": 1 << 12, "WP_UNPOPULATED": 1 << 13, "POISON": 1 << 14, "WP_ASYNC": 1 << 15,
    "MOVE": 1 << 16,
}
F = UFFD_FEATURES

# --- PAGEMAP_SCAN (linux/fs.h, Linux 6.7+) ---
class page_region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class pm_scan_arg(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint64), ("flags", ctypes.c_uint64), ("start", ctypes.c_uint64),
                ("end", ctypes.c_uint64), ("walk_end", ctypes.c_uint64), ("vec", ctypes.c_uint64),
                ("vec_len", ctypes.c_uint64), ("max_pages", ctypes.c_uint64),
                ("category_inverted", ctypes.c_uint64), ("category_mask", ctypes.c_uint64),
                ("category_anyof_mask", ctypes.c_uint64), ("return_mask", ctypes.c_uint64)]


PAGEMAP_SCAN = _IOWR(ord("f"), 16, ctypes.sizeof(pm_scan_arg))  # 0xc0606610
PM_SCAN_WP_MATCHING = 1 << 0  # write-protect the pages found (atomically with the scan)
PM_SCAN_CHECK_WPASYNC = 1 << 1  # fail unless the range is registered WP with WP_ASYNC
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1

# userfaultfd(2) syscall numbers
SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}

# fallocate(2) flags (linux/falloc.h): drop pages of a shared mapping for real
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


# --- errors ---
class UffdError(OSError):
    """A userfaultfd operation failed; ``errno`` and the operation in the message."""


class UffdPermissionError(UffdError):
    """userfaultfd refused (EPERM/EACCES): the message says what to change."""


class UffdPageExists(UffdError):
    """EEXIST: a page is already mapped at the address. Not fatal: the waiter must be woken."""


class UffdRangeGone(UffdError):
    """ENOENT/EAGAIN/ESRCH: the registered memory changed under the operation or its process exited."""


class UffdFeatureMissing(UffdError):
    """The kernel lacks a userfaultfd feature or ioctl that is needed (the message names it)."""


class UffdBadAddress(UffdError):
    """An address outside every registered range (or not aligned to the range's page size)."""


def _raise(op: str, err: int, detail: str = "") -> None:
    what = f"{op}{': ' + detail if detail else ''}: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})"
    if err in (errno.EPERM, errno.EACCES):
        raise UffdPermissionError(err, what + "; userfaultfd needs root or CAP_SYS_PTRACE, or "
                                  "`sysctl vm.unprivileged_userfaultfd=1`, or read/write access to "
                                  "/dev/userfaultfd (e.g. `chmod 0666 /dev/userfaultfd` or a group for it)")
    if err == errno.EEXIST:
        raise UffdPageExists(err, what)
    if err in (errno.ENOENT, errno.EAGAIN, errno.ESRCH):
        raise UffdRangeGone(err, what)
    if err == errno.ENOSYS:
        raise UffdFeatureMissing(err, what + "; this kernel has no userfaultfd (CONFIG_USERFAULTFD)")
    raise UffdError(err, what)


def _ioctl(fd: int, req: int, arg, op: str, detail: str = "") -> None:
    if _libc.ioctl(fd, req, ctypes.addressof(arg)) < 0:
        _raise(op, ctypes.get_errno(), detail)


def feature_names(mask: int) -> list[str]:
    """Names (UFFD_FEATURE_*) of the bits set in ``mask``."""
    return [n for n, b in UFFD_FEATURES.items() if mask & b]


def _open_raw(flags: int) -> int:
    """A fresh uffd: the syscall, else /dev/userfaultfd (USERFAULTFD_IOC_NEW)."""
    nr = SYS_USERFAULTFD.get(platform.machine())
    err = errno.ENOSYS
    if nr is not None:
        fd = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(flags))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOENT:
            _raise("userfaultfd", err, "syscall refused and no /dev/userfaultfd")
        _raise("open /dev/userfaultfd", e.errno, f"syscall refused too ({os.strerror(err)})")
    try:
        fd = _libc.ioctl(dev, USERFAULTFD_IOC_NEW, ctypes.c_void_p(flags))
        if fd < 0:
            _raise("USERFAULTFD_IOC_NEW", ctypes.get_errno())
        return fd
    finally:
        os.close(dev)


_supported: tuple[int, int] | None = None


def supported() -> tuple[int, int]:
    """(features, ioctls) this kernel offers: UFFDIO_API with features 0 on a probe uffd.

    The probe is needed because UFFDIO_API may be called only once per uffd.
    Raises UffdPermissionError / UffdFeatureMissing when userfaultfd is unusable.
    """
    global _supported
    if _supported is None:
        fd = _open_raw(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            api = uffdio_api(UFFD_API, 0, 0)
            _ioctl(fd, UFFDIO_API, api, "UFFDIO_API")
            _supported = (int(api.features), int(api.ioctls))
        finally:
            os.close(fd)
    return _supported


def unavailable_reason() -> str | None:
    """None when userfaultfd works here, else why not (for test skips and CLI errors)."""
    try:
        supported()
        return None
    except OSError as e:
        return str(e)


class Userfaultfd:
    """One userfaultfd: API handshake, registration, placement, events.

    ``features``: UFFD_FEATURE_* bits that must be enabled; a kernel without one
    of them raises UffdFeatureMissing naming it. ``fd``: adopt a uffd received
    from another process (already past UFFDIO_API; ``features`` then describes it).
    The fd is non-blocking: :meth:`read_events` polls with a timeout.
    """

    def __init__(self, features: int = 0, fd: int | None = None):
        self.closed = False
        if fd is not None:
            self.fd = fd
            self.features = features
            self.ioctls = 0
            return
        have, _ = supported()
        missing = features & ~have
        if missing:
            raise UffdFeatureMissing(errno.EINVAL, "UFFDIO_API: this kernel lacks UFFD_FEATURE_"
                                     + ", UFFD_FEATURE_".join(feature_names(missing)))
        self.fd = _open_raw(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            api = uffdio_api(UFFD_API, features, 0)
            _ioctl(self.fd, UFFDIO_API, api, "UFFDIO_API", f"features {feature_names(features)}")
        except BaseException:
            os.close(self.fd)
            raise
        self.features = int(api.features)
        self.ioctls = int(api.ioctls)

    def fileno(self) -> int:
        return self.fd

    def register(self, addr: int, length: int, missing: bool = True, wp: bool = False) -> int:
        """UFFDIO_REGISTER [addr, addr+length) (bytes, page aligned); returns the range's ioctl mask.

        Raises UffdFeatureMissing when the memory type does not support the mode
        (e.g. WP on shmem without UFFD_FEATURE_WP_HUGETLBFS_SHMEM).
        """
        mode = (UFFDIO_REGISTER_MODE_MISSING if missing else 0) | (UFFDIO_REGISTER_MODE_WP if wp else 0)
        reg = uffdio_register(uffdio_range(addr, length), mode, 0)
        try:
            _ioctl(self.fd, UFFDIO_REGISTER, reg, "UFFDIO_REGISTER", f"0x{addr:x}+0x{length:x} mode {mode}")
        except UffdError as e:
            if e.errno == errno.EINVAL and wp:
                raise UffdFeatureMissing(e.errno, f"{e.strerror}; write-protect on this memory needs "
                                         "UFFD_FEATURE_WP_HUGETLBFS_SHMEM (shmem/hugetlb) and "
                                         "CONFIG_PTE_MARKER_UFFD_WP") from None
            raise
        return int(reg.ioctls)

    def unregister(self, addr: int, length: int) -> None:
        _ioctl(self.fd, UFFDIO_UNREGISTER, uffdio_range(addr, length), "UFFDIO_UNREGISTER")

    def copy(self, dst: int, src: int, length: int, wake: bool = True) -> None:
        """UFFDIO_COPY ``length`` bytes from our address ``src`` to the registered ``dst``.

        Atomically maps the page(s) and, unless ``wake`` is False
        (UFFDIO_COPY_MODE_DONTWAKE), wakes threads faulting on the range.
        Raises UffdPageExists if a page is already mapped there (the caller then
        :meth:`wake`s), UffdRangeGone if the target's memory changed or it exited;
        the error's ``done`` is the bytes placed before it. A partial copy (the
        kernel copies less and says so) is continued here.
        """
        c = uffdio_copy()  # one per call: several loader threads place at once
        done = 0
        while done < length:
            c.dst, c.src, c.len = dst + done, src + done, length - done
            c.mode = 0 if wake else UFFDIO_COPY_MODE_DONTWAKE
            c.copy = 0
            if _libc.ioctl(self.fd, UFFDIO_COPY, ctypes.addressof(c)) == 0:
                return
            err = ctypes.get_errno()
            if err == errno.EAGAIN and c.copy > 0:
                done += c.copy  # partial copy: go on with the rest
                continue
            try:
                _raise("UFFDIO_COPY", err, f"0x{length - done:x} bytes at 0x{dst + done:x}")
            except UffdError as e:
                e.done = done  # bytes placed before the failure (those threads are woken)
                raise

    def zeropage(self, dst: int, length: int, wake: bool = True) -> None:
        """UFFDIO_ZEROPAGE: map zero pages at ``dst`` (not on hugetlb: COPY a zeroed page there)."""
        z = uffdio_zeropage()
        done = 0
        while done < length:
            z.range.start, z.range.len = dst + done, length - done
            z.mode = 0 if wake else UFFDIO_ZEROPAGE_MODE_DONTWAKE
            z.zeropage = 0
            if _libc.ioctl(self.fd, UFFDIO_ZEROPAGE, ctypes.addressof(z)) == 0:
                return
            err = ctypes.get_errno()
            if err == errno.EAGAIN and z.zeropage > 0:
                done += z.zeropage  # partial: go on with the rest
                continue
            try:
                _raise("UFFDIO_ZEROPAGE", err, f"0x{length - done:x} bytes at 0x{dst + done:x}")
            except UffdError as e:
                e.done = done
                raise

    def wake(self, addr: int, length: int) -> None:
        """UFFDIO_WAKE: wake threads faulting in the range (after EEXIST, or DONTWAKE copies)."""
        r = uffdio_range(addr, length)
        if _libc.ioctl(self.fd, UFFDIO_WAKE, ctypes.addressof(r)) < 0:
            _raise("UFFDIO_WAKE", ctypes.get_errno(), f"0x{length:x} bytes at 0x{addr:x}")

    def writeprotect(self, addr: int, length: int, protect: bool = True, wake: bool = True) -> None:
        """UFFDIO_WRITEPROTECT: set (or clear, waking writers unless ``wake`` is False) write-protect."""
        mode = (UFFDIO_WRITEPROTECT_MODE_WP if protect else 0) | (0 if wake else UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
        _ioctl(self.fd, UFFDIO_WRITEPROTECT, uffdio_writeprotect(uffdio_range(addr, length), mode),
               "UFFDIO_WRITEPROTECT", f"0x{length:x} bytes at 0x{addr:x}")

    def read_events(self, timeout: float | None = 0.0, max_events: int = 256) -> np.ndarray:
        """Wait up to ``timeout`` s (None: forever) and read all queued messages in one read.

        Returns a record array of UFFD_MSG_DTYPE (possibly empty). For
        UFFD_EVENT_PAGEFAULT: a0 = flags, a1 = address, a2 & 0xffffffff = thread
        id (UFFD_FEATURE_THREAD_ID); REMOVE/UNMAP: a0 = start, a1 = end.
        A closed uffd raises UffdError (EBADF).
        """
        if timeout != 0.0:
            try:
                r, _, _ = select.select([self.fd], [], [], timeout)
            except (OSError, ValueError) as e:  # closed under us: EBADF (ValueError: fd -1)
                _raise("poll uffd", getattr(e, "errno", None) or errno.EBADF)
            if not r:
                return np.empty(0, UFFD_MSG_DTYPE)
        try:
            buf = os.read(self.fd, UFFD_MSG_SIZE * max_events)
        except BlockingIOError:
            return np.empty(0, UFFD_MSG_DTYPE)
        except OSError as e:
            _raise("read uffd", e.errno)
        return np.frombuffer(buf, UFFD_MSG_DTYPE)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE|KEEP_SIZE): really drop pages of a memfd/hugetlbfs file.

    On shared memory MADV_DONTNEED only unmaps: the page stays in the page
    cache and the next access maps it again without a fault. After a punched
    hole the next access is a MISSING fault.
    """
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) < 0:
        err = ctypes.get_errno()
        raise UffdError(err, f"fallocate PUNCH_HOLE 0x{offset:x}+0x{length:x}: {os.strerror(err)}")


class PagemapScanner:
    """Dirty tracking with async write-protect: PAGEMAP_SCAN on /proc/PID/pagemap.

    The target process's range must be registered with UFFDIO_REGISTER_MODE_WP on
    a uffd with UFFD_FEATURE_WP_ASYNC (and write-protected once). Each
    :meth:`collect` returns the ranges written since the last one and write-
    protects them again, atomically (PM_SCAN_WP_MATCHING): no fault per write
    and no lost write. Granularity is the mapping's page size: on hugetlb a
    write anywhere in a 2 MiB page reports the whole page.
    """

    def __init__(self, pid: int | None = None, max_regions: int = 4096):
        self.fd = os.open(f"/proc/{pid or 'self'}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._vec = (page_region * max_regions)()
        self._arg = pm_scan_arg()
        self._max = max_regions

    def collect(self, start: int, end: int) -> np.ndarray:
        """Written ranges in [start, end) (addresses), re-protected; (n, 2) uint64 [start, end)."""
        a = self._arg
        out = []
        pos = start
        while pos < end:
            a.size, a.flags = ctypes.sizeof(pm_scan_arg), PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
            a.start, a.end, a.walk_end = pos, end, 0
            a.vec, a.vec_len, a.max_pages = ctypes.addressof(self._vec), self._max, 0
            a.category_inverted, a.category_mask = 0, PAGE_IS_WRITTEN
            a.category_anyof_mask, a.return_mask = 0, PAGE_IS_WRITTEN
            n = _libc.ioctl(self.fd, PAGEMAP_SCAN, ctypes.addressof(a))
            if n < 0:
                err = ctypes.get_errno()
                if err in (errno.ENOTTY, errno.EINVAL) and not out:
                    raise UffdFeatureMissing(err, f"PAGEMAP_SCAN: {os.strerror(err)}; needs Linux 6.7+ and the "
                                             "range registered for async write-protect (UFFD_FEATURE_WP_ASYNC)")
                _raise("PAGEMAP_SCAN", err)
            if n:
                out.append(np.frombuffer(self._vec, dtype=np.uint64).reshape(-1, 3)[:n, :2].copy())
            if a.walk_end >= end or a.walk_end <= pos:
                break
            pos = a.walk_end
        return np.concatenate(out) if out else np.empty((0, 2), np.uint64)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
