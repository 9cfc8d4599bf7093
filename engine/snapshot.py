"""Saved VMs as guests: a QEMU-saved stream or Ferry's indexed image as a source's guest.

Two file kinds:

- a **sequential stream** as QEMU saves it (``migrate exec:cat > FILE``, or a Ferry
  ``file:`` stream): pages in stream order, possibly several versions of a page,
  device state at the end. Serving page requests needs random access, so loading
  one first builds the guest in memory (a Ferry destination reading the file,
  taking its RAM layout); that time is reported as ``index-time``.
- an **indexed image** (:func:`write_image`): every page of a block at a fixed
  offset (as QEMU's mapped-ram format does), zero pages left as holes, plus the
  device bytes, CONFIGURATION and vmdesc kept verbatim. Loading one maps the file
  (MAP_PRIVATE): the guest is ready at once and pages are read when sent.

Image layout (all integers big-endian)::

    "FERRYIMG"  be32 version 1  be32 header length  header JSON  (padding)
    block data, each block at a 2 MiB aligned offset, length = the block's used length
    device bytes, vmdesc bytes (offsets in the header)

Errors: :class:`SnapshotError` naming the file, the field and the value.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import time

import numpy as np

from ferry_migrate.channels import constants as C
from ferry_migrate.channels.devices import GuestDevices

from .layout import LayoutLimits
from .ram import GuestRAM, RAMBlock

IMAGE_MAGIC = b"FERRYIMG"
IMAGE_VERSION = 1
IMAGE_ALIGN = 2 << 20  # block data offsets: mappable, and 2 MiB host pages stay aligned
_hdr = struct.Struct(">8sII")
WRITE_CHUNK_PAGES = 4096  # pages looked at per write step (16 MiB)


class SnapshotError(ValueError):
    """A snapshot file that cannot be used: the message names the file and what is wrong."""


class ImageRAMBlock(RAMBlock):
    """A RAM block whose memory is a private mapping of an indexed image's block data."""

    def __init__(self, idstr: str, length: int, page_size: int, index: int, fd: int, offset: int):
        self._image = (fd, offset)
        super().__init__(idstr, length, page_size, "anon", index)

    def _map(self) -> mmap.mmap:
        fd, offset = self._image
        # Private: the source only reads; a write (none expected) would not reach the file.
        return mmap.mmap(fd, self.length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=offset)


def is_image(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(IMAGE_MAGIC)) == IMAGE_MAGIC


def load_stream(path: str, limits: LayoutLimits | None = None,
                timeout: float = 3600) -> tuple[GuestRAM, GuestDevices, dict]:
    """Build a guest from a sequential QEMU stream: (ram, devices, info).

    The stream is read by a Ferry destination without a fixed guest (every
    record validated; the latest version of a page wins). ``info`` has
    ``index-time`` (seconds) and ``machine-type``. Raises SnapshotError with the
    destination's error.
    """
    from .destination import MigrationDestination

    t0 = time.monotonic()
    d = MigrationDestination(None, layout=limits)
    d.listen(f"file:{path}")
    d.start()
    status = d.wait(timeout)
    q = d.query()
    if status != "completed":
        if d.ram is not None:
            d.ram.close()
        raise SnapshotError(f"{path}: not a loadable migration stream: {q.get('error-desc', status)}")
    return d.ram, d.devices, {"index-time": time.monotonic() - t0, "machine-type": q.get("machine-type"),
                              "kind": "stream"}


def _align(n: int) -> int:
    return (n + IMAGE_ALIGN - 1) // IMAGE_ALIGN * IMAGE_ALIGN


