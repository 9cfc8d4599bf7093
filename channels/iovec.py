"""Vectored writes from iovec arrays built in bulk with numpy.

A run of page records is, on the wire, header, page, header, page, ...: two
iovec entries per target page. Building them as Python memoryview slices
costs more than sending them; here they are computed with numpy (base
address of guest RAM + page offsets, interleaved with a header array) and
handed to libc's writev through ctypes, which releases the GIL for the call.
No page data is copied and no Python object is made per page.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

import numpy as np

from .transport import IOV_MAX

IOVEC = np.dtype([("base", np.uint64), ("len", np.uint64)])  # struct iovec on 64-bit Linux

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_writev = _libc.writev
_writev.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_writev.restype = ctypes.c_ssize_t


def address(buf) -> int:
    """Address of a buffer's first byte (bytes, bytearray, memoryview, mmap, ndarray)."""
    if isinstance(buf, np.ndarray):
        return buf.ctypes.data
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data if len(buf) else 0


def iovec_of(buf) -> np.ndarray:
    """A one-entry iovec array for a Python buffer."""
    a = np.empty(1, IOVEC)
    a["base"] = address(buf)
    a["len"] = len(buf) if not isinstance(buf, np.ndarray) else buf.nbytes
    return a


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


_sendmsg = _libc.sendmsg
_sendmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_sendmsg.restype = ctypes.c_ssize_t
_MSG_DONTWAIT_NOSIGNAL = 0x40 | 0x4000  # MSG_DONTWAIT | MSG_NOSIGNAL (Linux)


def sendmsg_nowait(fd: int, iov: np.ndarray) -> int:
    """One non-blocking sendmsg of (at most IOV_MAX entries of) ``iov`` on socket ``fd``.

    Returns the bytes the socket took (0 when it takes none now: EAGAIN) and
    advances ``iov`` in place past them, as :func:`writev_all` does; entries
    wholly written are left as they are, so callers pass the array from the
    first entry not yet written (see :func:`advance`). Raises OSError on
    another error (EPIPE, ECONNRESET, ENOTSOCK...).
    """
    chunk = iov[:IOV_MAX]
    hdr = _MsgHdr(None, 0, chunk.ctypes.data, len(chunk), None, 0, 0)
    while True:
        r = _sendmsg(fd, ctypes.byref(hdr), _MSG_DONTWAIT_NOSIGNAL)
        if r >= 0:
            return r
        e = ctypes.get_errno()
        if e == errno.EINTR:
            continue
        if e in (errno.EAGAIN, errno.EWOULDBLOCK):
            return 0
        raise OSError(e, os.strerror(e))


def advance(iov: np.ndarray, i: int, n: int) -> int:
    """``n`` bytes of ``iov`` from entry ``i`` on were written: the index of the first entry
    not wholly written (its base and length moved past the written part)."""
    if n <= 0:
        return i
    chunk = iov[i:i + IOV_MAX]
    cum = np.cumsum(chunk["len"])
    k = int(np.searchsorted(cum, n, side="right"))  # entries written whole
    if k < len(chunk):
        done = n - (int(cum[k - 1]) if k else 0)
        if done:
            iov["base"][i + k] += np.uint64(done)
            iov["len"][i + k] -= np.uint64(done)
    return i + k


def page_iovec(address: int, pages: np.ndarray, page_size: int = 4096) -> np.ndarray:
    """IOVEC array for ``pages`` (page indices, unique) of memory at ``address``: one entry per run of
    consecutive pages, in the order of ``pages`` (the order their bytes go or come on the stream)."""
    pages = np.asarray(pages, np.int64)
    brk = np.flatnonzero(np.diff(pages) != 1) + 1
    first = np.concatenate(([0], brk))
    iov = np.empty(len(first), IOVEC)
    iov["base"] = np.uint64(address) + pages[first].astype(np.uint64) * np.uint64(page_size)
    iov["len"] = np.diff(np.concatenate((first, [len(pages)]))).astype(np.uint64) * np.uint64(page_size)
    return iov


def writev_all(fd: int, iov: np.ndarray) -> int:
    """Write every byte ``iov`` describes to ``fd``; returns the byte count.

    Partial writes are resumed where they stopped (the array is advanced in
    place). The caller keeps the described memory alive during the call.
    """
    i, n, total = 0, len(iov), 0
    while i < n:
        chunk = iov[i:i + IOV_MAX]
        r = _writev(fd, chunk.ctypes.data, len(chunk))
        if r < 0:
            e = ctypes.get_errno()
            if e == errno.EINTR:
                continue
            raise OSError(e, os.strerror(e))
        if r == 0:
            raise OSError(errno.EPIPE, "connection closed while writing")
        total += r
        cum = np.cumsum(chunk["len"])
        k = int(np.searchsorted(cum, r, side="right"))  # entries written whole
        i += k
        if k < len(chunk):
            done = r - (int(cum[k - 1]) if k else 0)
            if done:
                iov["base"][i] += np.uint64(done)
                iov["len"][i] -= np.uint64(done)
    return total
