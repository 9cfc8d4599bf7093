"""Sans-I/O codec of the multifd channels: the init record and the page packets.

Format (docs/protocol.md, "Multifd channels"; constants in channels/constants.py):
a channel opens with an init record naming its id and the channel count,
which the destination answers (the init reply: OK, or its own count when the
counts differ), then carries packets. A
packet names one RAM block, the offsets of its pages (data pages first, then
zero pages), optionally one check value per page (page-checksums), then the
data pages' bytes. QEMU's MultiFDPacket_t (migration/multifd.h, multifd.c)
is the model: a packet number per channel, a SYNC flag that ends a dirty
pass on that channel (MULTIFD_FLAG_SYNC), answered on the main stream by
RAM_SAVE_FLAG_MULTIFD_FLUSH; Ferry adds the pass number to every packet, so
a packet for a pass already synced is caught, and a FIN flag that ends the
channel.

Everything here is pure: :class:`MultifdDecoder` is handed bytes and returns
packets whose page data are views of those bytes (:meth:`~MultifdDecoder.next_packet`),
or a packet's head alone (:meth:`~MultifdDecoder.next_head`: the receiver reads
the page data straight into guest memory); :func:`encode_packet_head` returns
the bytes before the page data (the data go out by reference).
"""
from __future__ import annotations

import struct

import numpy as np

from . import constants as C
from .errors import ProtocolError

PAGE = C.TARGET_PAGE_SIZE
_INIT = struct.Struct(">IIBBHI")
_HEAD = struct.Struct(">IHHIIQII")
assert _INIT.size == C.FERRY_MULTIFD_INIT_SIZE and _HEAD.size == C.FERRY_MULTIFD_HEADER_SIZE
NEED_DATA = None


class MultifdError(ProtocolError):
    """A multifd channel broke the protocol; the message names the channel, the field and the value."""


class MultifdPacketTooLarge(MultifdError):
    """A packet's page count is beyond the packet size (FERRY_MULTIFD_PACKET_PAGES)."""


class MultifdOffsetOutside(MultifdError):
    """A packet's page offset is outside its block (or not target-page aligned, or repeated)."""


class MultifdPassSynced(MultifdError):
    """A packet for a pass whose sync point every channel already passed (or for a pass not yet open)."""


class MultifdChannelTwice(MultifdError):
    """A second connection for a multifd channel id already connected (or an id beyond the channel count)."""


class MultifdChannelMissing(MultifdError):
    """A multifd channel never connected (or its connection ended before its FIN)."""


class MultifdChannelsMismatch(MultifdError):
    """The two sides' multifd-channels differ (``source``, ``destination``: their values)."""

    def __init__(self, message: str, source: int, destination: int):
        super().__init__(message)
        self.source, self.destination = source, destination


def channels_mismatch_text(source: int, destination: int) -> str:
    """The words both sides use for a multifd-channels mismatch (as the channel hello's mismatch says it)."""
    return (f"multifd-channels: source {source}, destination {destination} "
            "(set the same multifd-channels on both sides)")


def encode_init(channel_id: int, channels: int) -> bytes:
    """The init record of multifd channel ``channel_id`` (1..``channels``): 16 bytes."""
    if not 1 <= channel_id <= channels <= 255:
        raise ValueError(f"multifd channel id {channel_id} of {channels}: expected 1 <= id <= channels <= 255")
    return _INIT.pack(C.FERRY_MULTIFD_MAGIC, C.FERRY_MULTIFD_VERSION, channel_id, channels, 0, 0)