def write_image(path: str, ram: GuestRAM, devices: GuestDevices) -> dict:
    """Write an indexed image of ``ram`` and ``devices``; returns its header.

    Zero pages are not written (holes in a sparse file); non-zero pages are
    written in runs, straight from guest memory.
    """
    blocks, off = [], 0
    dev = devices.device_bytes or b""
    vmd = devices.vmdesc_raw or b""
    header = {"blocks": [], "configuration": (devices.configuration or b"").hex() or None,
              "ram-section-id": devices.ram_section_id, "sections": devices.sections}
    # Header size first (offsets depend on it): a generous fixed reservation.
    head_room = _align(_hdr.size + 64 * 1024 + 512 * len(ram.blocks))
    off = head_room
    for b in ram.blocks:
        blocks.append({"idstr": b.idstr, "length": b.length, "page-size": b.page_size, "offset": off})
        off = _align(off + b.length)
    header["blocks"] = blocks
    header["device-bytes"] = [off, len(dev)]
    header["vmdesc"] = [off + len(dev), len(vmd)] if devices.vmdesc_raw is not None else None
    raw = json.dumps(header).encode()
    if _hdr.size + len(raw) > head_room:
        raise SnapshotError(f"{path}: header of {len(raw)} bytes does not fit its {head_room} byte reservation")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, off + len(dev) + len(vmd))
        os.pwrite(fd, _hdr.pack(IMAGE_MAGIC, IMAGE_VERSION, len(raw)) + raw, 0)
        for b, meta in zip(ram.blocks, blocks):
            for p in range(0, b.npages, WRITE_CHUNK_PAGES):
                q = min(p + WRITE_CHUNK_PAGES, b.npages)
                nz = b.words[p:q].any(axis=1)
                # Runs of non-zero pages, each one pwrite from guest memory.
                edges = np.flatnonzero(np.diff(np.concatenate(([0], nz.astype(np.int8), [0]))))
                for s, e in zip(edges[0::2].tolist(), edges[1::2].tolist()):
                    a, z = (p + s) * C.TARGET_PAGE_SIZE, (p + e) * C.TARGET_PAGE_SIZE
                    os.pwrite(fd, b.view[a:z], meta["offset"] + a)
        os.pwrite(fd, dev + vmd, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return header


def load_image(path: str) -> tuple[GuestRAM, GuestDevices, dict]:
    """Map an indexed image as a guest: (ram, devices, info); pages are read when touched.

    Raises SnapshotError naming the field when the image is malformed.
    """
    t0 = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, _hdr.size, 0)
        if len(head) < _hdr.size:
            raise SnapshotError(f"{path}: {len(head)} bytes, too short for an image header")
        magic, version, n = _hdr.unpack(head)
        if magic != IMAGE_MAGIC:
            raise SnapshotError(f"{path}: magic {magic!r}, expected {IMAGE_MAGIC!r}")
        if version != IMAGE_VERSION:
            raise SnapshotError(f"{path}: image version {version}, expected {IMAGE_VERSION}")
        try:
            header = json.loads(os.pread(fd, n, _hdr.size))
            metas = header["blocks"]
            dev_off, dev_len = header["device-bytes"]
        except (ValueError, KeyError, TypeError) as e:
            raise SnapshotError(f"{path}: image header unreadable ({e})") from None
        blocks = []
        try:
            for i, m in enumerate(metas):
                if m["offset"] % mmap.ALLOCATIONGRANULARITY or m["offset"] + m["length"] > size:
                    raise SnapshotError(f"{path}: block {m['idstr']!r} at offset {m['offset']} length "
                                        f"{m['length']} outside the file ({size} bytes) or misaligned")
                blocks.append(ImageRAMBlock(m["idstr"], m["length"], m["page-size"], i, fd, m["offset"]))
        except (KeyError, TypeError, ValueError) as e:
            for b in blocks:
                b.close()
            if isinstance(e, SnapshotError):
                raise
            raise SnapshotError(f"{path}: block entry unusable ({e})") from None
        dev = os.pread(fd, dev_len, dev_off)
        vmd = None
        if header.get("vmdesc"):
            vo, vl = header["vmdesc"]
            vmd = os.pread(fd, vl, vo)
    finally:
        os.close(fd)  # the mappings keep the file
    cfg = header.get("configuration")
    devices = GuestDevices(configuration=bytes.fromhex(cfg) if cfg else None, device_bytes=dev,
                           vmdesc_raw=vmd, ram_section_id=header.get("ram-section-id"),
                           sections=header.get("sections") or [])
    return GuestRAM(blocks), devices, {"index-time": time.monotonic() - t0, "kind": "image"}


def load_guest(path: str, limits: LayoutLimits | None = None) -> tuple[GuestRAM, GuestDevices, dict]:
    """An indexed image or a sequential stream, whichever ``path`` is."""
    if is_image(path):
        return load_image(path)
    return load_stream(path, limits)
