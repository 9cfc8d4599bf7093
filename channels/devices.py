"""Device state as opaque bytes: delimited by the framing QEMU gives, never parsed.

A device section (``timer``, ``cpu_common``, ``apic``...) has no length field:
its layout is known only to the device's own code. Ferry therefore keeps the
bytes verbatim and finds where they end only from framing that QEMU itself
provides:

- **precopy**: the non-iterative device sections come after the last RAM
  section and run to EOF, followed by the VM description (vmdesc JSON). The
  vmdesc gives every field's size (and every subsection), so each section's
  payload length follows from it, as QEMU's scripts/analyze-migration.py reads
  it. :class:`DeviceTail` holds those bytes, checked section by section against
  the vmdesc (header, subsection names, footer, EOF).
- **postcopy**: the device sections travel inside PACKAGED, whose length is
  known: the package is LISTEN, the device bytes, then PING and RUN at its end
  (savevm.c postcopy_start). :func:`split_package` takes the commands off both
  ends and keeps the middle.

No footer scanning: a byte 0x7e inside a device's payload is data.
Errors are :class:`~channels.errors.DeviceStateError` naming what could not be
delimited and where.

Follows QEMU 7.2 migration/savevm.c (qemu_savevm_state_complete_precopy_non_iterable,
postcopy_start) and migration/vmstate.c (vmstate_save_state_v, vmsd_desc_field_*).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from . import constants as C
from .errors import DeviceStateError

_be16 = struct.Struct(">H")
_be32 = struct.Struct(">I")
_cmd_hdr = struct.Struct(">BHH")

# A vmdesc nests structs and subsections; QEMU's deepest are a few levels.
MAX_DESC_DEPTH = 64


@dataclass(frozen=True)
class OpaqueSection:
    """One device section, kept verbatim.

    ``raw``: the whole section as on the wire (header, payload, footer), bytes.
    ``payload_size``: bytes between the header and the footer (from the vmdesc;
    None where no vmdesc delimits single sections, e.g. inside PACKAGED).
    """

    section_type: int
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    raw: bytes
    payload_size: int | None = None


@dataclass
class DeviceTail:
    """The device state of a precopy stream: sections, EOF, vmdesc (verbatim).

    ``device_bytes``: the device sections exactly as received (what a PACKAGED
    blob carries between LISTEN and PING); ``vmdesc_raw`` the JSON bytes.
    """

    sections: list[OpaqueSection]
    device_bytes: bytes
    vmdesc: dict
    vmdesc_raw: bytes

    @property
    def idstrs(self) -> list[str]:
        return [s.idstr for s in self.sections]


@dataclass
class Package:
    """A PACKAGED blob split into its leading commands, device bytes, trailing commands.

    Commands are (cmd, payload) pairs; ``device_bytes`` may be empty.
    """

    head: list[tuple[int, bytes]] = field(default_factory=list)
    device_bytes: bytes = b""
    tail: list[tuple[int, bytes]] = field(default_factory=list)


def _desc_payload_size(desc: dict, where: str, depth: int = 0) -> int:
    """Bytes a vmdesc object (section, struct or subsection) says were written.

    ``fields``: each field's ``size`` is one element's bytes; ``array_len``
    elements when the array was compressed (QEMU describes only the first).
    A struct field's size covers the struct with its own subsections.
    ``subsections``: each is u8 0x05, u8 name length, name, be32 version, payload.
    """
    if depth > MAX_DESC_DEPTH:
        raise DeviceStateError(f"vmdesc: {where}: nested more than {MAX_DESC_DEPTH} levels")
    if not isinstance(desc, dict):
        raise DeviceStateError(f"vmdesc: {where}: {type(desc).__name__}, expected an object")
    total = 0
    fields = desc.get("fields", [])
    if not isinstance(fields, list):
        raise DeviceStateError(f"vmdesc: {where}: 'fields' is {type(fields).__name__}, expected a list")
    for i, f in enumerate(fields):
        if not isinstance(f, dict):
            raise DeviceStateError(f"vmdesc: {where} field {i}: not an object")
        size, n = f.get("size"), f.get("array_len", 1)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise DeviceStateError(f"vmdesc: {where} field {f.get('name', i)!r}: size {size!r}, "
                                   "expected a non-negative integer")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise DeviceStateError(f"vmdesc: {where} field {f.get('name', i)!r}: array_len {n!r}")
        total += size * n
    subs = desc.get("subsections", [])
    if not isinstance(subs, list):
        raise DeviceStateError(f"vmdesc: {where}: 'subsections' is {type(subs).__name__}, expected a list")
    for s in subs:
        name = s.get("vmsd_name") if isinstance(s, dict) else None
        if not isinstance(name, str):
            raise DeviceStateError(f"vmdesc: {where}: subsection without a vmsd_name")
        total += 2 + len(name.encode()) + 4 + _desc_payload_size(s, f"{where}/{name}", depth + 1)
    return total


def _check_subsections(buf: bytes, pos: int, desc: dict, where: str, depth: int = 0) -> None:
    """Check that subsection headers sit where the vmdesc puts them (names must match)."""
    p = pos + sum(f["size"] * f.get("array_len", 1) for f in desc.get("fields", []))
    for s in desc.get("subsections", []):
        name = s["vmsd_name"].encode()
        if buf[p:p + 1] != bytes([C.QEMU_VM_SUBSECTION]) or buf[p + 1:p + 2] != bytes([len(name)]) \
                or buf[p + 2:p + 2 + len(name)] != name:
            raise DeviceStateError(f"device section {where}: subsection {s['vmsd_name']!r} not at stream "
                                   f"offset {p} where the vmdesc puts it")
        p += 2 + len(name) + 4
        _check_subsections(buf, p, s, f"{where}/{s['vmsd_name']}", depth + 1)
        p += _desc_payload_size(s, where, depth + 1)


def parse_vmdesc(raw: bytes) -> dict:
    """The vmdesc JSON object; DeviceStateError when it is not one with a 'devices' list."""
    try:
        desc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise DeviceStateError(f"vmdesc: invalid JSON ({e})") from None
    if not isinstance(desc, dict) or not isinstance(desc.get("devices"), list):
        raise DeviceStateError("vmdesc: expected an object with a 'devices' list")
    return desc


def split_sections(data: bytes, vmdesc: dict) -> tuple[list[OpaqueSection], int]:
    """Delimit the FULL device sections at the start of ``data`` with the vmdesc.

    Returns (sections, bytes used). Every section header must name the device
    the vmdesc lists at that place (idstr and instance), its subsections must
    be where the vmdesc puts them, and its footer must follow the payload.
    Raises DeviceStateError naming the section and the stream offset.
    """
    sections = []
    pos = 0
    for i, dev in enumerate(vmdesc["devices"]):
        if not isinstance(dev, dict) or not isinstance(dev.get("name"), str):
            raise DeviceStateError(f"vmdesc: device {i} has no name")
        name = dev["name"]
        if pos + 6 > len(data) or data[pos] not in (C.QEMU_VM_SECTION_FULL, C.QEMU_VM_SECTION_START):
            got = f"byte 0x{data[pos]:02x}" if pos < len(data) else "the end"
            raise DeviceStateError(f"device section {name!r} (vmdesc device {i}): expected a FULL section "
                                   f"header at device offset {pos}, found {got}")
        t, sid = data[pos], _be32.unpack_from(data, pos + 1)[0]
        ln = data[pos + 5]
        hdr = 6 + ln + 8
        if pos + hdr > len(data):
            raise DeviceStateError(f"device section {name!r}: header truncated at device offset {pos}")
        idstr = data[pos + 6:pos + 6 + ln].decode(errors="replace")
        inst = _be32.unpack_from(data, pos + 6 + ln)[0]
        ver = _be32.unpack_from(data, pos + 10 + ln)[0]
        if idstr != name or inst != dev.get("instance_id"):
            raise DeviceStateError(f"device section at device offset {pos}: {idstr!r} instance {inst}, "
                                   f"the vmdesc lists {name!r} instance {dev.get('instance_id')!r} there")
        size = _desc_payload_size(dev, f"{name!r}")
        _check_subsections(data, pos + hdr, dev, repr(name))
        end = pos + hdr + size
        if data[end:end + 1] != bytes([C.QEMU_VM_SECTION_FOOTER]) or data[end + 1:end + 5] != _be32.pack(sid):
            raise DeviceStateError(f"device section {name!r} (section id {sid}): no footer after the "
                                   f"{size} payload bytes the vmdesc gives (device offset {end})")
        end += 5
        sections.append(OpaqueSection(t, sid, idstr, inst, ver, bytes(data[pos:end]), size))
        pos = end
    return sections, pos


def try_device_tail(buf) -> DeviceTail | None:
    """The device tail if ``buf`` (everything from the first device section on) is complete.

    Complete means: it ends with EOF, VMDESCRIPTION, be32 length, and exactly
    that many JSON bytes, and the vmdesc delimits every section up to that EOF.
    None while more bytes may come (the stream does not end with a vmdesc yet).
    Raises DeviceStateError when a complete vmdesc does not delimit the bytes.
    """
    n = len(buf)
    if n < 7 or buf[n - 1] != ord("}"):
        return None
    data = bytes(buf)
    # Where a vmdesc of the right length could start: EOF, 0x06, be32 = what is left.
    p = data.rfind(b"\x00\x06")
    while p >= 0:
        if p + 6 <= n and _be32.unpack_from(data, p + 2)[0] == n - p - 6:
            raw = data[p + 6:]
            if raw[:1] == b"{":
                desc = parse_vmdesc(raw)
                sections, used = split_sections(data[:p], desc)
                if used != p:
                    raise DeviceStateError(f"device state: {p - used} bytes after the last section the vmdesc "
                                           f"describes ({sections[-1].idstr if sections else 'none'!r}), "
                                           "before EOF")
                return DeviceTail(sections, data[:p], desc, raw)
        p = data.rfind(b"\x00\x06", 0, p)
    return None


def tail_error(tail) -> DeviceStateError:
    """The stream ended inside device state (``tail``: its bytes) that no vmdesc delimits."""
    try:
        sid, idstr, inst, _ = first_section(bytes(tail))
        first = f"device section {idstr!r} (section id {sid}, instance {inst})"
    except DeviceStateError:
        first = "the first device section"
    return DeviceStateError(f"device state: the stream ended {len(tail)} bytes after {first} "
                            "without a VM description (vmdesc) that delimits them; device sections have no "
                            "length and Ferry does not guess their end (was the stream saved with "
                            "suppress-vmdesc, or cut short?)")


_PING_LEN = 5 + 4
_RUN = _cmd_hdr.pack(C.QEMU_VM_COMMAND, C.MIG_CMD_POSTCOPY_RUN, 0)
_PING_HDR = _cmd_hdr.pack(C.QEMU_VM_COMMAND, C.MIG_CMD_PING, 4)


def split_package(blob: bytes) -> Package:
    """Split a PACKAGED blob: commands first, device bytes, then PING and RUN.

    Leading commands are read from the front while the next byte is a
    COMMAND; trailing ones from the end: RUN (5 bytes), before it optionally
    PING (9 bytes). The bytes in between must be empty or start with a device
    section header and end with a footer. Raises DeviceStateError otherwise.
    """
    pkg = Package()
    pos, end = 0, len(blob)
    while pos < end and blob[pos] == C.QEMU_VM_COMMAND:
        if pos + 5 > end:
            raise DeviceStateError(f"PACKAGED: command header truncated at byte {pos} of {end}")
        _, cmd, ln = _cmd_hdr.unpack_from(blob, pos)
        if pos + 5 + ln > end:
            raise DeviceStateError(f"PACKAGED: command {C.MIG_CMD_NAMES.get(cmd, cmd)} payload truncated "
                                   f"at byte {pos} of {end}")
        pkg.head.append((cmd, bytes(blob[pos + 5:pos + 5 + ln])))
        pos += 5 + ln
        if cmd == C.MIG_CMD_POSTCOPY_RUN:
            break
    if pkg.head and pkg.head[-1][0] == C.MIG_CMD_POSTCOPY_RUN:
        if pos != end:
            raise DeviceStateError(f"PACKAGED: {end - pos} bytes after POSTCOPY_RUN")
        return pkg
    if end - pos < 5 or bytes(blob[end - 5:end]) != _RUN:
        raise DeviceStateError("PACKAGED: device state not followed by POSTCOPY_RUN at the end of the package; "
                               "its end cannot be delimited")
    end -= 5
    tail = [(C.MIG_CMD_POSTCOPY_RUN, b"")]
    if end - pos >= _PING_LEN and bytes(blob[end - _PING_LEN:end - 4]) == _PING_HDR:
        tail.insert(0, (C.MIG_CMD_PING, bytes(blob[end - 4:end])))
        end -= _PING_LEN
    dev = bytes(blob[pos:end])
    if dev:
        if dev[0] not in (C.QEMU_VM_SECTION_FULL, C.QEMU_VM_SECTION_START) \
                or len(dev) < 5 or dev[-5] != C.QEMU_VM_SECTION_FOOTER:
            raise DeviceStateError(f"PACKAGED: {len(dev)} bytes between the commands are not device sections "
                                   f"(first byte 0x{dev[0]:02x}, no footer at their end)")
    pkg.device_bytes = dev
    pkg.tail = tail
    return pkg


def first_section(dev: bytes) -> tuple[int, str, int, int]:
    """(section id, idstr, instance, version) of the section header at the start of ``dev``."""
    if len(dev) < 6:
        raise DeviceStateError(f"device bytes: {len(dev)} bytes, no section header")
    ln = dev[5]
    if len(dev) < 14 + ln:
        raise DeviceStateError("device bytes: section header truncated")
    return (_be32.unpack_from(dev, 1)[0], dev[6:6 + ln].decode(errors="replace"),
            _be32.unpack_from(dev, 6 + ln)[0], _be32.unpack_from(dev, 10 + ln)[0])


@dataclass
class GuestDevices:
    """A guest's non-RAM state as a QEMU stream carried it, verbatim, to hand on unchanged.

    ``configuration``: the whole CONFIGURATION record (None if the stream had
    none); ``device_bytes``: the device sections (precopy tail before EOF, or a
    package's middle); ``vmdesc_raw``: the vmdesc JSON bytes (None in
    postcopy); ``ram_section_id``: the id the source gave its ``ram`` section;
    ``sections``: idstrs of the sections, where a vmdesc delimited them.
    """

    configuration: bytes | None = None
    device_bytes: bytes = b""
    vmdesc_raw: bytes | None = None
    ram_section_id: int | None = None
    sections: list[str] = field(default_factory=list)

    def section_ids(self) -> set[int]:
        """Section ids the device sections use (from the vmdesc walk, or the first header)."""
        if not self.device_bytes:
            return set()
        if self.vmdesc_raw is not None:
            secs, _ = split_sections(self.device_bytes, parse_vmdesc(self.vmdesc_raw))
            return {s.section_id for s in secs}
        return {first_section(self.device_bytes)[0]}