def parse_init(buf, channels: int, name: str = "multifd") -> int:
    """The channel id of an init record (16 bytes of ``buf``), checked against ``channels``.

    Raises MultifdError (magic, version), MultifdChannelsMismatch (the
    source's channel count is not ``channels``) or MultifdChannelTwice (an id
    outside 1..channels).
    """
    magic, version, cid, n, r1, r2 = _INIT.unpack_from(buf, 0)
    if magic != C.FERRY_MULTIFD_MAGIC:
        raise MultifdError(f"{name}: init magic 0x{magic:08x}, expected 0x{C.FERRY_MULTIFD_MAGIC:08x}")
    if version != C.FERRY_MULTIFD_VERSION:
        raise MultifdError(f"{name}: init version {version}, expected {C.FERRY_MULTIFD_VERSION}")
    if n != channels:
        raise MultifdChannelsMismatch(f"{name}: {channels_mismatch_text(n, channels)}", n, channels)
    if r1 or r2:
        raise MultifdError(f"{name}: init reserved fields 0x{r1:x} 0x{r2:x}, expected 0")
    if not 1 <= cid <= channels:
        raise MultifdChannelTwice(f"{name}: channel id {cid}, expected 1 to {channels}")
    return cid


def encode_init_reply(status: int, channels: int) -> bytes:
    """The destination's answer to an init record (16 bytes): ``status`` FERRY_MULTIFD_REPLY_OK or
    FERRY_MULTIFD_REPLY_CHANNELS, ``channels`` its own multifd-channels."""
    return _INIT.pack(C.FERRY_MULTIFD_MAGIC, C.FERRY_MULTIFD_VERSION, status, channels, 0, 0)


def parse_init_reply(buf, channels: int, name: str = "multifd") -> None:
    """Check the destination's answer (16 bytes of ``buf``) to the init record of a source with
    ``channels`` multifd channels.

    Raises MultifdChannelsMismatch naming both counts (the destination has
    another multifd-channels), MultifdError for anything else that is not an
    OK reply (magic, version, status).
    """
    magic, version, status, n, r1, r2 = _INIT.unpack_from(buf, 0)
    if magic != C.FERRY_MULTIFD_MAGIC:
        raise MultifdError(f"{name}: init reply magic 0x{magic:08x}, expected 0x{C.FERRY_MULTIFD_MAGIC:08x}")
    if version != C.FERRY_MULTIFD_VERSION:
        raise MultifdError(f"{name}: init reply version {version}, expected {C.FERRY_MULTIFD_VERSION}")
    if status == C.FERRY_MULTIFD_REPLY_CHANNELS or (status == C.FERRY_MULTIFD_REPLY_OK and n != channels):
        raise MultifdChannelsMismatch(f"destination refused the migration: {channels_mismatch_text(channels, n)}",
                                      channels, n)
    if status != C.FERRY_MULTIFD_REPLY_OK or r1 or r2:
        raise MultifdError(f"{name}: init reply status {status} (reserved 0x{r1:x} 0x{r2:x}), expected "
                           f"{C.FERRY_MULTIFD_REPLY_OK} and 0")


def encode_packet_head(flags: int, block: str, pages: np.ndarray, nnormal: int, packet_num: int,
                       pass_: int, checks: np.ndarray | None = None) -> bytes:
    """Header, idstr, offsets and check values of one packet: everything before its page data.

    ``pages``: target-page indices in the block, data pages first (``nnormal``
    of them), then zero pages; ``checks``: one value per entry of ``pages``
    (sets FLAG_CHECKS), or None. The caller sends the ``nnormal`` data pages
    after these bytes, in the order of ``pages``. Raises ValueError for a
    packet beyond FERRY_MULTIFD_PACKET_PAGES.
    """
    n = len(pages)
    if n > C.FERRY_MULTIFD_PACKET_PAGES:
        raise ValueError(f"multifd packet of {n} pages, at most {C.FERRY_MULTIFD_PACKET_PAGES}")
    name = block.encode() if n else b""
    if checks is not None:
        flags |= C.FERRY_MULTIFD_FLAG_CHECKS
    head = _HEAD.pack(C.FERRY_MULTIFD_MAGIC, flags, len(name), nnormal, n - nnormal, packet_num, pass_, 0)
    parts = [head, name, (np.asarray(pages, np.uint64) << np.uint64(C.TARGET_PAGE_BITS)).astype(">u8").tobytes()]
    if checks is not None:
        parts.append(np.asarray(checks, np.uint64).astype(">u8").tobytes())
    return b"".join(parts)


