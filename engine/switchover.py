"""The source's two ways out of precopy: stop-and-copy, or the switch to postcopy.

Stop-and-copy (QEMU: migration_completion): the guest is stopped, the last
dirty pages, the guest's device state and EOF go out.

The switch (QEMU: postcopy_start): the guest is stopped, every page dirtied or
not yet sent becomes a whole dirty host page and is discarded on the
destination, then one PACKAGED command carries LISTEN, the guest's device
state, PING and RUN. Whoever calls :func:`send_package` must have entered
``postcopy-active`` first: from the first byte of that package on, the
destination may be running the guest.
"""
from __future__ import annotations

import json

import numpy as np

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels.errors import ChannelError

GUEST_DEVICE = "ferry-guest"  # Ferry's own device section: the workload's state
GUEST_DEVICE_VERSION = 1
PING_RUN = 1  # value of the PING inside the postcopy package
PING_ADMITTED = 2  # value of the PING after POSTCOPY_ADVISE: its PONG means the destination holds all its memory


def vm_description(ram, guest_state_size: int | None = None) -> dict:
    """The JSON description sent after EOF (what analyze-migration.py reads).

    ``guest_state_size``: bytes of the ``ferry-guest`` state (JSON) when that
    section was sent: described as a be32 length and a buffer, so a reader
    walking the fields (QEMU's analyze-migration.py) finds its real size.
    """
    devs = []
    if guest_state_size is not None:
        devs.append({"name": GUEST_DEVICE, "instance_id": 0, "vmsd_name": GUEST_DEVICE,
                     "version": GUEST_DEVICE_VERSION,
                     "fields": [{"name": "length", "type": "uint32", "size": 4},
                                {"name": "state", "type": "buffer", "size": guest_state_size}]})
    return {
        "page_size": C.TARGET_PAGE_SIZE,
        "devices": devs,
        "ram": [{"name": b.idstr, "size": b.length, "page-size": b.page_size} for b in ram.blocks],
    }


def dirty_ranges(bits: np.ndarray) -> list[tuple[int, int]]:
    """(first page, page count) of each run of set bits, in bulk."""
    padded = np.concatenate(([False], bits, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[0::2], edges[1::2]
    return list(zip(starts.tolist(), (ends - starts).tolist()))


def widen_to_host_pages(ram, bitmaps: dict) -> None:
    """A host page is the unit after the switch: one dirty target page makes it all dirty."""
    for b in ram.blocks:
        if b.tp_per_hp > 1:
            bits = bitmaps[b.idstr].bits.reshape(-1, b.tp_per_hp)
            bits[bits.any(axis=1)] = True


def send_discards(ch, ram, bitmaps: dict) -> None:
    """POSTCOPY_RAM_DISCARD for every dirty range (at most 12 ranges per command)."""
    for b in ram.blocks:
        ranges = [(p << C.TARGET_PAGE_BITS, n << C.TARGET_PAGE_BITS)
                  for p, n in dirty_ranges(bitmaps[b.idstr].bits)]
        for cmd in codec.encode_postcopy_discard(b.idstr, ranges):
            ch.send_raw(cmd)


def guest_state_bytes(workload, extra: dict | None = None) -> bytes:
    """The ``ferry-guest`` section payload: the workload's state as JSON."""
    state = dict(workload.state()) if workload is not None else {}
    if extra:
        state.update(extra)
    return json.dumps(state).encode()


def package(device_part: bytes) -> bytes:
    """The PACKAGED command: LISTEN, the device state (sections as they go on the wire), PING, RUN."""
    blob = (codec.encode_postcopy_listen() + device_part
            + codec.encode_ping(PING_RUN) + codec.encode_postcopy_run())
    return codec.encode_packaged(blob)


def guest_device_section(ch, state: bytes) -> bytes:
    """Ferry's own ``ferry-guest`` FULL section with the workload's state."""
    return codec.encode_device_full(ch.new_section_id(), GUEST_DEVICE, GUEST_DEVICE_VERSION, state)


def send_ram_end(ch, section_id: int) -> None:
    """The RAM section's END part (no pages left), its EOS and footer."""
    ch.section_part(section_id, end=True)
    ch.send_eos()
    ch.section_footer(section_id)


def end_postcopy_channels(channels: list, lock, eos: bool = True) -> None:
    """EOS on every POSTCOPY channel, after any page already claimed for it.

    A return-path send that claimed a page holds its channel's lock already
    (taken under ``lock``, the scheduler lock), so EOS cannot overtake it.
    ``eos`` False (QEMU 8.0+ dialect): the channels end without EOS; only flushed.
    """
    if not eos:
        for pc in channels[1:]:
            with pc.lock:
                pc.flush()
        return
    n = len(channels) - 1
    with lock:
        for i, pc in enumerate(channels[1:], 1):
            with pc.lock:
                try:
                    pc.send_eos()
                    pc.flush()
                except ChannelError as e:
                    # A destination without postcopy-preempt refuses the extra
                    # connection; the source learns it here at the latest.
                    raise ChannelError(f"POSTCOPY channel {i} of {n}: {e} (is postcopy-preempt with the same "
                                       "postcopy-channels enabled on the destination?)") from e
