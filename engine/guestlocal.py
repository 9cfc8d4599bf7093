"""Two local worker processes where the destination's guest is a process of its own (userfaultfd).

As engine/local.py, without the control plane: for tests, ``ferry demo
--guest-process`` and benchmarks. The destination worker spawns ``ferry guest``
(engine/guestproc.py), which maps its RAM from memfds and registers it with
userfaultfd; every postcopy fault of that process is served through the
kernel. At the end the guest process checks the fingerprints of every page it
first read against the source's.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .local import run_worker_pair
from .params import MigrationConfig
from .process_guest import ProcessGuest
from .ram import GuestRAM
from .workload import Workload, WorkloadConfig


@dataclass
class GuestProcessConfig:
    """Shape of the guest; ``dest_workload`` runs in the destination's guest process from RUN."""

    size: int = 64 << 20
    page_size: int = 4096
    backing: str = "memfd"  # memfd | hugetlb
    nblocks: int = 1
    fill: str = "mixed"
    workload: WorkloadConfig | None = field(default_factory=WorkloadConfig)  # the source's guest
    dest_workload: WorkloadConfig = field(default_factory=lambda: WorkloadConfig(threads=2, pattern="random",
                                                                                   batch=1, dirty_rate=8 << 20))
    # The source's guest runs in a process of its own too (writes tracked with write-protect).
    source_process: bool = False
    source_backing: str | None = None  # None: as ``backing``
    # Test hook: kill the destination's guest process this many seconds after RUN.
    kill_guest_after: float | None = None


def _dest_main(conn, g: dict, caps: dict, params: dict, uri: str, timeout: float):
    from .destination import MigrationDestination
    from .process import configure_worker_process

    configure_worker_process()
    pg = None
    try:
        pg = ProcessGuest(g["size"], g["page_size"], g["backing"], g["nblocks"], "zero", g["dest_workload"],
                          "destination")
        d = MigrationDestination(pg.ram, _config(caps, params), workload=pg.workload)
        pg.attach(d)
        real = d.listen(uri)
        d.start()
        conn.send(("listening", real))
        if g.get("kill_guest_after") is not None:
            threading.Thread(target=_kill_after, args=(d, pg, g["kill_guest_after"]), daemon=True).start()
        d.wait(timeout)
        res = d.query()
        res.update(pg.metrics("destination"))
        conn.send(("done", res))
        if conn.poll(timeout):
            kind, fps = conn.recv()
            if kind == "check":
                try:
                    conn.send(("check", pg.link.check(fps)))
                except Exception as e:  # noqa: BLE001
                    conn.send(("check", {"error": f"{type(e).__name__}: {e}"}))
    except Exception as e:  # noqa: BLE001 - report to the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        if pg is not None:
            pg.close()


def _config(caps: dict, params: dict) -> MigrationConfig:
    cfg = MigrationConfig()
    cfg.set_capabilities(caps)
    cfg.set_parameters(params)
    return cfg


def _kill_after(d, pg: ProcessGuest, delay: float) -> None:
    while not d.running and not d._done.is_set():
        time.sleep(0.01)
    time.sleep(delay)
    if pg.link.proc is not None:
        pg.link.proc.kill()


def _source_main(conn, g: dict, caps: dict, params: dict, uri: str, timeout: float, warm: float):
    from .process import configure_worker_process
    from .source import MigrationSource

    configure_worker_process()
    pg = None
    try:
        if g.get("source_process"):
            pg = ProcessGuest(g["size"], g["page_size"], g.get("source_backing") or g["backing"], g["nblocks"],
                              g["fill"], g.get("workload"), "source")
            ram, workload = pg.ram, pg.workload
            workload.start()
            time.sleep(warm)
        else:
            ram = GuestRAM.create(g["size"], g["page_size"], g.get("source_backing") or g["backing"], g["nblocks"])
            ram.fill(g["fill"])
            workload = None
            if g.get("workload"):
                workload = Workload(ram, WorkloadConfig(**g["workload"]))
                workload.start()
                time.sleep(warm)
        s = MigrationSource(ram, workload, _config(caps, params))
        conn.send(("ready", None))
        s.start(uri)
        s.wait(timeout)
        res = s.query()
        # After the switch the source's guest is stopped: its memory is what the
        # destination's guest must have read.
        res["fingerprints"] = np.concatenate([b.fingerprints() for b in ram.blocks])
        if pg is not None:
            res.update(pg.metrics("source"))
        conn.send(("done", res))
    except Exception as e:  # noqa: BLE001
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        if pg is not None:
            pg.close()


