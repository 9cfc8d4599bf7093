"""A worker's guest run as a separate process (``ferry worker --guest process``).

The guest is ``ferry guest`` (engine/guestproc.py), whose RAM the worker maps
from memfds received over a Unix socket. :class:`ProcessGuest` keeps that
process through the worker's roles, the way a QEMU process is started for
each incoming migration and runs its guest until the guest leaves:

- source: the guest process fills its memory and runs its workload; the worker
  tracks what it writes with async write-protect (engine/wptrack.py) before
  each sync;
- destination: a guest process that has received nothing yet (a new one is
  started for each ``migrate-incoming`` when needed), registered with
  userfaultfd; :meth:`attach` plugs the placement backend and the fault thread
  (engine/uffd_dest.py) into the incoming migration, so every postcopy fault of
  the guest is a kernel fault served by UFFDIO_COPY;
- a completed incoming migration makes the guest process a source: it drops
  its MISSING registration and write-protects its memory (``become-source``),
  so the guest can migrate on; a source whose guest left keeps the stopped
  process until the next ``migrate-incoming`` replaces it.

Also used without the control plane by engine/guestlocal.py.
"""
from __future__ import annotations

import os
import threading
from dataclasses import asdict, replace

import numpy as np

from .guestproc import (FAULT_ENV, HELLO_TIMEOUT, GuestLink, GuestProcessError, GuestProcessGone,
                        GuestProcessWorkload, GuestSpec)
from .ram import format_size
from .uffd_dest import UffdBackend
from .wptrack import WriteProtectTracker

GUESTS = ("in-process", "process")  # where a worker's guest runs (`--guest`, sweep key `guest`)
CHECK_CHUNK = 1 << 16  # pages of fingerprints per control message (512 KiB, under the 1 MiB request limit)


def process_backing(backing: str) -> str:
    """A guest process's memory must be shared with its worker: anonymous memory becomes memfd."""
    return "memfd" if backing == "anon" else backing


