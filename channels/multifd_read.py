"""Reads a multifd channel: packet heads exactly, page data straight into guest memory.

A multifd packet is a head (header, block idstr, offsets, check values: at
most 8.5 KiB) and then the bytes of its data pages (channels/multifd_codec.py).
:class:`PacketReader` reads the head into its small window *exactly*, never
beyond it, so the page bytes that follow are still in the socket; the caller
then hands :meth:`PacketReader.read_pages` an iovec array (one entry per run
of consecutive pages, built in bulk with numpy) and the kernel copies the
page bytes from the socket straight into the guest pages: one ``recvmsg``
with MSG_WAITALL per packet, through libc (ctypes releases the GIL for the
call). No page byte is copied in user space, no Python object is made per
page. QEMU's multifd receiver does the same: ``qio_channel_readv_all`` into
the pages' host addresses (migration/multifd-nocomp.c,
multifd_nocomp_recv).

On a transport without a plain socket (TLS: an SSL object decrypts) the
pages are read with the transport's ``recv_into`` into memoryview slices of
guest memory, one per run: still straight into guest memory.

Errors are those of :class:`~.qemufile.QEMUFileReader` (its subclass):
sticky, PeerTimeout after the receive timeout, ChannelError on a failed
read or after :meth:`shutdown`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket

import numpy as np

from .qemufile import QEMUFileReader
from .transport import IOV_MAX, SocketTransport, Transport

HEAD_BUFFER = 16 << 10  # bytes: the largest packet head is 32 + 255 + 16 * 512 = 8479


class _MsgHdr(ctypes.Structure):
    """struct msghdr (sys/socket.h) on 64-bit Linux."""

    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_recvmsg = _libc.recvmsg
_recvmsg.argtypes = (ctypes.c_int, ctypes.POINTER(_MsgHdr), ctypes.c_int)
_recvmsg.restype = ctypes.c_ssize_t


def recvmsg_waitall(fd: int, iov: np.ndarray) -> int:
    """One ``recvmsg(fd, iov, MSG_WAITALL)``: the bytes read into the memory ``iov`` describes.

    ``iov``: a contiguous IOVEC array (channels/iovec.py) of at most IOV_MAX
    entries; the caller keeps the memory mapped. Returns fewer bytes than
    described when the stream ended, the socket was shut down or its receive
    timeout passed after some bytes (0: none). Raises OSError (EAGAIN: the
    receive timeout passed with nothing read); EINTR is retried.
    """
    hdr = _MsgHdr(None, 0, iov.ctypes.data, len(iov), None, 0, 0)
    while True:
        r = _recvmsg(fd, ctypes.byref(hdr), socket.MSG_WAITALL)
        if r >= 0:
            return r
        e = ctypes.get_errno()
        if e != errno.EINTR:
            raise OSError(e, os.strerror(e))


def advance(iov: np.ndarray, i: int, done: int) -> int:
    """Move ``iov`` (from entry ``i``) past ``done`` bytes, in place; returns the first entry not read whole."""
    cum = np.cumsum(iov["len"][i:])
    k = int(np.searchsorted(cum, done, side="right"))  # entries read whole
    i += k
    if i < len(iov):
        part = done - (int(cum[k - 1]) if k else 0)
        if part:
            iov["base"][i] += np.uint64(part)
            iov["len"][i] -= np.uint64(part)
    return i


class PacketReader(QEMUFileReader):
    """A QEMUFileReader that never reads ahead, and reads page data straight into guest memory.

    ``fill(n)`` reads exactly the bytes missing to ``n`` (MSG_WAITALL on a
    plain socket: one call): the window holds packet heads only, and the
    bytes after a head stay in the socket for :meth:`read_pages`.
    """

    def __init__(self, transport: Transport, name: str = ""):
        super().__init__(transport, bufsize=HEAD_BUFFER, name=name)
        plain = isinstance(transport, SocketTransport) and not getattr(transport, "buffered", False)
        self._sock = transport.sock if plain else None  # TLS and others: transport.recv_into

    @property
    def direct(self) -> bool:
        """True when page data go from the socket to guest memory in one recvmsg per packet."""
        return self._sock is not None

    def _recv(self, need: int) -> int:
        want = self._start + need - self._end
        mv = self._mv[self._end:self._end + want]
        if self._sock is not None:
            return self._sock.recv_into(mv, want, socket.MSG_WAITALL)
        return self.transport.recv_into(mv)

    def read_pages(self, iov: np.ndarray, mem: memoryview, address: int) -> bool:
        """Read exactly the bytes ``iov`` describes from the stream into that memory.

        ``iov``: IOVEC array (advanced in place) pointing into ``mem``, whose
        first byte is at ``address`` (``mem`` is used only on a transport
        without a plain socket). The window must be empty (a head just
        consumed). Returns False when the stream ended first (what was read
        stays where it landed). Raises ChannelError or PeerTimeout (sticky).
        """
        self._check()
        if self._end != self._start:
            raise ValueError(f"{self.name}: read_pages with {self._end - self._start} bytes in the window")
        if self._sock is None:
            return self._read_slices(iov, mem, address)
        fd = self._sock.fileno()
        i, n = 0, len(iov)
        while i < n:
            chunk = iov[i:i + IOV_MAX]
            want = int(chunk["len"].sum())
            try:
                r = recvmsg_waitall(fd, chunk)
            except OSError as e:
                self._read_failed(e)
            if r == 0:
                self._read_ended()
                return False
            self.transferred += r
            i = i + len(chunk) if r == want else advance(iov, i, r)
        return True

    def _read_slices(self, iov: np.ndarray, mem: memoryview, address: int) -> bool:
        offs = (iov["base"] - np.uint64(address)).tolist()
        for off, ln in zip(offs, iov["len"].tolist()):
            view = mem[off:off + ln]
            got = 0
            while got < ln:
                try:
                    r = self.transport.recv_into(view[got:])
                except OSError as e:
                    self._read_failed(e)
                if r == 0:
                    self._read_ended()
                    return False
                got += r
                self.transferred += r
        return True