def _check(src: dict, dst: dict, dest_pipe) -> dict:
    """The destination guest's own check against the source's fingerprints."""
    dest_pipe.send(("check", src.pop("fingerprints")))
    if dest_pipe.poll(60):
        return dest_pipe.recv()[1]
    return {"error": "no answer"}


def run_guest_process_migration(uri: str = "tcp:127.0.0.1:0", guest: GuestProcessConfig | None = None,
                                caps: dict | None = None, params: dict | None = None, timeout: float = 300.0,
                                warm: float = 0.0, netns: tuple[str | None, str | None] | None = None
                                ) -> tuple[dict, dict, dict]:
    """Migrate into a guest process; returns (source query, destination query, the guest's check).

    The destination query has the uffd figures (uffd-kernel-faults, uffd-copies,
    ...). The check: pages-checked, mismatches (0 when every page the guest
    read was the source's), or ``error``. ``netns``: as in
    :func:`engine.local.run_local_migration`.
    """
    return run_worker_pair(_dest_main, _source_main, asdict(guest or GuestProcessConfig()), uri, caps, params,
                           timeout, warm, netns, finish=_check, join_timeout=15)


def run_local_migration_uffd(uri: str, guest, caps: dict | None = None, params: dict | None = None,
                             timeout: float = 300.0, warm: float = 0.0,
                             netns: tuple[str | None, str | None] | None = None) -> tuple[dict, dict]:
    """:func:`engine.local.run_local_migration`'s signature, the destination's guest in its own process.

    ``guest`` is an engine.local.GuestConfig; the destination's memory becomes
    memfd (hugetlb stays hugetlb there), the source's (in-process) memfd. Raises RuntimeError when the guest's own check finds a page
    that differs from the source's. The destination query gets ``guest-check``.
    """
    backing = "hugetlb" if guest.backing == "hugetlb" else "memfd"
    dwl = guest.dest_workload or WorkloadConfig(threads=0)
    g = GuestProcessConfig(size=guest.size, page_size=guest.page_size, backing=backing, nblocks=guest.nblocks,
                           fill=guest.fill, workload=guest.workload, dest_workload=dwl, source_backing="memfd")
    src, dst, check = run_guest_process_migration(uri, g, caps, params, timeout, warm, netns)
    dst["guest-check"] = check
    if "error" in check and dst.get("status") == "completed":
        raise RuntimeError(f"guest process check: {check['error']}")
    if check.get("mismatches"):
        raise RuntimeError(f"guest process read {check['mismatches']} pages that differ from the source's: "
                           f"{check['first-mismatches']}")
    return src, dst


def demo_guest_process(args, caps: dict, params: dict) -> dict:
    """``ferry demo --guest-process``: both guests in processes of their own, two local workers.

    ``args``: the demo's parsed guest options (size, page_size, backing, fill,
    workload_*); returns a summary dict (``verified``: completed on both sides,
    digests equal, and the destination guest's own check clean). Raises
    RuntimeError when a worker fails to start, with its reason.
    """
    from .ram import parse_size

    wl = WorkloadConfig(threads=args.workload_threads, pattern=args.workload_pattern,
                        dirty_rate=parse_size(args.dirty_rate), write_ratio=args.workload_write_ratio,
                        hot_fraction=args.workload_hot_fraction, zipf_a=args.workload_zipf_a,
                        batch=args.workload_batch or 64)
    wl.validate()
    g = GuestProcessConfig(size=parse_size(args.size), page_size=parse_size(args.page_size),
                           backing="hugetlb" if args.backing == "hugetlb" else "memfd", nblocks=args.blocks,
                           fill=args.fill, workload=wl, dest_workload=wl, source_process=True)
    uri = args.uri or "tcp:127.0.0.1:0"
    src, dst, check = run_guest_process_migration(uri, g, caps, params, args.migration_timeout, warm=0.5)
    verified = (src.get("status") == "completed" and dst.get("status") == "completed"
                and src.get("digests") == dst.get("digests") and not check.get("mismatches")
                and "error" not in check)
    keys = ("uffd-kernel-faults", "uffd-copies", "uffd-zeropages", "uffd-wakes", "uffd-eexist", "uffd-errors",
            "uffd-bad-faults", "uffd-fault-errors", "postcopy-requests", "postcopy-blocktime", "postcopy-latency")
    return {"verified": verified, "source": {k: src.get(k) for k in (
                "status", "error-desc", "total-time", "downtime", "wp-tracking", "wp-tracking-why", "wp-scans",
                "wp-dirty-pages", "wp-extra-bytes")},
            "destination": {"status": dst.get("status"), "error-desc": dst.get("error-desc"),
                            **{k: dst.get(k) for k in keys}},
            "digests-equal": src.get("digests") == dst.get("digests"), "guest-check": check}
