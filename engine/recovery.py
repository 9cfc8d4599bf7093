"""Postcopy recovery, QEMU-shaped: both sides go on after a fault over new connections.

Source (QEMU: migration.c postcopy_do_resume): connect a new main channel (no
header: the stream goes on), ask for the destination's received bitmap of
every RAM block (MIG_CMD_RECV_BITMAP; the destination answers with
MIG_RP_MSG_RECV_BITMAP and the bitmap), make every page the destination lacks
dirty again (whole host pages), reconnect the POSTCOPY channels, send
MIG_CMD_POSTCOPY_RESUME and wait for MIG_RP_MSG_RESUME_ACK. Then the
background pass and the requests go on.

The destination's side lives in engine/destination.py (``recover``), which
answers the same commands; it sends its pending page requests again after
RESUME, since requests in flight on the old connection are lost.

Any fault during a recovery is the FAIL event of engine/states.py: back to
``postcopy-paused``, ready for another try, any number of times.
"""
from __future__ import annotations

import time

from ferry_migrate.channels import codec
from ferry_migrate.channels.errors import ChannelError

from . import states as ST
from . import switchover as SW
from .channel_auth import ROLE_MAIN, check_plaintext, open_channel

RECOVERY_TIMEOUT = 60.0  # s for the destination's bitmaps and RESUME_ACK


def recover_source(src) -> None:
    """Run a recovery from the source's side (``src``: a postcopy-paused MigrationSource).

    Returns in postcopy-active. Raises ChannelError/ProtocolError on a fault
    (the caller pauses again).
    """
    src._closed_bytes += sum(c.transferred for c in src.channels)
    src._closed_normal += sum(c.normal_pages for c in src.channels)
    src._closed_zero += sum(c.zero_pages for c in src.channels)
    src.channels = []
    check_plaintext(src.config, src.uri, "connecting to")
    transport = open_channel(src.uri, src.config, ROLE_MAIN, 0)
    if hasattr(transport, "tune"):
        transport.tune(sndbuf=src.config.param("precopy-sndbuf"))
    ch = src._main_channel(transport)
    src._start_return_path(transport)
    src.sm.fire(ST.RECOVER, expect=ST.POSTCOPY_PAUSED)
    blocks = src.ram.blocks
    for b in blocks:
        ch.send_raw(codec.encode_recv_bitmap(b.idstr))
    ch.flush()
    rp = src.rp
    if not rp.wait(lambda: len(rp.bitmaps) >= len(blocks), RECOVERY_TIMEOUT):
        src._check()
        raise ChannelError(f"recovery: destination sent {len(rp.bitmaps)} of {len(blocks)} received bitmaps "
                           f"in {RECOVERY_TIMEOUT:.0f} s")
    src._check()
    with src._lock:
        for b in blocks:
            received = rp.bitmaps.get(b.idstr)
            if received is None:
                raise ChannelError(f"recovery: no received bitmap for RAM block {b.idstr!r}")
            src.bitmaps[b.idstr].bits[:] = ~received
        SW.widen_to_host_pages(src.ram, src.bitmaps)
        src.sched.reset_connection()
    n = len(src.sched.blocks) and (src.config.param("postcopy-channels") if src.sched.preempt else 0)
    src._connect_postcopy_channels(n)
    ch.send_raw(codec.encode_postcopy_resume())
    ch.flush()
    if not rp.wait(lambda: rp.resume_ack, RECOVERY_TIMEOUT):
        src._check()
        raise ChannelError(f"recovery: no RESUME_ACK from the destination in {RECOVERY_TIMEOUT:.0f} s")
    src._check()
    src.sm.fire(ST.RESUMED, expect=ST.POSTCOPY_RECOVER)
    src.loop.reset_bandwidth(time.monotonic())
    src._postcopy_tuning()
