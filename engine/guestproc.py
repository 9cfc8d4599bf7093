"""A guest in its own process, whose memory the kernel faults in through userfaultfd.

``ferry guest`` (this module's :func:`guest_main`) runs the workload
(engine/workload.py) in a process of its own over RAM blocks mapped from
memfds (4 KiB pages, or MFD_HUGETLB 2 MiB / 1 GiB pages when reserved). It
connects to its worker over a Unix socket and sends a *hello*: its blocks and
the addresses they are mapped at, with the memfds (and, on a destination, a
userfaultfd registered over those addresses) attached by SCM_RIGHTS, as
CRIU's lazy pages and Firecracker's page fault handler receive theirs.

On the destination (engine/uffd_dest.py):

- the worker maps the same memfds: precopy pages are written through its own
  mapping (the guest is not running yet);
- a discard punches a hole in the memfd (fallocate PUNCH_HOLE), so the guest's
  next access really is a fault;
- from POSTCOPY_LISTEN on, every placement (background or requested) is one
  UFFDIO_COPY of the whole host page into the guest's address space, which
  maps it atomically and wakes the guest threads stopped on it
  (``UffdPlacer``). Zero pages: UFFDIO_ZEROPAGE on 4 KiB memory; on
  hugetlb (where it is refused) a COPY from a zeroed temporary page, as QEMU
  does;
- a fault thread (``UffdFaultServer``) reads the uffd's fault messages in
  bulk and turns each into one page request, deduplicated while in flight
  (engine/postcopy.py FaultHandler.kernel_fault). A guest thread is woken only
  by the COPY of its page: when the migration fails it stays blocked in the
  kernel, never woken without a page.

On the source the worker tracks what the guest process writes with
async write-protect (engine/wptrack.py).

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
from dataclasses import dataclass, field

import numpy as np

from ferry_migrate.channels import constants as C

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

    def check(self, expected: bytes, start: int = 0) -> dict:
        """Compare first-touch fingerprints with ``expected``: uint64 fingerprints of the guest's pages
        ``start``.. (all blocks' pages counted in order; all of them when ``start`` is 0 and no count
        is shorter). Raises GuestProcessError for a range outside the guest."""
        exp = np.frombuffer(expected, dtype=np.uint64)
        if start < 0 or start + len(exp) > self.ram.npages or len(exp) == 0:
            raise GuestProcessError(f"check: fingerprints of pages {start}..{start + len(exp)} for a guest of "
                                    f"{self.ram.npages} pages")
        out = {"pages-checked": 0, "mismatches": 0, "first-mismatches": []}
        pos = 0
        end = start + len(exp)
        with self._lock:
            for b in self.ram.blocks:
                lo, hi = max(start, pos), min(end, pos + b.npages)
                if lo < hi:
                    e = exp[lo - start:hi - start]
                    s = self.seen[b.idstr][lo - pos:hi - pos]
                    bad = np.flatnonzero(s & (self.first_fp[b.idstr][lo - pos:hi - pos] != e)) + (lo - pos)
                    out["pages-checked"] += int(s.sum())
                    out["mismatches"] += len(bad)
                    out["first-mismatches"] += [[b.idstr, int(p) << C.TARGET_PAGE_BITS] for p in bad[:8]]
                pos += b.npages
        return out

    def become_source(self) -> dict:
        """The migration into this process completed: drop the MISSING registration (every page is
        here) and track writes with write-protect instead, so the guest can migrate on from here."""
        if self.uffd is None:
            raise GuestProcessError("become-source: this guest process is a source already")
        for b in self.ram.blocks:
            self.uffd.unregister(b.address, b.length)
        self.uffd.close()
        self.uffd = None
        self.spec.role = "source"
        self.tracking, self.tracking_why = self._write_protect()
        return {"tracking": self.tracking, "tracking-why": self.tracking_why}

    def command(self, obj: dict, payload: bytes) -> tuple[dict, bytes]:
        cmd = obj.get("cmd")
        wl = self.workload
        if cmd == "run":
            wl.restore(obj.get("state") or {})
            wl.start()
            if self.uffd is not None:
                injected_fault(self)
        elif cmd == "pause":
            wl.pause()
        elif cmd == "resume":
            wl.resume()
        elif cmd == "state":
            return {"ok": True, "state": wl.state()}, b""
        elif cmd == "progress":
            return {"ok": True, "progress": wl.progress(), "pages-touched": wl.pages_touched}, b""
        elif cmd == "check":
            return {"ok": True, "check": self.check(payload, int(obj.get("start", 0)))}, b""
        elif cmd == "become-source":
            return {"ok": True, **self.become_source()}, b""
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


# Test hook (docs/uffd.md, "Bad input"): a destination guest process that misbehaves on purpose
# when it starts to run. ``stray-fault``: one of its threads touches memory registered on the
# uffd that is no RAM block (a fault address outside every block); ``allocate-last-page``: the
# last page of the last block is allocated in the memfd behind Ferry's back (fallocate), so its
# placement finds a page there (EEXIST). The worker reads the same variable for ``close-uffd``
# (engine/process_guest.py).
FAULT_ENV = "FERRY_GUEST_FAULT"


def injected_fault(g: "GuestProcess") -> None:
    what = os.environ.get(FAULT_ENV, "")
    if what == "stray-fault":
        import mmap

        size = C.PAGE_SIZE_4K
        g._stray = m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        g.uffd.register(addr, size)
        buf = ctypes.create_string_buffer(8)
        # Stopped in the kernel for good: nobody places that page.
        threading.Thread(target=ctypes.memmove, args=(buf, addr, 8), name="stray-fault", daemon=True).start()
    elif what == "allocate-last-page":
        b = g.ram.blocks[-1]
        os.posix_fallocate(b.fd, b.length - b.page_size, b.page_size)  # a no-op where data is already


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
        proc = subprocess.Popen([sys.executable, "-m", "ferry_migrate.engine.guestproc", *spec.argv(path)],
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
        self._started = False

    @property
    def running(self) -> bool:
        return self._running

    @property
    def may_write(self) -> bool:
        """True while the guest process may write its RAM (resume() sets it before the
        guest runs, pause() clears it only once the guest stopped)."""
        return self._running

    @property
    def _threads(self) -> list:
        # As Workload._threads: non-empty once started (a later run is a resume).
        return [self.link.pid] if self._started else []

    def restore(self, state: dict) -> None:
        self._state = dict(state)

    def start(self) -> None:
        self.link.call("run", state=self._state)
        self._running = self._started = True

    def pause(self, timeout: float = 10.0) -> None:
        self.link.call("pause")
        self._running = False

    def resume(self) -> None:
        self._running = True  # before the guest runs again: senders copy what they send from now on
        self.link.call("resume")

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


if __name__ == "__main__":
    sys.exit(guest_main())
