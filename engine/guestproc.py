"""A guest in its own process, whose memory the kernel faults in through userfaultfd.

``ferry guest`` (this module's :func:`guest_main`) runs the workload
(engine/workload.py) in a process of its own over RAM blocks mapped from
memfds (4 KiB pages, or MFD_HUGETLB 2 MiB / 1 GiB pages when reserved). It
connects to its worker over a Unix socket and sends a *hello*: its blocks and
the addresses they are mapped at, with the memfds (and, on a destination, a
userfaultfd registered over those addresses) attached by SCM_RIGHTS, as
CRIU's lazy pages and Firecracker's page fault handler receive theirs.

On the destination (:class:`UffdBackend`):

- the worker maps the same memfds: precopy pages are written through its own
  mapping (the guest is not running yet);
- a discard punches a hole in the memfd (fallocate PUNCH_HOLE), so the guest's
  next access really is a fault;
- from POSTCOPY_LISTEN on, every placement (background or requested) is one
  UFFDIO_COPY of the whole host page into the guest's address space, which
  maps it atomically and wakes the guest threads stopped on it
  (:class:`UffdPlacer`). Zero pages: UFFDIO_ZEROPAGE on 4 KiB memory; on
  hugetlb (where it is refused) a COPY from a zeroed temporary page, as QEMU
  does;
- a fault thread (:class:`UffdFaultServer`) reads the uffd's fault messages in
  bulk and turns each into one page request, deduplicated while in flight
  (engine/postcopy.py FaultHandler.kernel_fault). A guest thread is woken only
  by the COPY of its page: when the migration fails it stays blocked in the
  kernel, never woken without a page.

The guest process checks what it reads: it records the fingerprint
(engine/ram.py) of every page when it first touches it, and the ``check``
command compares those with the source's fingerprints: a page that was not
migrated (or migrated wrong) is a mismatch.

Messages on the socket: a 4-byte little-endian length, a JSON object, then
``payload`` raw bytes when the object says so; replies have ``ok`` (and
``error``).
"""
from __future__ import annotations

import argparse
import array
import ctypes
import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from channels import constants as C

from . import uffd as U
from .ram import GuestRAM, RAMBlock, page_fingerprints, parse_size
from .workload import Workload, WorkloadConfig

HELLO_TIMEOUT = 60.0  # s for a spawned guest process to connect
_MAX_FDS = 64


class GuestProcessError(RuntimeError):
    """The guest process failed to start, answered with an error, or broke the protocol."""


class GuestProcessGone(GuestProcessError):
    """The guest process exited (or closed its socket) while the worker still needed it."""


# --- messages -------------------------------------------------------------

