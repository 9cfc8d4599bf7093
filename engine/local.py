"""Run a migration between two local worker processes, without the control plane.

Used by benchmarks and tests: a destination process and a source process are
started with multiprocessing (spawn), each owns its own guest RAM, and they
talk over a real socket (or file). Results come back over pipes.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass, field

from .params import MigrationConfig
from .ram import GuestRAM, parse_size
from .workload import WorkloadConfig


@dataclass
class GuestConfig:
    """Shape and contents of the guest on both sides."""

    size: int = 256 << 20
    page_size: int = 4096
    backing: str = "anon"
    nblocks: int = 1
    fill: str = "mixed"
    workload: WorkloadConfig | None = field(default_factory=WorkloadConfig)
    # The guest's workload once it runs on the destination (postcopy): faults pages in.
    dest_workload: WorkloadConfig | None = None
    # Back the destination's RAM before the migration (QEMU's -mem-prealloc).
    dest_prealloc: bool = False
    # A destination starts the guest once the migration completed (QEMU without -S).
    autostart: bool = True
    # Where the guest runs in a worker: in-process (threads of the worker) or process
    # (`ferry guest`, demand paging through userfaultfd: engine/process_guest.py).
    guest: str = "in-process"

    def make_ram(self, prealloc: bool = False) -> GuestRAM:
        return GuestRAM.create(parse_size(self.size), parse_size(self.page_size), self.backing, self.nblocks,
                               prealloc=prealloc)


def _dest_main(conn, guest: dict, caps: dict, params: dict, uri: str, timeout: float):
    from .destination import MigrationDestination

    from .process import configure_worker_process
    from .workload import Workload

    configure_worker_process()
    try:
        dwl = guest.get("dest_workload")
        g = GuestConfig(**{**guest, "workload": None, "dest_workload": None})
        ram = g.make_ram(prealloc=g.dest_prealloc)
        cfg = MigrationConfig()
        cfg.set_capabilities(caps)
        cfg.set_parameters(params)
        workload = Workload(ram, WorkloadConfig(**dwl)) if dwl else None
        d = MigrationDestination(ram, cfg, workload=workload)
        real = d.listen(uri)
        d.start()
        conn.send(("listening", real))
        d.wait(timeout)
        if workload is not None and d.status == "completed":
            workload.stop()
        conn.send(("done", d.query()))
    except Exception as e:  # noqa: BLE001 - report to the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _source_main(conn, guest: dict, caps: dict, params: dict, uri: str, timeout: float, warm: float):
    from .process import configure_worker_process
    from .source import MigrationSource
    from .workload import Workload

    configure_worker_process()
    try:
        wl = guest.get("workload")
        g = GuestConfig(**{**guest, "workload": None, "dest_workload": None})
        ram = g.make_ram()
        ram.fill(g.fill)
        cfg = MigrationConfig()
        cfg.set_capabilities(caps)
        cfg.set_parameters(params)
        workload = None
        if wl:
            workload = Workload(ram, WorkloadConfig(**wl))
            workload.start()
            time.sleep(warm)
        before = ram.digests()
        s = MigrationSource(ram, workload, cfg)
        conn.send(("ready", None))
        s.start(uri)
        s.wait(timeout)
        if s.status not in ("completed", "failed", "cancelled") and not s.in_postcopy:
            s.cancel()  # timed out in precopy: the guest goes on here
        res = s.query()
        res["passes"] = s.passes
        if workload is None:
            res["guest-unchanged"] = before == ram.digests()
        conn.send(("done", res))
    except Exception as e:  # noqa: BLE001
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _in_netns(ns: str | None, target, conn, *args):
    """Child entry point: join network namespace ``ns`` (before any socket), then run target."""
    if ns:
        from .testbed import enter_netns

        try:
            enter_netns(ns)
        except OSError as e:
            conn.send(("error", f"cannot enter network namespace {ns}: {e}"))
            return
    target(conn, *args)


def run_local_migration(uri: str = "tcp:127.0.0.1:0", guest: GuestConfig | None = None,
                        caps: dict | None = None, params: dict | None = None,
                        timeout: float = 300.0, warm: float = 0.0,
                        netns: tuple[str | None, str | None] | None = None) -> tuple[dict, dict]:
    """Migrate between two fresh processes; returns (source query, destination query).

    ``netns=(source namespace, destination namespace)`` (see engine/testbed.py): each
    process joins its network namespace first. A tcp uri on a loopback host then
    listens on the destination namespace's own address instead.
    """
    src, dst, _ = run_worker_pair(_dest_main, _source_main, asdict(guest or GuestConfig()), uri, caps, params,
                                  timeout, warm, netns)
    return src, dst


def run_worker_pair(dest_main, source_main, guest: dict, uri: str, caps: dict | None, params: dict | None,
                    timeout: float, warm: float, netns: tuple[str | None, str | None] | None,
                    finish=None, join_timeout: float = 5.0) -> tuple[dict, dict, object]:
    """Start ``dest_main`` and, once it listens, ``source_main`` in fresh processes; collect their results.

    Both mains take ``(conn, guest, caps, params, uri, timeout[, warm])`` and
    answer over ``conn``: ``("listening", uri)`` (destination), ``("ready",
    None)`` (source, optional), then ``("done", query)`` or ``("error", text)``.
    ``finish(src, dst, dest_pipe)``, if given, runs before the processes are
    joined (a last exchange with the destination) and its value is returned
    third. Raises RuntimeError naming the side that failed or went silent.
    """
    src_ns, dst_ns = netns or (None, None)
    caps, params = caps or {}, params or {}
    if dst_ns and not params.get("tls-creds"):
        # The testbed's own namespaces are a private link: plain TCP there on purpose.
        params = {"plaintext-off-loopback": True, **params}
    if dst_ns and uri.startswith("tcp:"):
        from ferry_migrate.channels.transport import MigrationURI, parse_uri

        from .testbed import namespace_address

        u = parse_uri(uri)
        if u.host in ("127.0.0.1", "localhost", "::1"):
            uri = str(MigrationURI("tcp", host=namespace_address(dst_ns), port=u.port))
    ctx = mp.get_context("spawn")
    dp, dc = ctx.Pipe()
    sp, sc = ctx.Pipe()
    dproc = ctx.Process(target=_in_netns, args=(dst_ns, dest_main, dc, guest, caps, params, uri, timeout),
                        name="ferry-destination", daemon=True)
    sproc = None
    try:
        dproc.start()
        if not dp.poll(60):
            raise RuntimeError("destination process did not start")
        kind, val = dp.recv()
        if kind != "listening":
            raise RuntimeError(f"destination: {val}")
        sproc = ctx.Process(target=_in_netns, args=(src_ns, source_main, sc, guest, caps, params, val, timeout,
                                                    warm),
                            name="ferry-source", daemon=True)
        sproc.start()
        results = {}
        for name, pipe in (("source", sp), ("destination", dp)):
            while True:
                if not pipe.poll(timeout + 60):
                    raise RuntimeError(f"{name} process did not report in time")
                kind, val = pipe.recv()
                if kind == "ready":
                    continue
                if kind == "error":
                    raise RuntimeError(f"{name}: {val}")
                results[name] = val
                break
        extra = finish(results["source"], results["destination"], dp) if finish is not None else None
        return results["source"], results["destination"], extra
    finally:
        for p in (sproc, dproc):
            if p is not None and p.pid is not None:
                p.join(join_timeout)
                if p.is_alive():
                    p.kill()
                    p.join(5)
        if uri.startswith("unix:"):
            try:
                os.unlink(uri[5:])
            except OSError:
                pass
