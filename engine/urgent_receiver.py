"""A POSTCOPY channel received and placed by a process of its own (postcopy-receiver=process).

With the guest in its own process (engine/guestproc.py, userfaultfd), a
requested page wakes the faulting guest thread the moment UFFDIO_COPY places
it. In the worker that copy waits for the loader thread to get the GIL from
the worker's bulk threads (the PRECOPY loader, the fault thread, the control
plane); on a busy host the GIL's holder may itself wait for a CPU, and the
request trace shows it: ``arrived>decoded`` (docs/performance.md).

Here the POSTCOPY channel's socket, the guest's uffd and its memfds go to a
helper process (``python -m ferry_migrate.engine.urgent_receiver``, started
ahead of its channel so its imports are done; the fds follow over its control
socket with SCM_RIGHTS) whose only thread reads the channel, checks
every run against its page check values (channels/pagecheck.py), assembles
host pages (engine/postcopy.HostPageAssembler) and places each with
UFFDIO_COPY: the guest runs on without the worker taking part. The helper
then tells the worker what it placed over a SOCK_SEQPACKET pair, and a thread
of the worker does the bookkeeping a placement in the worker would have done
(received bits, fingerprints for the digests, request latency and trace,
waiters), off the guest's path.

Messages from the helper (one datagram each):

* ``P`` + :data:`_PLACED` (block index, pages n, arrived, decoded, placed,
  channel bytes so far) + n int64 target pages + n uint64 fingerprints
  (n <= NOTICE_PAGES: a larger host page takes several);
* ``E`` + JSON {"eos": bool, "error": str or null, "kind": exception class, "bytes": channel bytes}:
  the channel ended (EOS or a clean close) or failed; the helper exits.

The worker sends one JSON message first (blocks, channel name, checks,
urgent-thread priority), with the channel's socket, the uffd and the memfds
attached, and closes its end to stop the helper. A host page
still never spans two channels: the helper assembles only what its channel
carries, as a loader thread would.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np

from ferry_migrate.channels.errors import ChannelError, PageIntegrityError, ProtocolError, UnverifiedStreamError

_PLACED = struct.Struct("<IIdddQ")  # block, pages, arrived (NaN: unknown), decoded, placed, channel bytes
_ERRORS = {c.__name__: c for c in (ChannelError, ProtocolError, PageIntegrityError, UnverifiedStreamError)}
# Target pages per placement notice: 64 KiB of pages and fingerprints, under a Unix
# socket's default send buffer (a datagram must fit it whole).
NOTICE_PAGES = 4096
MAX_MESSAGE = 1 << 20  # bytes: the largest datagram read (the spec, a notice)


class UrgentReceiverError(ChannelError):
    """The receiver process ended without saying why (killed, crashed), or could not start."""


class Spawned:
    """A receiver process started ahead of its channel (its imports done by the time one comes).

    Raises UrgentReceiverError if it cannot be started.
    """

    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "ferry_migrate.engine.urgent_receiver",
                                          str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                         stdin=subprocess.DEVNULL, close_fds=True)
        except OSError as e:
            ours.close()
            raise UrgentReceiverError(f"receiver process not started: {e}") from None
        finally:
            theirs.close()
        self.ctl = ours

    def stop(self, timeout: float = 5.0) -> None:
        """Close our end (the process ends when it sees that) and reap it."""
        try:
            self.ctl.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)


class ReceiverProcess:
    """The worker's end of one POSTCOPY channel's receiver process.

    ``dest``: the MigrationDestination; ``placer``: its UffdPlacer (the guest
    process's uffd and memfds); ``transport``: the accepted POSTCOPY
    connection (a socket transport); ``name``: the channel's name.
    Raises UrgentReceiverError if the process cannot be started.
    """

    def __init__(self, dest, placer, transport, name: str, spawned: "Spawned | None" = None):
        self.dest = dest
        self.placer = placer
        self.transport = transport
        self.name = name
        self.bytes = 0
        self.placed_pages = 0
        self.notices = 0
        link = placer.link
        blocks = link.ram.blocks
        cfg = dest.config
        spec = {
            "channel": name,
            "require-checks": bool(dest._require_checks()),
            "uffd-features": int(link.uffd.features),
            "guest-pid": int(link.pid),
            "blocks": [{"index": b.index, "idstr": b.idstr, "length": b.length, "page_size": b.page_size,
                        "backing": b.backing, "address": b.guest_address} for b in blocks],
            "urgent-thread-nice": cfg.param("urgent-thread-nice"),
            "urgent-thread-rt-priority": cfg.param("urgent-thread-rt-priority"),
        }
        sp = spawned or Spawned()
        self.proc, self.ctl = sp.proc, sp.ctl
        try:
            # The channel's socket, the guest's uffd and memfds, with the spec (SCM_RIGHTS).
            socket.send_fds(self.ctl, [json.dumps(spec).encode()],
                            [transport.sock.fileno(), link.uffd.fileno(), *(b.fd for b in blocks)])
        except OSError as e:
            sp.stop()
            raise UrgentReceiverError(f"channel {name}: receiver process pid {sp.proc.pid} did not take the "
                                      f"channel: {e}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def serve(self, ch, asm, gen: int, rx=None) -> None:
        """The worker's thread for this channel: bookkeeping of what the process placed, until it ends.

        Mirrors MigrationDestination._channel_loop: returns at EOS (or a clean
        close once every page is placed); a failure goes to
        ``dest._channel_failed`` (a pause after RUN).
        """
        d = self.dest
        try:
            self._serve(ch, asm)
        except Exception as e:  # noqa: BLE001
            if d._pages_complete:
                return
            if not d._done.is_set() and not d._cancel and d.status not in ("completed", "failed", "cancelled"):
                d._channel_failed(e, gen)
        finally:
            self.stop()
            info = d.stats.extra.get("postcopy-receiver")
            if info is not None:
                info["channels"][self.name] = self.metrics()

    def _serve(self, ch, asm) -> None:
        d = self.dest
        blocks = d.ram.blocks
        while True:
            try:
                msg = self.ctl.recv(MAX_MESSAGE)
            except OSError as e:  # ECONNRESET: it died with our messages unread
                msg, why = b"", f" ({e.strerror or e})"
            else:
                why = ""
            if not msg:
                try:
                    code = self.proc.wait(1.0)
                except subprocess.TimeoutExpired:
                    code = None
                raise UrgentReceiverError(f"channel {self.name}: receiver process pid {self.proc.pid} ended "
                                          f"without a word (exit status {code}){why}")
            kind = msg[:1]
            if kind == b"P":
                b, n, t_arr, t_dec, t_placed, nbytes = _PLACED.unpack_from(msg, 1)
                off = 1 + _PLACED.size
                pages = np.frombuffer(msg, np.int64, n, off)
                fps = np.frombuffer(msg, np.uint64, n, off + 8 * n)
                if b >= len(blocks):
                    raise ProtocolError(f"channel {self.name}: receiver placed pages of block index {b}, "
                                        f"the guest has {len(blocks)} blocks")
                if not d.listening:
                    raise ProtocolError(f"channel {ch.name}: page record before POSTCOPY_LISTEN")
                self.bytes = nbytes
                ch.reader.transferred = nbytes  # the channel's figures: bytes the process read
                self._placed(blocks[b], pages, fps, t_arr, t_dec, t_placed, asm)
            elif kind == b"E":
                end = json.loads(msg[1:])
                self.bytes = max(self.bytes, int(end.get("bytes") or 0))
                ch.reader.transferred = self.bytes
                if end.get("error"):
                    raise _ERRORS.get(end.get("kind"), ProtocolError)(end["error"])
                return  # EOS, or closed between records (the process checked)
            else:
                raise UrgentReceiverError(f"channel {self.name}: receiver process sent message {kind!r}")

    def _placed(self, blk, pages: np.ndarray, fps: np.ndarray, t_arr: float, t_dec: float, t_placed: float,
                asm) -> None:
        """What ReceivedPages.place does after its copy, for pages the process placed at ``t_placed``."""
        rp = self.dest.received
        ch = self.name
        bits = rp.bitmaps[blk.idstr].bits
        fresh = ~bits[pages]
        if not fresh.all():
            pages, fps = pages[fresh], fps[fresh]
            if len(pages) == 0:
                return
        rp.place_started[ch] = t_dec
        rp.fingerprints[blk.idstr][pages] = fps
        self.placer.placed[blk.idstr][pages] = True
        rp.place_done[ch] = t_placed
        rp.place_where[ch] = (blk.index, pages)
        with rp.cond:
            bits[pages] = True
            rp.cond.notify_all()
        tph = blk.tp_per_hp
        asm.pages_placed += len(pages)
        asm.host_pages_placed += max(1, len(pages) // tph)
        self.placed_pages += len(pages)
        self.notices += 1
        trace = self.dest.faults.trace
        if not np.isnan(t_arr):
            for hp in np.unique(pages - pages % tph).tolist():
                if trace.has(blk.index, hp):
                    trace.mark(blk.index, hp, "arrived", t_arr)
        if rp.on_placed is not None:
            rp.on_placed(blk, ch)

    def stop(self, timeout: float = 5.0) -> None:
        """End the process (closing our end tells it to) and reap it."""
        Spawned.stop(self, timeout)

    def metrics(self) -> dict:
        return {"pid": self.proc.pid, "bytes": self.bytes, "pages-placed": self.placed_pages,
                "notices": self.notices, "exit-status": self.proc.poll()}


def start_receiver(dest, transport, name: str) -> ReceiverProcess | None:
    """A receiver process for a POSTCOPY channel if postcopy-receiver is "process" and it can be had.

    It needs the guest in its own process (a UffdPlacer) and a plain socket
    (TLS is read in the worker); otherwise the channel is loaded by a thread
    as before, and ``postcopy-receiver`` in the statistics says why.
    Raises UrgentReceiverError if the process cannot be started.
    """
    if dest.config.param("postcopy-receiver") != "process":
        return None
    from ferry_migrate.channels.transport import SocketTransport
    info = dest.stats.extra.setdefault("postcopy-receiver", {"mode": "process", "channels": {}})
    placer = dest.received.placer
    if placer is None or getattr(placer, "link", None) is None or placer.link.uffd is None:
        info["mode"] = "thread"
        info["why"] = "postcopy-receiver=process needs the guest in its own process (userfaultfd)"
        return None
    if type(transport) is not SocketTransport:
        info["mode"] = "thread"
        info["why"] = f"postcopy-receiver=process needs a plain socket; channel {name} is {type(transport).__name__}"
        return None
    spare, placer.receiver_spare = getattr(placer, "receiver_spare", None), None
    rp = ReceiverProcess(dest, placer, transport, name, spare)
    info["channels"][name] = {"pid": rp.pid}
    if spare is not None:
        prestart(placer)  # warm for the next connection (a recovery)
    return rp


def prestart(placer) -> None:
    """Start a receiver process now for the next POSTCOPY channel of ``placer``'s guest.

    A process takes a few hundred milliseconds to import its modules on a
    busy host; started at the channel's arrival, the first requests would
    wait that long. Kept in ``placer.receiver_spare``; :func:`stop_spare`
    ends it. A failure to start is left for the channel's own start to report.
    """
    try:
        placer.receiver_spare = Spawned()
    except UrgentReceiverError:
        placer.receiver_spare = None


def stop_spare(placer, wait: bool = True) -> None:
    """End a spare receiver process that no channel took (``wait``: and reap it)."""
    sp = getattr(placer, "receiver_spare", None)
    placer.receiver_spare = None
    if sp is None:
        return
    if wait:
        sp.stop()
    else:
        sp.ctl.close()  # it exits when it sees that; subprocess reaps it later


# --- the receiver process ---

class _FakeLink:
    """What UffdPlacer needs of a GuestLink, in the receiver process."""

    def __init__(self, uffd, ram, pid: int):
        self.uffd = uffd
        self.ram = ram
        self.pid = pid

    @property
    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
            return True
        except OSError:
            return False


class _Placing:
    """ReceivedPages' place() in the receiver process: fingerprint, UFFDIO_COPY, tell the worker."""

    def __init__(self, placer, ctl: socket.socket, reader, rx):
        from ferry_migrate.channels.pagecheck import page_fingerprints
        self._fp = page_fingerprints
        self.placer = placer
        self.ctl = ctl
        self.reader = reader
        self.rx = rx

    def place(self, blk, where, data, channel: str = "") -> int:
        t_dec = time.monotonic()
        if isinstance(where, slice):
            pages = np.arange(where.start, where.stop, dtype=np.int64)
        else:
            pages = np.asarray(where, np.int64)
        n = len(pages)
        # The guest may write a page the moment it is mapped: fingerprint the data, not the memory.
        fps = np.zeros(n, np.uint64) if data is None else np.asarray(self._fp(data.view(np.uint64)), np.uint64)
        self.placer.place(blk, where, data)
        t_placed = time.monotonic()
        t_arr = self.rx.last if self.rx is not None and self.rx.last is not None else float("nan")
        for i in range(0, n, NOTICE_PAGES):  # a 1 GiB page is 262144 target pages: several datagrams
            p, f = pages[i:i + NOTICE_PAGES], fps[i:i + NOTICE_PAGES]
            self.ctl.sendall(b"P" + _PLACED.pack(blk.index, len(p), t_arr, t_dec, t_placed, self.reader.transferred)
                             + p.tobytes() + f.tobytes())
        return n


def _receiver_main() -> int:
    """The process: read one POSTCOPY channel, place its pages, tell the worker; see the module's doc."""
    from ferry_migrate.channels import codec
    from ferry_migrate.channels.channel import RamRecvChannel
    from ferry_migrate.channels.qemufile import QEMUFileReader
    from ferry_migrate.channels.transport import SocketTransport

    from . import uffd as U
    from .guestproc import SharedRAMBlock
    from .params import MigrationConfig
    from .postcopy import HostPageAssembler
    from .ram import GuestRAM
    from .rxstamp import stamp_receives
    from .uffd_dest import UffdPlacer
    from .urgent import UrgentThreads

    # The spec comes on the control socket, whose fd number (kept by pass_fds) is our argument.
    try:
        ctl = socket.socket(fileno=int(sys.argv[1]))
    except (IndexError, ValueError, OSError) as e:
        print(f"urgent_receiver: no control socket ({e}); started by a worker only", file=sys.stderr)
        return 2
    try:
        msg, fds, _flags, _addr = socket.recv_fds(ctl, MAX_MESSAGE, 256)
    except OSError:
        return 0
    if not msg:
        return 0  # a spare no channel took
    spec = json.loads(msg)
    name = spec["channel"]

    readers = []  # the channel's reader, once made: its byte count goes with the end

    def end(eos: bool, err: BaseException | None = None) -> None:
        msg = {"eos": eos, "error": None if err is None else str(err),
               "kind": None if err is None else type(err).__name__,
               "bytes": readers[0].transferred if readers else 0}
        try:
            ctl.sendall(b"E" + json.dumps(msg).encode())
        except OSError:
            pass

    try:
        cfg = MigrationConfig()
        cfg.set_parameters({"urgent-thread-nice": spec["urgent-thread-nice"],
                            "urgent-thread-rt-priority": spec["urgent-thread-rt-priority"]})
        UrgentThreads(cfg).enter()
        blocks = [SharedRAMBlock(fd, int(b["address"]), b["idstr"], int(b["length"]), int(b["page_size"]),
                                 b["backing"], int(b["index"])) for fd, b in zip(fds[2:], spec["blocks"])]
        ram = GuestRAM(blocks)
        uffd = U.Userfaultfd(int(spec["uffd-features"]), fd=fds[1])
        placer = UffdPlacer(_FakeLink(uffd, ram, int(spec["guest-pid"])))
        sock = socket.socket(fileno=fds[0])
        transport = SocketTransport(sock, name=name)
        rx = stamp_receives(transport)
        reader = QEMUFileReader(transport, bufsize=1 << 20, name=name)
        reader.idle_timeout = None  # idle while the guest faults on nothing
        readers.append(reader)
        dec = codec.StreamDecoder(ram.infos(), mode="pages", channel_name=name)
        ch = RamRecvChannel(reader, dec, name)
        asm = HostPageAssembler(ram, _Placing(placer, ctl, reader, rx), name, bool(spec["require-checks"]))
        # The worker closing its end stops us: a thread watches for it and cuts the channel.
        # (Modules are imported before the fds come: a spare is ready when its channel is.)
        threading.Thread(target=_watch_worker, args=(ctl, transport), daemon=True).start()
        while True:
            ev = ch.next_event()
            if ev is None:
                if not dec.at_boundary() or asm.busy:
                    raise ProtocolError(f"channel {name}: stream ended before EOS")
                end(False)  # closed between records (QEMU 8.0+ sources send no EOS)
                return 0
            if isinstance(ev, codec.RamEOS):
                end(True)
                return 0
            asm.add(ev)
    except Exception as e:  # noqa: BLE001 - said to the worker, which pauses or fails the migration
        end(False, e)
        return 1


def _watch_worker(ctl: socket.socket, transport) -> None:
    """Worker gone or done (its end closed): stop reading the channel."""
    try:
        while ctl.recv(16):
            pass
    except OSError:
        pass
    transport.shutdown()


if __name__ == "__main__":
    sys.exit(_receiver_main())