def send_msg(sock: socket.socket, obj: dict, payload: bytes | memoryview = b"", fds: list[int] = ()) -> None:
    """One message: length, JSON, payload; ``fds`` ride along with the first byte (SCM_RIGHTS)."""
    if payload:
        obj = {**obj, "payload": len(payload)}
    head = json.dumps(obj).encode()
    data = struct.pack("<I", len(head)) + head
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)
    if payload:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise GuestProcessGone(f"socket closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket) -> tuple[dict, bytes, list[int]]:
    """(object, payload, received fds). Raises GuestProcessGone at EOF, GuestProcessError on bad framing."""
    fds = array.array("i")
    msg, anc, _flags, _ = sock.recvmsg(4, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    if not msg:
        raise GuestProcessGone("socket closed")
    if len(msg) < 4:
        msg += _recv_exact(sock, 4 - len(msg))
    (n,) = struct.unpack("<I", msg)
    if n > 1 << 20:
        raise GuestProcessError(f"message header of {n} bytes (more than 1 MiB): not a guest-process message")
    try:
        obj = json.loads(_recv_exact(sock, n))
    except ValueError as e:
        raise GuestProcessError(f"message is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise GuestProcessError(f"message is a JSON {type(obj).__name__}, expected an object")
    payload = _recv_exact(sock, int(obj["payload"])) if obj.get("payload") else b""
    return obj, payload, list(fds)


# --- the guest process ----------------------------------------------------

@dataclass
class GuestSpec:
    """The guest process's shape: what ``ferry guest`` is started with."""

    size: int = 64 << 20
    page_size: int = C.PAGE_SIZE_4K
    backing: str = "memfd"  # memfd | hugetlb
    nblocks: int = 1
    fill: str = "mixed"  # source role only
    role: str = "destination"
    workload: dict = field(default_factory=dict)  # WorkloadConfig fields

    def argv(self, connect: str) -> list[str]:
        return ["--connect", connect, "--role", self.role, "--size", str(self.size), "--page-size",
                str(self.page_size), "--backing", self.backing, "--nblocks", str(self.nblocks), "--fill",
                self.fill, "--workload", json.dumps(self.workload)]


GUEST_UFFD_FEATURES = U.F["MISSING_SHMEM"] | U.F["MISSING_HUGETLBFS"] | U.F["THREAD_ID"]
# Source: asynchronous write-protect, collected with PAGEMAP_SCAN (Linux 6.7+).
WP_ASYNC_FEATURES = U.F["WP_ASYNC"] | U.F["WP_HUGETLBFS_SHMEM"] | U.F["WP_UNPOPULATED"]


class GuestProcess:
    """What runs inside ``ferry guest``: RAM, the workload, first-touch fingerprints, commands."""

    def __init__(self, spec: GuestSpec):
        if spec.backing not in ("memfd", "hugetlb"):
            raise ValueError(f"guest process backing {spec.backing!r}: expected memfd or hugetlb "
                             "(memory another process can map)")
        self.spec = spec
        self.ram = GuestRAM.create(spec.size, spec.page_size, spec.backing, spec.nblocks)
        self.uffd: U.Userfaultfd | None = None
        if spec.role == "destination":
            # Kept open here too: if the worker goes away, the registration stays and
            # stopped threads stay stopped (a closed uffd would let them read zeros).
            self.uffd = U.Userfaultfd(GUEST_UFFD_FEATURES)
            for b in self.ram.blocks:
                self.uffd.register(b.address, b.length)
        else:
            self.ram.fill(spec.fill)
            self.tracking, self.tracking_why = self._write_protect()
        self.workload = Workload(self.ram, WorkloadConfig(**spec.workload))
        self.workload.access_hook = self._first_touch
        self.seen = {b.idstr: np.zeros(b.npages, bool) for b in self.ram.blocks}
        self.first_fp = {b.idstr: np.zeros(b.npages, np.uint64) for b in self.ram.blocks}
        self._lock = threading.Lock()
        self._probe = ctypes.create_string_buffer(8)

    def _write_protect(self) -> tuple[str, str]:
        """Source: track writes with async write-protect; else say why the guest's own log is used."""
        try:
            uf = U.Userfaultfd(WP_ASYNC_FEATURES)
        except U.UffdError as e:
            return "dirty-log", str(e)
        try:
            for b in self.ram.blocks:
                uf.register(b.address, b.length, missing=False, wp=True)
                uf.writeprotect(b.address, b.length)  # from now on a write marks the page written
        except U.UffdError as e:
            uf.close()
            return "dirty-log", str(e)
        self.wp_uffd = uf  # kept open: closing it would drop the registration
        return "wp-async", "UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN"

    def hello(self) -> tuple[dict, list[int]]:
        blocks = [{"idstr": b.idstr, "length": b.length, "page_size": b.page_size, "address": b.address,
                   "backing": b.backing} for b in self.ram.blocks]
        fds = [b.fd for b in self.ram.blocks] + ([self.uffd.fd] if self.uffd else [])
        return {"hello": 1, "pid": os.getpid(), "role": self.spec.role, "blocks": blocks,
                "uffd": self.uffd is not None, "uffd_features": self.uffd.features if self.uffd else 0,
                "tracking": getattr(self, "tracking", None), "tracking-why": getattr(self, "tracking_why", None)}, fds

    def _first_touch(self, blk: RAMBlock, pages: np.ndarray) -> None:
        """Before the workload touches ``pages``: fingerprint those it never touched yet.

        The first access of a missing page is a kernel fault; it is made through
        ctypes, which lets go of the GIL, so other guest threads and the command
        thread go on while this one is stopped.
        """
        seen = self.seen[blk.idstr]
        new = pages[~seen[pages]]
        if len(new) == 0:
            return
        base = blk.address
        for p in np.unique(new).tolist():
            ctypes.memmove(self._probe, base + (p << C.TARGET_PAGE_BITS), 8)
        with self._lock:
            new = np.unique(new[~seen[new]])
            self.first_fp[blk.idstr][new] = page_fingerprints(blk.words[new])
            seen[new] = True

    def check(self, expected: bytes) -> dict:
        """Compare first-touch fingerprints with ``expected`` (all blocks' uint64 fingerprints in order)."""
        exp = np.frombuffer(expected, dtype=np.uint64)
        if len(exp) != self.ram.npages:
            raise GuestProcessError(f"check: {len(exp)} fingerprints for a guest of {self.ram.npages} pages")
        out = {"pages-checked": 0, "mismatches": 0, "first-mismatches": []}
        pos = 0
        with self._lock:
            for b in self.ram.blocks:
                e = exp[pos:pos + b.npages]
                pos += b.npages
                s = self.seen[b.idstr]
                bad = np.flatnonzero(s & (self.first_fp[b.idstr] != e))
                out["pages-checked"] += int(s.sum())
                out["mismatches"] += len(bad)
                out["first-mismatches"] += [[b.idstr, int(p) << C.TARGET_PAGE_BITS] for p in bad[:8]]
        return out

    def command(self, obj: dict, payload: bytes) -> tuple[dict, bytes]:
        cmd = obj.get("cmd")
        wl = self.workload
        if cmd == "run":
            wl.restore(obj.get("state") or {})
            wl.start()
        elif cmd == "pause":
            wl.pause()
        elif cmd == "resume":
            wl.resume()
        elif cmd == "state":
            return {"ok": True, "state": wl.state()}, b""
        elif cmd == "progress":
            return {"ok": True, "progress": wl.progress(), "pages-touched": wl.pages_touched}, b""
        elif cmd == "check":
            return {"ok": True, "check": self.check(payload)}, b""
        elif cmd == "dirty":
            # The workload's own log of target pages written (all blocks, one byte each), then cleared.
            with self.ram.dirty_lock:
                data = b"".join(self.ram.dirty_log[b.idstr].raw for b in self.ram.blocks)
                for b in self.ram.blocks:
                    self.ram.dirty_log[b.idstr].clear_all()
            return {"ok": True}, data
        elif cmd == "fingerprints":
            return {"ok": True}, b"".join(b.fingerprints().tobytes() for b in self.ram.blocks)
        elif cmd == "stop":
            wl.stop()
        else:
            raise GuestProcessError(f"unknown command {cmd!r}")
        return {"ok": True}, b""


def guest_main(argv: list[str] | None = None) -> int:
    """``ferry guest``: run a guest process for the worker listening on --connect."""
    ap = argparse.ArgumentParser(prog="ferry guest", description=__doc__.split("\n\n")[0])
    add_guest_arguments(ap)
    return run_guest_command(ap.parse_args(argv))


def add_guest_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--connect", required=True, metavar="PATH", help="the worker's Unix socket")
    ap.add_argument("--role", choices=("source", "destination"), default="destination")
    ap.add_argument("--size", default="64M", help="guest RAM (K/M/G suffix)")
    ap.add_argument("--page-size", default="4K", help="host page size: 4K, 2M or 1G")
    ap.add_argument("--backing", choices=("memfd", "hugetlb"), default="memfd")
    ap.add_argument("--nblocks", type=int, default=1)
    ap.add_argument("--fill", default="mixed", help="initial contents (source role)")
    ap.add_argument("--workload", default="{}", help="WorkloadConfig fields as JSON")


def add_guest_parser(sub) -> None:
    """The ``guest`` subcommand of the ferry CLI."""
    g = sub.add_parser("guest", help="run a guest in its own process (userfaultfd demand paging); "
                       "started by a worker")
    add_guest_arguments(g)
    g.set_defaults(func=run_guest_command)


def run_guest_command(args) -> int:
    from .process import configure_worker_process

    configure_worker_process()  # a thread woken by its page gets the GIL back quickly
    spec = GuestSpec(parse_size(args.size), parse_size(args.page_size), args.backing, args.nblocks, args.fill,
                     args.role, json.loads(args.workload))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.connect)
    try:
        g = GuestProcess(spec)
    except Exception as e:  # noqa: BLE001 - tell the worker why
        send_msg(sock, {"ok": False, "error": f"{type(e).__name__}: {e}"})
        return 1
    hello, fds = g.hello()
    send_msg(sock, hello, fds=fds)
    while True:
        try:
            obj, payload, _ = recv_msg(sock)
        except GuestProcessGone:
            # The worker is gone: threads stopped on missing pages must not go on.
            os._exit(3)
        try:
            reply, data = g.command(obj, payload)
        except Exception as e:  # noqa: BLE001
            reply, data = {"ok": False, "error": f"{type(e).__name__}: {e}"}, b""
        send_msg(sock, reply, data)
        if obj.get("cmd") == "stop":
            break
    sock.close()
    os._exit(0)  # workload threads may be stopped in the kernel on pages never placed


# --- the worker's side ----------------------------------------------------

class SharedRAMBlock(RAMBlock):
    """A RAM block over a memfd received from the guest process (mapped MAP_SHARED)."""

    def __init__(self, fd: int, guest_address: int, idstr: str, length: int, page_size: int, backing: str,
                 index: int):
        self._given_fd = fd
        self.guest_address = guest_address  # where the guest process maps it (for UFFDIO_COPY)
        super().__init__(idstr, length, page_size, backing, index)

    def _map(self):
        import mmap

        self.fd = self._given_fd
        return mmap.mmap(self.fd, self.length, flags=mmap.MAP_SHARED)


class GuestLink:
    """The worker's end of a guest process: spawn, hello, commands, the received fds."""

    def __init__(self, spec: GuestSpec, sock: socket.socket, proc: subprocess.Popen | None, hello: dict,
                 fds: list[int]):
        self.spec = spec
        self.sock = sock
        self.proc = proc
        self.pid = int(hello["pid"])
        self.hello = hello
        self._lock = threading.Lock()
        blocks = hello["blocks"]
        if len(fds) != len(blocks) + (1 if hello.get("uffd") else 0):
            for fd in fds:
                os.close(fd)
            raise GuestProcessError(f"hello: {len(fds)} fds for {len(blocks)} blocks"
                                    f"{' and a uffd' if hello.get('uffd') else ''}")
        rb = [SharedRAMBlock(fds[i], int(b["address"]), b["idstr"], int(b["length"]), int(b["page_size"]),
                             b["backing"], i) for i, b in enumerate(blocks)]
        self.ram = GuestRAM(rb)
        self.uffd = U.Userfaultfd(int(hello.get("uffd_features", 0)), fd=fds[-1]) if hello.get("uffd") else None

    @classmethod
    def spawn(cls, spec: GuestSpec, timeout: float = HELLO_TIMEOUT) -> "GuestLink":
        """Start ``ferry guest`` as a child process and take its hello (and fds)."""
        d = tempfile.mkdtemp(prefix="ferry-guest-")
        path = os.path.join(d, "guest.sock")
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(path)
        ls.listen(1)
        proc = subprocess.Popen([sys.executable, "-m", "engine.guestproc", *spec.argv(path)],
                                stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while True:
                r, _, _ = select.select([ls], [], [], 0.2)
                if r:
                    sock, _ = ls.accept()
                    break
                if proc.poll() is not None:
                    raise GuestProcessGone(f"guest process exited with status {proc.returncode} before it "
                                           "connected")
                if time.monotonic() > deadline:
                    raise GuestProcessError(f"guest process pid {proc.pid} did not connect in {timeout:.0f} s")
            hello, _, fds = recv_msg(sock)
            if not hello.get("hello"):
                raise GuestProcessError(f"guest process failed to start: {hello.get('error', hello)}")
            return cls(spec, sock, proc, hello, fds)
        except BaseException:
            proc.kill()
            proc.wait(10)
            raise
        finally:
            ls.close()
            os.unlink(path)
            os.rmdir(d)

    @property
    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def call(self, cmd: str, payload: bytes = b"", **kw) -> tuple[dict, bytes]:
        """One command, its reply. Raises GuestProcessGone / GuestProcessError (the guest's error)."""
        with self._lock:
            try:
                send_msg(self.sock, {"cmd": cmd, **kw}, payload)
                reply, data, _ = recv_msg(self.sock)
            except OSError as e:
                raise GuestProcessGone(f"guest process pid {self.pid}: {cmd}: {e}") from None
            except GuestProcessGone as e:
                raise GuestProcessGone(f"guest process pid {self.pid} exited during {cmd!r} "
                                       f"(status {self.proc.poll() if self.proc else '?'}): {e}") from None
        if not reply.get("ok"):
            raise GuestProcessError(f"guest process pid {self.pid}: {cmd}: {reply.get('error')}")
        return reply, data

    def check(self, fingerprints: np.ndarray) -> dict:
        """The guest's own check of what it read against the source's ``fingerprints`` (all pages)."""
        return self.call("check", np.ascontiguousarray(fingerprints, np.uint64).tobytes())[0]["check"]

    def close(self, timeout: float = 10.0) -> None:
        """Stop the guest process (stop command, then kill) and drop the fds."""
        try:
            if self.alive:
                self.call("stop")
        except GuestProcessError:
            pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.sock.close()
        if self.uffd is not None:
            self.uffd.close()
        self.ram.close()


class GuestProcessWorkload:
    """The guest process seen as a Workload by MigrationSource / MigrationDestination."""

    def __init__(self, link: GuestLink):
        self.link = link
        self.access_hook = None  # the kernel faults pages in: no hook
        self._state: dict = {}
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def restore(self, state: dict) -> None:
        self._state = dict(state)

    def start(self) -> None:
        self.link.call("run", state=self._state)
        self._running = True

    def pause(self, timeout: float = 10.0) -> None:
        self.link.call("pause")
        self._running = False

    def resume(self) -> None:
        self.link.call("resume")
        self._running = True

    def stop(self) -> None:
        if self.link.alive:
            try:
                self.link.call("pause")
            except GuestProcessError:
                pass
        self._running = False

    def state(self) -> dict:
        return self.link.call("state")[0]["state"]

    def progress(self) -> dict:
        return self.link.call("progress")[0]["progress"]

    @property
    def pages_touched(self) -> int:
        return self.link.call("progress")[0]["pages-touched"]


# --- source: what the guest process dirties ------------------------------

class WriteProtectTracker:
    """Source dirty tracking of a guest process; install with ``ram.collect_dirty = tracker.collect``.

    ``wp-async`` (the guest registered its memory for async write-protect): each
    :meth:`collect` is one PAGEMAP_SCAN per block of the guest's /proc/PID/pagemap,
    which returns the pages written since the last scan and write-protects them
    again atomically. On hugetlb the kernel tracks whole host pages: a write to
    one target page reports all 512 of its huge page. To measure what that
    costs, the guest's own log of target pages written is fetched too and the
    target pages marked only because of the granularity are counted
    (``wp-extra-bytes``: re-sent bytes that a 4 KiB tracking would not send).
    ``dirty-log`` (no WP_ASYNC / PAGEMAP_SCAN here): the guest's own log is used.
    """

    def __init__(self, link: GuestLink):
        self.link = link
        self.mode = link.hello.get("tracking") or "dirty-log"
        self.why = link.hello.get("tracking-why")
        self.scanner = U.PagemapScanner(link.pid) if self.mode == "wp-async" else None
        self.huge = any(b.backing == "hugetlb" for b in link.ram.blocks)
        self.scans = 0
        self.dirty_pages = 0  # target pages reported dirty
        self.extra_pages = 0  # of which not written (host-page granularity)

    def _guest_log(self) -> dict[str, np.ndarray]:
        raw = np.frombuffer(self.link.call("dirty")[1], np.bool_)
        out, pos = {}, 0
        for b in self.link.ram.blocks:
            out[b.idstr] = raw[pos:pos + b.npages]
            pos += b.npages
        return out

    def collect(self) -> None:
        ram = self.link.ram
        marks: dict[str, np.ndarray] = {}
        if self.scanner is not None:
            for b in ram.blocks:
                r = self.scanner.collect(b.guest_address, b.guest_address + b.length)
                d = np.zeros(b.npages + 1, np.int32)
                if len(r):
                    p = ((r - np.uint64(b.guest_address)) >> np.uint64(C.TARGET_PAGE_BITS)).astype(np.int64)
                    np.add.at(d, np.minimum(p[:, 0], b.npages), 1)
                    np.add.at(d, np.minimum(p[:, 1], b.npages), -1)
                marks[b.idstr] = np.cumsum(d[:-1]) > 0
            self.scans += 1
            if self.huge:
                exact = self._guest_log()  # after the scan: covers every write the scan saw
                for b in ram.blocks:
                    if b.backing == "hugetlb":
                        self.extra_pages += int(np.count_nonzero(marks[b.idstr] & ~exact[b.idstr]))
        else:
            marks = self._guest_log()
        with ram.dirty_lock:
            for b in ram.blocks:
                m = marks[b.idstr]
                self.dirty_pages += int(np.count_nonzero(m))
                ram.dirty_log[b.idstr].bits[m] = True

    def metrics(self) -> dict:
        return {"wp-tracking": self.mode, "wp-tracking-why": self.why, "wp-scans": self.scans,
                "wp-dirty-pages": self.dirty_pages, "wp-extra-bytes": self.extra_pages * C.TARGET_PAGE_SIZE}

    def close(self) -> None:
        if self.scanner is not None:
            self.scanner.close()


# --- destination: placement and faults through the uffd --------------------

class UffdPlacer:
    """ReceivedPages' placement backend for a guest process: UFFDIO_COPY / ZEROPAGE, discards punched.

    ``place`` gets what :meth:`RAMBlock.write_pages` gets: target pages
    (a slice or index array) and their data ((n, 4096) uint8, rows may be
    strided views of the stream buffer) or None for zero pages. A host page
    larger than 4 KiB always arrives whole (HostPageAssembler) and is one COPY.
    Errors: GuestProcessGone when the guest process exited (ESRCH),
    UffdRangeGone when its memory is not where it said; an EEXIST (page already
    there) is counted, reported in ``errors``, the data written through the
    worker's mapping and the range woken: never fatal.
    """

    def __init__(self, link: GuestLink):
        self.link = link
        self.uffd = link.uffd
        self.copies = 0  # UFFDIO_COPY calls
        self.zeropages = 0  # UFFDIO_ZEROPAGE calls
        self.eexist = 0
        self.errors: list[str] = []
        self.placed = {b.idstr: np.zeros(b.npages, bool) for b in link.ram.blocks}
        self._zero: dict[int, np.ndarray] = {}
        self._tls = threading.local()

    def _zero_page(self, size: int) -> np.ndarray:
        z = self._zero.get(size)
        if z is None:
            z = self._zero[size] = np.zeros(size, np.uint8)
        return z

    def _tmp(self, size: int) -> np.ndarray:
        t = getattr(self._tls, "tmp", None)
        if t is None or len(t) < size:
            t = self._tls.tmp = np.empty(size, np.uint8)
        return t[:size]

    def place(self, blk: SharedRAMBlock, where, data) -> None:
        tph = blk.tp_per_hp
        if isinstance(where, slice):
            p0, n = where.start, where.stop - where.start
            if tph > 1:
                if n != tph or p0 % tph:
                    raise U.UffdBadAddress(0, f"block {blk.idstr!r}: placement of pages {p0}..{p0 + n} is not "
                                           f"one whole host page of {tph} target pages")
                self._host_page(blk, p0, data)
                return
            if data is None:
                self._op(blk, p0, n, None)
                return
            if n > 1:
                # Consecutive 4 KiB pages: one contiguous copy of the stream rows and one COPY
                # for the run, not an ioctl per page.
                tmp = self._tmp(n << C.TARGET_PAGE_BITS)
                tmp.reshape(n, C.TARGET_PAGE_SIZE)[:] = data
                self._op(blk, p0, n, tmp)
                return
            pages = range(p0, p0 + n)
        else:
            pages = np.asarray(where).tolist()
        for i, p in enumerate(pages):
            self._op(blk, p, 1, None if data is None else data[i])

    def _host_page(self, blk, hp: int, data) -> None:
        size = blk.page_size
        if data is None:
            if blk.backing == "hugetlb":
                self._op(blk, hp, blk.tp_per_hp, self._zero_page(size))  # ZEROPAGE is refused on hugetlb
            else:
                self._op(blk, hp, blk.tp_per_hp, None)
            return
        if not (data.flags.c_contiguous and data.size == size):
            tmp = self._tmp(size)
            tmp.reshape(data.shape)[:] = data  # strided stream rows -> one contiguous host page
            data = tmp
        self._op(blk, hp, blk.tp_per_hp, data)

    def _op(self, blk, p: int, n: int, src) -> None:
        """COPY (``src``: contiguous n*4096 bytes) or ZEROPAGE (``src`` None) of target pages [p, p+n)."""
        dst = blk.guest_address + (p << C.TARGET_PAGE_BITS)
        length = n << C.TARGET_PAGE_BITS
        try:
            if src is None:
                self.uffd.zeropage(dst, length)
                self.zeropages += 1
            else:
                addr = src.ctypes.data
                self.uffd.copy(dst, addr, length)
                self.copies += 1
        except U.UffdPageExists as e:
            k = getattr(e, "done", 0) >> C.TARGET_PAGE_BITS
            if k or (n > 1 and blk.tp_per_hp == 1):
                # A run of small pages: the ones before the existing one are placed; that one
                # alone is the error; the rest go on one by one.
                self.placed[blk.idstr][p:p + k] = True
                one = None if src is None else src[k << C.TARGET_PAGE_BITS:(k + 1) << C.TARGET_PAGE_BITS]
                self._exists(blk, p + k, 1, one, e)
                self.placed[blk.idstr][p + k] = True
                for q in range(p + k + 1, p + n):
                    off = (q - p) << C.TARGET_PAGE_BITS
                    self._op(blk, q, 1, None if src is None else src[off:off + C.TARGET_PAGE_SIZE])
                return
            self._exists(blk, p, n, src, e)
        except U.UffdRangeGone as e:
            if not self.link.alive or e.errno == 3:  # ESRCH: the guest's memory is gone with it
                raise GuestProcessGone(f"guest process pid {self.link.pid} exited: placing host page at offset "
                                       f"0x{p << C.TARGET_PAGE_BITS:x} of block {blk.idstr!r} failed ({e})") from None
            raise
        self.placed[blk.idstr][p:p + n] = True

    def _exists(self, blk, p, n, src, e) -> None:
        # Something mapped the page before us (after a discard that is a bug to report).
        self.eexist += 1
        msg = (f"UffdPageExists: block {blk.idstr!r} offset 0x{p << C.TARGET_PAGE_BITS:x}: page already "
               f"there before its placement ({e.strerror})")
        if len(self.errors) < 16:
            self.errors.append(msg)
        if src is None:
            blk.pages[p:p + n] = 0
        else:
            blk.pages[p:p + n] = np.frombuffer(memoryview(src).cast("B"), np.uint8).reshape(n, -1)
        self.uffd.wake(blk.guest_address + (p << C.TARGET_PAGE_BITS), n << C.TARGET_PAGE_BITS)

    def discard(self, blk, start: int, length: int) -> None:
        """POSTCOPY_RAM_DISCARD: drop the pages from the memfd for real (the guest's next access faults)."""
        U.punch_hole(blk.fd, start, length)
        self.placed[blk.idstr][start >> C.TARGET_PAGE_BITS:(start + length) >> C.TARGET_PAGE_BITS] = False

    def metrics(self) -> dict:
        return {"uffd-copies": self.copies, "uffd-zeropages": self.zeropages, "uffd-eexist": self.eexist,
                "uffd-errors": list(self.errors)}


class UffdFaultServer:
    """The fault thread: uffd fault messages in bulk -> one request per missing host page.

    A fault on a page already placed (the message was read after the COPY
    that woke the thread) is answered with a WAKE. A fault address outside
    every block of the guest is a named error (UffdBadAddress) in ``errors``;
    the thread stays stopped and the server goes on. When sending a request
    fails (the migration broke), the error is kept and the thread stays
    stopped in the kernel.
    """

    def __init__(self, link: GuestLink, faults, placer: UffdPlacer, on_guest_gone=None):
        self.link = link
        self.uffd = link.uffd
        self.faults = faults
        self.placer = placer
        self.on_guest_gone = on_guest_gone
        blocks = link.ram.blocks
        order = np.argsort([b.guest_address for b in blocks])
        self._blocks = [blocks[i] for i in order]
        self._starts = np.array([b.guest_address for b in self._blocks], np.uint64)
        self.kernel_faults = 0  # fault messages read
        self.wakes = 0
        self.bad_faults = 0
        self.errors: list[str] = []
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="uffd-faults", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join(5)

    def _error(self, msg: str) -> None:
        if len(self.errors) < 16:
            self.errors.append(msg)

    def _loop(self) -> None:
        while not self._stop:
            try:
                ev = self.uffd.read_events(0.2)
            except U.UffdError as e:
                self._error(f"reading the uffd: {e}")
                return
            if len(ev):
                self.handle(ev, time.monotonic())
            elif not self.link.alive:
                self._error(f"GuestProcessGone: guest process pid {self.link.pid} exited "
                            f"(status {self.link.proc.poll() if self.link.proc else '?'})")
                if self.on_guest_gone is not None:
                    self.on_guest_gone(GuestProcessGone(self.errors[-1]))
                return

    def handle(self, ev: np.ndarray, t: float) -> None:
        """Serve a batch of uffd messages (UFFD_MSG_DTYPE) read at ``t`` (monotonic seconds)."""
        faults = ev[ev["event"] == U.UFFD_EVENT_PAGEFAULT]
        self.kernel_faults += len(faults)
        if len(faults) == 0:
            return
        addrs = faults["a1"]
        tids = (faults["a2"] & np.uint64(0xFFFFFFFF)).tolist()
        bi = np.searchsorted(self._starts, addrs, side="right").astype(np.int64) - 1
        for a, i, tid in zip(addrs.tolist(), bi.tolist(), tids):
            blk = self._blocks[i] if i >= 0 else None
            if blk is None or a >= blk.guest_address + blk.length:
                self.bad_faults += 1
                self._error(f"UffdBadAddress: fault at 0x{a:x} (thread {tid}) outside every block of the guest "
                            f"({', '.join(f'{b.idstr}: 0x{b.guest_address:x}+0x{b.length:x}' for b in self._blocks)})")
                continue
            tp = (a - blk.guest_address) >> C.TARGET_PAGE_BITS
            hp = tp - tp % blk.tp_per_hp
            try:
                if self.placer.placed[blk.idstr][hp] or not self.faults.kernel_fault(blk, hp, tid, t):
                    # Placed since the kernel queued the message; the COPY woke it, or this does.
                    self.uffd.wake(blk.guest_address + (hp << C.TARGET_PAGE_BITS), blk.page_size)
                    self.wakes += 1
            except Exception as e:  # noqa: BLE001 - the thread stays stopped; the server goes on
                self._error(f"{type(e).__name__}: request for block {blk.idstr!r} offset "
                            f"0x{hp << C.TARGET_PAGE_BITS:x}: {e}")

    def metrics(self) -> dict:
        return {"uffd-kernel-faults": self.kernel_faults, "uffd-wakes": self.wakes,
                "uffd-bad-faults": self.bad_faults, "uffd-fault-errors": list(self.errors)}


class UffdBackend:
    """Demand paging of a MigrationDestination through a guest process's uffd.

    Plugs :class:`UffdPlacer` into ``dest.received`` and starts the fault
    thread. If the guest process exits mid-migration, the migration fails
    with GuestProcessGone (the worker itself keeps running).
    """

    def __init__(self, dest, link: GuestLink):
        if link.uffd is None:
            raise GuestProcessError("the guest process registered no userfaultfd (started as a source?)")
        self.dest = dest
        self.link = link
        self.placer = UffdPlacer(link)
        dest.received.placer = self.placer
        self.server = UffdFaultServer(link, dest.faults, self.placer, self._guest_gone)
        self.server.start()

    def _guest_gone(self, err: GuestProcessGone) -> None:
        d = self.dest
        if d.stats.status not in ("completed", "failed", "cancelled"):
            d._channel_failed(err)  # fails the migration with this error, as a broken channel does

    def metrics(self) -> dict:
        return {**self.placer.metrics(), **self.server.metrics()}

    def close(self) -> None:
        self.server.stop()


if __name__ == "__main__":
    sys.exit(guest_main())
