"""What a source puts on the wire for its peer, outside the RAM pages (engine/peer.py decides which).

Small pure helpers the migration thread calls: the CONFIGURATION record, the
``ram`` section id, the device state carried verbatim from a QEMU guest, and
the POSTCOPY channel connections (opened at setup or at the switch, by
preempt dialect). Follows QEMU 7.2 savevm.c (qemu_savevm_state_header,
qemu_savevm_state_complete_precopy_non_iterable) and migration.c.
"""
from __future__ import annotations

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels.channel import PostcopyChannel, PrecopyChannel, postcopy_channel_name
from ferry_migrate.channels.devices import GuestDevices
from ferry_migrate.channels.qemufile import QEMUFileWriter
from ferry_migrate.channels.transport import connect

from .channel_auth import ROLE_POSTCOPY, open_channel
from .peer import PeerFeatures

DIALECT_AT_SETUP = "qemu-7.2"  # preempt-dialect whose POSTCOPY channels open at setup and end with EOS


def configuration_record(peer: PeerFeatures, devices: GuestDevices | None, machine_type: str) -> bytes:
    """CONFIGURATION after the header (empty for a Ferry peer): the guest's own record, verbatim, or one
    naming ``machine_type``."""
    if not peer.configuration:
        return b""
    if devices is not None and devices.configuration is not None:
        return devices.configuration
    return codec.encode_configuration(machine_type)


def ram_section_id(ch: PrecopyChannel, devices: GuestDevices | None) -> int:
    """The ``ram`` section's id: the one the guest's QEMU stream used, else a fresh non-zero one.

    A QEMU destination matches PART/END to handlers by the id their START
    carried; handlers not started answer to 0, so 0 is never used. Ids of
    carried device sections are reserved so Ferry's own sections never reuse them.
    """
    if devices is not None and devices.ram_section_id:
        ch.reserve_section_ids(devices.section_ids() | {devices.ram_section_id})
        return devices.ram_section_id
    return ch.new_section_id()


def carries_devices(devices: GuestDevices | None) -> bool:
    """True when the guest has device state from a QEMU stream to send instead of Ferry's own."""
    return devices is not None and bool(devices.device_bytes)


def carried_precopy_end(devices: GuestDevices) -> bytes:
    """The end of a precopy stream for a carried QEMU guest: its device sections, EOF, its vmdesc."""
    out = devices.device_bytes + codec.encode_eof()
    if devices.vmdesc_raw is not None:
        out += bytes([C.QEMU_VM_VMDESCRIPTION]) + len(devices.vmdesc_raw).to_bytes(4, "big") + devices.vmdesc_raw
    return out


def open_postcopy_channels(uri, n: int, liveness: float | None = None, config=None,
                           **channel_kw) -> list[PostcopyChannel]:
    """Connect ``n`` POSTCOPY channels: further connections to the migration address, in order.

    ``liveness``: the liveness timeout (s) of each connection (channels/transport.py).
    ``config``: the source's MigrationConfig; with it each channel gets TLS and
    the hello as POSTCOPY channel i+1 (engine/channel_auth.py).
    ``channel_kw``: passed to each PostcopyChannel (page check values).
    """
    chans = []
    try:
        for i in range(n):
            try:
                t = (connect(uri, liveness=liveness) if config is None
                     else open_channel(uri, config, ROLE_POSTCOPY, i + 1))
            except ConnectionError as e:
                raise ConnectionError(f"POSTCOPY channel {i + 1} of {n}: {e} (is postcopy-preempt "
                                      "with the same postcopy-channels enabled on the destination?)") from e
            name = postcopy_channel_name(i)
            chans.append(PostcopyChannel(QEMUFileWriter(t, name=name), name, **channel_kw))
    except BaseException:
        for c in chans:
            c.writer.transport.close()
        raise
    return chans