class MultifdPacket:
    """One decoded packet.

    ``block``: BlockInfo (None for a packet without pages); ``pages``: int64
    target-page indices, data pages first; ``nnormal``: how many are data
    pages; ``data``: (nnormal, 4096) uint8 view into the decoder's input (valid
    until that buffer changes), None from :meth:`MultifdDecoder.next_head`; ``checks``: (n,) uint64 or None; ``flags``,
    ``packet_num``, ``pass_`` as on the wire.
    """

    __slots__ = ("flags", "block", "pages", "nnormal", "data", "checks", "packet_num", "pass_")

    def __init__(self, flags, block, pages, nnormal, data, checks, packet_num, pass_):
        self.flags, self.block, self.pages, self.nnormal = flags, block, pages, nnormal
        self.data, self.checks, self.packet_num, self.pass_ = data, checks, packet_num, pass_

    @property
    def sync(self) -> bool:
        return bool(self.flags & C.FERRY_MULTIFD_FLAG_SYNC)

    @property
    def fin(self) -> bool:
        return bool(self.flags & C.FERRY_MULTIFD_FLAG_FIN)

    def __repr__(self):
        return (f"MultifdPacket(#{self.packet_num}, pass {self.pass_}, flags 0x{self.flags:x}, "
                f"{len(self.pages)} pages, {self.nnormal} data)")