class ProcessGuest:
    """One worker's guest process and what the worker keeps of it (see the module docstring).

    ``ram`` (a GuestRAM over the received memfds) and ``workload`` (a
    GuestProcessWorkload) are what MigrationSource / MigrationDestination get;
    both change when :meth:`fresh_destination` starts a new process.
    Raises GuestProcessError (GuestProcessGone) when the process fails to
    start, HugePagesUnavailable (through its message) for a hugetlb guest
    without reserved pages.
    """

    def __init__(self, size: int, page_size: int, backing: str, nblocks: int, fill: str, workload: dict | None,
                 role: str):
        self.spec = GuestSpec(size, page_size, process_backing(backing), nblocks, fill, role,
                              dict(workload or {"threads": 0}))
        self.link: GuestLink | None = None
        self.tracker: WriteProtectTracker | None = None
        self.backend: UffdBackend | None = None
        self.used = False  # received a migration, or its guest left: not fit for the next incoming one
        self.spawned = 0
        # The next destination guest process, started in the background once the guest left.
        self._next: GuestLink | BaseException | None = None
        self._next_thread: threading.Thread | None = None
        self._adopt(self._start(role), role)

    @classmethod
    def from_config(cls, guest, role: str) -> "ProcessGuest":
        """From an engine.local.GuestConfig (its workload is the guest's on either side)."""
        wl = asdict(guest.workload) if guest.workload is not None and guest.workload.threads > 0 else None
        return cls(guest.size, guest.page_size, guest.backing, guest.nblocks, guest.fill, wl, role)

    # --- life cycle ---
    def _start(self, role: str) -> GuestLink:
        link = GuestLink.spawn(replace(self.spec, role=role))
        self.spawned += 1
        return link

    def _adopt(self, link: GuestLink, role: str) -> None:
        self.link = link
        self.ram = self.link.ram
        self.workload = GuestProcessWorkload(self.link)
        self.role = role
        self.used = False
        self.tracker = None
        if role == "source":
            self._track()

    def _track(self) -> None:
        self.tracker = WriteProtectTracker(self.link)
        self.ram.collect_dirty = self._collect_dirty

    def _collect_dirty(self) -> None:
        """The tracker's collect; a guest process that died is named (the migration fails with it)."""
        link = self.link
        try:
            self.tracker.collect()
        except (OSError, GuestProcessError) as e:
            if link.alive:
                raise
            raise GuestProcessGone(f"guest process pid {link.pid} exited (status {link.proc.poll()}): its writes "
                                   f"can no longer be tracked ({e})") from None

    def fresh_destination(self) -> None:
        """Before an incoming migration: a destination guest process that holds nothing yet.

        The current one serves if it never took part in a migration and lives;
        otherwise it is stopped and a new one started (its pages, placed or
        stale, would make the kernel refuse the next placements).
        """
        if self.role == "destination" and not self.used and self.link.alive:
            return
        nxt = self._take_next()
        self._close_link()
        if nxt is None or not nxt.alive:
            if nxt is not None:
                nxt.close()
            nxt = self._start("destination")
        self._adopt(nxt, "destination")

    def _start_next(self) -> None:
        """Start the next destination guest process in the background (spawning takes a while)."""
        def run():
            try:
                self._next = self._start("destination")
            except BaseException as e:  # noqa: BLE001 - fresh_destination starts one itself then
                self._next = e

        self._next_thread = threading.Thread(target=run, name="guest-process-spawn", daemon=True)
        self._next_thread.start()

    def _take_next(self) -> GuestLink | None:
        t, self._next_thread = self._next_thread, None
        if t is not None:
            t.join(HELLO_TIMEOUT + 10)
        nxt, self._next = self._next, None
        return nxt if isinstance(nxt, GuestLink) else None

    def attach(self, dest) -> UffdBackend:
        """Demand paging of the incoming migration ``dest`` through this process's uffd."""
        if self.role != "destination":
            raise GuestProcessError(f"the guest process pid {self.link.pid} is a {self.role}: it cannot receive")
        self.backend = UffdBackend(dest, self.link)
        self.used = True
        if os.environ.get(FAULT_ENV) == "close-uffd":
            self._close_uffd_at_run()
        return self.backend

    def _close_uffd_at_run(self) -> None:
        # Test hook: the worker's uffd closed under Ferry once the guest runs here.
        wl, start = self.workload, self.workload.start

        def start_then_close():
            start()
            os.close(self.link.uffd.fd)
            self.link.uffd.closed = True

        wl.start = start_then_close

    def migration_completed(self) -> None:
        """The migration this guest process took part in completed; the roles swap.

        Destination: every page is here; the fault thread stops and the guest
        process turns source (write-protect tracking). Source: the guest left;
        the stopped process stays (its memory is the source's copy) until the
        next incoming migration replaces it.
        """
        if self.role == "destination":
            if self.backend is not None:
                # Not waited for: the swap is quick, so a controller sees the new role at once. The
                # worker's uffd stays open until the process is replaced (the thread may still poll it).
                self.backend.close(wait=False)
            reply, _ = self.link.call("become-source")
            self.link.hello.update(tracking=reply.get("tracking"), **{"tracking-why": reply.get("tracking-why")})
            self.role = "source"
            self._track()
        else:
            self.role = "destination"
            self.used = True
            self._start_next()

    def close(self, kill: bool = False) -> None:
        """Stop the guest process and drop everything of it (the worker exits).

        ``kill``: SIGKILL it rather than ask it to stop (its threads may be
        stopped in the kernel on pages that will never come)."""
        nxt = self._take_next()
        if nxt is not None:
            nxt.close()
        if kill and self.link is not None and self.link.proc is not None and self.link.alive:
            self.link.proc.kill()
        self._close_link()

    def _close_link(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        if self.link is not None:
            self.link.close()
            self.link = None

    # --- queries ---
    @property
    def pid(self) -> int | None:
        return self.link.pid if self.link is not None else None

    def metrics(self, migration_role: str) -> dict:
        """query-migrate's guest-process fields for a migration in ``migration_role``."""
        out = {"guest": "process", "guest-pid": self.pid, "guest-alive": self.link is not None and self.link.alive}
        if migration_role == "destination" and self.backend is not None:
            out.update(self.backend.metrics())
        elif migration_role == "source" and self.tracker is not None:
            out.update(self.tracker.metrics())
        return out

    def describe(self) -> str:
        b = self.spec
        return f"a guest process (pid {self.pid}) over {b.backing} memory of {format_size(b.page_size)} pages"

    def fingerprints(self, start: int = 0, count: int | None = None) -> bytes:
        """Fingerprints (uint64, little-endian) of the guest's pages ``start``..``start+count`` (all
        blocks in order), read through the worker's own mapping."""
        return ram_fingerprints(self.ram, start, count)

    def check(self, fingerprints: bytes, start: int = 0) -> dict:
        """The guest's own check of the pages it first read against the source's ``fingerprints``."""
        return self.link.call("check", fingerprints, start=start)[0]["check"]


def ram_fingerprints(ram, start: int = 0, count: int | None = None) -> bytes:
    """Page fingerprints of ``ram``'s target pages ``start``..``start+count`` (all blocks counted in
    order) as uint64 bytes. Raises ValueError for a range outside the guest."""
    total = ram.npages
    count = total - start if count is None else count
    if start < 0 or count < 0 or start + count > total:
        raise ValueError(f"pages {start}..{start + count}: the guest has {total} pages")
    out, pos = [], 0
    for b in ram.blocks:
        lo, hi = max(start, pos), min(start + count, pos + b.npages)
        if lo < hi:
            out.append(b.fingerprints(lo - pos, hi - pos))
        pos += b.npages
    return np.concatenate(out).astype("<u8").tobytes() if out else b""


async def guest_check(src, dst, chunk: int = CHECK_CHUNK) -> dict:
    """Run the destination guest's own check against the source's memory, over the control plane.

    ``src``/``dst``: ControlClients of the source worker (its guest stopped
    after the migration, any guest) and the destination worker (its guest a
    guest process). Returns {pages-checked, mismatches, first-mismatches}.
    Raises CommandFailed when a worker refuses (e.g. an in-process
    destination guest keeps no first-touch record).
    """
    out = {"pages-checked": 0, "mismatches": 0, "first-mismatches": []}
    start = 0
    while True:
        r = await src.call("x-query-guest-fingerprints", {"start": start, "count": chunk})
        fps = r["fingerprints"]
        if not fps:
            break
        c = await dst.call("x-guest-check", {"fingerprints": fps, "start": start})
        out["pages-checked"] += c["pages-checked"]
        out["mismatches"] += c["mismatches"]
        out["first-mismatches"] += c["first-mismatches"][:8 - len(out["first-mismatches"])]
        start += len(fps) // 8
        if start >= r["total"]:
            break
    return out