class MultifdDecoder:
    """Pure decoder of one multifd channel's packets (after its init record).

    ``blocks``: the destination's BlockInfos; ``name``: the channel's name
    for messages. The decoder checks every packet: magic, flags, page count
    (MultifdPacketTooLarge), block and offsets (MultifdOffsetOutside), packet
    numbers (consecutive from 1), and the pass: a packet must belong to the
    open pass (:attr:`pass_`), which :meth:`advance` moves on once the main
    stream's flush released the channel after its SYNC packet
    (MultifdPassSynced otherwise). After FIN nothing may follow.
    """

    def __init__(self, blocks, name: str = "multifd"):
        self.blocks = {b.idstr: b for b in blocks}
        self.name = name
        self.pass_ = 1  # the open pass: packets of pass 1 (the first, full pass) come first
        self.packet_num = 0  # the last packet's number
        self.synced = False  # the last packet was a SYNC: nothing may follow until advance()
        self.done = False  # FIN seen
        self.offset = 0  # bytes consumed, for messages

    def _err(self, cls, msg: str) -> MultifdError:
        return cls(f"multifd channel {self.name}: {msg} (packet {self.packet_num + 1}, channel offset "
                   f"{self.offset})")

    def advance(self) -> None:
        """The main stream's flush released this channel: the next pass is open."""
        if not self.synced:
            raise self._err(MultifdPassSynced, f"released from pass {self.pass_} before its SYNC packet")
        self.synced = False
        self.pass_ += 1

    def next_packet(self, buf):
        """Decode one packet from ``buf``; returns (MultifdPacket, consumed) or (NEED_DATA, bytes needed)."""
        return self._decode(buf, True)

    def next_head(self, buf):
        """Decode one packet's head from ``buf``: everything but its page data.

        Returns (MultifdPacket with ``data`` None, head bytes consumed) or
        (NEED_DATA, bytes needed); the packet's ``nnormal`` data pages
        (``PAGE * nnormal`` bytes) follow the head on the stream, and the
        caller reads them itself (engine/multifd_recv.py reads them straight
        into guest memory). The same checks as :meth:`next_packet`, all made
        before any page byte is read; the channel offset in messages counts
        the data as read.
        """
        return self._decode(buf, False)

    def _decode(self, buf, with_data: bool):
        if self.done:
            raise self._err(MultifdError, "bytes after the FIN packet")
        if self.synced:
            raise self._err(MultifdPassSynced, f"a packet after the SYNC of pass {self.pass_}, before the "
                                                "main stream's flush released the channel")
        if len(buf) < C.FERRY_MULTIFD_HEADER_SIZE:
            return NEED_DATA, C.FERRY_MULTIFD_HEADER_SIZE
        magic, flags, idlen, nnormal, nzero, num, pass_, rsv = _HEAD.unpack_from(buf, 0)
        if magic != C.FERRY_MULTIFD_MAGIC:
            raise self._err(MultifdError, f"magic 0x{magic:08x}, expected 0x{C.FERRY_MULTIFD_MAGIC:08x}")
        if flags & ~C.FERRY_MULTIFD_FLAGS:
            raise self._err(MultifdError, f"unknown flag bits 0x{flags & ~C.FERRY_MULTIFD_FLAGS:x}")
        if rsv:
            raise self._err(MultifdError, f"reserved field 0x{rsv:x}, expected 0")
        n = nnormal + nzero
        if n > C.FERRY_MULTIFD_PACKET_PAGES:
            raise self._err(MultifdPacketTooLarge, f"{nnormal} data + {nzero} zero pages = {n}, beyond the "
                                                   f"packet size of {C.FERRY_MULTIFD_PACKET_PAGES} pages")
        if num != self.packet_num + 1:
            raise self._err(MultifdError, f"packet number {num}, expected {self.packet_num + 1}")
        if pass_ != self.pass_:
            if pass_ < self.pass_:
                raise self._err(MultifdPassSynced, f"packet for pass {pass_}, already synced (pass {self.pass_} "
                                                   "is open)")
            raise self._err(MultifdPassSynced, f"packet for pass {pass_} while pass {self.pass_} is open (its "
                                               "SYNC not sent)")
        if n == 0 and not flags & (C.FERRY_MULTIFD_FLAG_SYNC | C.FERRY_MULTIFD_FLAG_FIN):
            raise self._err(MultifdError, "a packet without pages, SYNC or FIN")
        if (n == 0) != (idlen == 0):
            raise self._err(MultifdError, f"{n} pages with an idstr of {idlen} bytes")
        checked = bool(flags & C.FERRY_MULTIFD_FLAG_CHECKS)
        pos = C.FERRY_MULTIFD_HEADER_SIZE
        end = pos + idlen + 8 * n * (2 if checked else 1) + (PAGE * nnormal if with_data else 0)
        if len(buf) < end:
            return NEED_DATA, end
        blk = None
        if idlen:
            name = bytes(buf[pos:pos + idlen]).decode("utf-8", "replace")
            blk = self.blocks.get(name)
            if blk is None:
                raise self._err(MultifdError, f"unknown RAM block {name!r}")
        pos += idlen
        offs = np.frombuffer(buf, ">u8", n, pos).astype(np.uint64)
        pos += 8 * n
        if n:
            low = offs & np.uint64(C.TARGET_PAGE_SIZE - 1)
            bad = np.flatnonzero((offs >= np.uint64(blk.length)) | (low != 0))
            if len(bad):
                o = int(offs[bad[0]])
                raise self._err(MultifdOffsetOutside, f"offset 0x{o:x} outside block {blk.idstr!r} (length "
                                                      f"0x{blk.length:x}) or not page-aligned")
        pages = (offs >> np.uint64(C.TARGET_PAGE_BITS)).astype(np.int64)
        if n > 1 and len(np.unique(pages)) != n:
            s = np.sort(pages)
            dup = int(s[np.flatnonzero(s[1:] == s[:-1])[0]]) << C.TARGET_PAGE_BITS
            raise self._err(MultifdOffsetOutside, f"offset 0x{dup:x} of block {blk.idstr!r} twice in one packet")
        checks = None
        if checked:
            checks = np.frombuffer(buf, ">u8", n, pos).astype(np.uint64)
            pos += 8 * n
        data = np.frombuffer(buf, np.uint8, PAGE * nnormal, pos).reshape(nnormal, PAGE) if with_data else None
        self.packet_num = num
        self.offset += end if with_data else end + PAGE * nnormal
        if flags & C.FERRY_MULTIFD_FLAG_SYNC:
            self.synced = True
        if flags & C.FERRY_MULTIFD_FLAG_FIN:
            self.done = True
        return MultifdPacket(flags, blk, pages, nnormal, data, checks, num, pass_), end

