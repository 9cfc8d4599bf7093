"""A worker process: one side of a migration, driven over the control plane.

A *source* worker owns a running guest (RAM blocks filled with data and a
workload writing to them); a *destination* worker owns RAM of the same shape,
empty until a migration fills it. The migration runs in engine threads
(MigrationSource / MigrationDestination), independent of any client: a
controller that disappears does not stop it.
"""
from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import time
from typing import Any, Callable

import psutil

from ferry_migrate.channels.transport import parse_uri

from . import states as ST
from . import stats as S
from .control import endpoints
from .control import protocol as P
from .control.auth import ServerKeys
from .control.server import ControlServer
from .destination import MigrationDestination
from .layout import LayoutLimits
from .local import GuestConfig
from .params import CAPABILITIES, LIVE_PARAMETERS, MigrationConfig, ParameterError
from .ram import format_size
from .source import MigrationSource
from .workload import Workload

ROLES = ("source", "destination")
SHUTDOWN_WAIT = 5.0  # s for a cancelled migration thread to finish before exit
IN_PROGRESS = ST.IN_PROGRESS


def _err(desc: str) -> P.RequestError:
    return P.RequestError(P.GENERIC_ERROR, desc)


def resource_usage(proc: psutil.Process | None = None) -> dict:
    """CPU time, RSS and threads of this process (psutil)."""
    proc = proc or psutil.Process()
    with proc.oneshot():
        ct = proc.cpu_times()
        mem = proc.memory_info()
        threads = proc.num_threads()
    return {"pid": proc.pid, "cpu-user": round(ct.user, 3), "cpu-system": round(ct.system, 3),
            "rss": mem.rss, "threads": threads}


class Worker:
    """Verb handlers over one guest; ``handle`` is what the control server calls."""

    def __init__(self, role: str, guest: GuestConfig, layout: LayoutLimits | None = None):
        if role not in ROLES:
            raise ValueError(f"worker role {role!r}: expected source or destination")
        if layout is not None and role != "destination":
            raise ValueError("only a destination worker takes the source's RAM layout")
        self.role = role
        self.guest = guest
        self.config = MigrationConfig()
        # No fixed guest: the blocks come from the source's MEM_SIZE (engine/layout.py).
        self.layout = layout
        # --guest process: the guest runs in a process of its own (engine/process_guest.py).
        self.pguest = None
        if guest.guest == "process":
            if layout is not None:
                raise ValueError("a guest process has a fixed shape: --guest process does not go with "
                                 "--ram-layout source")
            from .process_guest import ProcessGuest

            self.pguest = ProcessGuest.from_config(guest, role)
        # A destination backs its RAM now (mem-prealloc) rather than during the migration.
        self.ram = None if layout is not None else self.pguest.ram if self.pguest else guest.make_ram(
            prealloc=role == "destination" and guest.dest_prealloc)
        self.workload: Workload | None = None
        if self.pguest is not None:
            self.workload = self.pguest.workload
            if role == "source":
                self.workload.start()
        elif layout is None and guest.workload is not None and guest.workload.threads > 0:
            # On a destination the workload only starts if the guest switches
            # over to it during a postcopy migration (the engine starts it).
            self.workload = Workload(self.ram, guest.workload)
        if role == "source":
            self.ram.fill(guest.fill)
            if self.workload is not None:
                self.workload.start()
        self.migration: MigrationSource | MigrationDestination | None = None
        self._migration_role = role  # the role this worker had in self.migration
        self._user_stopped = False  # the guest was stopped with `stop`
        self.emit: Callable[[str, dict], None] = lambda name, data: None
        self.request_stop: Callable[[], None] = lambda: None
        self.endpoints: dict[str, str] = {}
        self.curve = False
        self.started = time.time()
        self._proc = psutil.Process()
        self._handlers = {
            "migrate-set-capabilities": self.set_capabilities,
            "migrate-set-parameters": self.set_parameters,
            "query-migrate-capabilities": self.query_capabilities,
            "query-migrate-parameters": self.query_parameters,
            "migrate": self.migrate,
            "migrate-incoming": self.migrate_incoming,
            "migrate-start-postcopy": self.start_postcopy,
            "query-migrate": self.query_migrate,
            "query-guest-progress": self.query_guest_progress,
            "query-postcopy-latency": self.query_postcopy_latency,
            "migrate-cancel": self.cancel,
            "migrate-pause": self.pause,
            "stop": self.stop,
            "cont": self.cont,
            "migrate-recover": self.recover,
            "query-status": self.query_status,
            "query-commands": self.query_commands,
            "quit": self.quit,
            "x-query-guest-fingerprints": self.query_guest_fingerprints,
            "x-guest-check": self.guest_check,
        }

    # --- dispatch ---
    def handle(self, verb: str, args: dict) -> Any:
        spec = P.VERBS[verb]
        if not spec.implemented:
            raise _err(f"{verb} is not implemented in this version of Ferry")
        if self.role not in spec.roles:
            why = ""
            if self.migration is not None and self._migration_role != self.role:
                why = (" (the guest has already migrated: it runs on the destination now, and this worker can "
                       "receive the next migration)" if self.role == "destination" else
                       " (the guest arrived here: this worker can send it on)")
            raise _err(f"{verb} runs on a {' or '.join(spec.roles)} worker; this worker is a {self.role}{why}")
        return self._handlers[verb](args)

    @property
    def status(self) -> str:
        """State of this worker's migration in its current role (none after a role change)."""
        if self.migration is None or self._migration_role != self.role:
            return S.NONE
        return self.migration.status

    def _require_idle(self, verb: str) -> None:
        if self.status in IN_PROGRESS:
            raise _err(f"{verb}: there's a migration process in progress (status {self.status}); "
                       "change capabilities and parameters before migrate / migrate-incoming")

    def _on_event(self, name: str, data: dict) -> None:
        # Called from migration threads; emit is thread-safe.
        self.emit(name, data)
        if name == "MIGRATION" and data.get("status") == S.COMPLETED:
            self._migration_completed()

    def _drop_migration(self) -> None:
        """Let the last migration go before the next: its channels, buffers and stored errors
        (whose tracebacks make reference cycles) are freed now, not at some later collection,
        so a worker running many migrations keeps a flat RSS."""
        if self.migration is not None:
            self.migration.quit()  # ends what it still serves (a never-ran proof listener)
            self.migration = None
            gc.collect()

    # --- the guest's life cycle ---
    def _migration_completed(self) -> None:
        """The guest changed hands: roles swap, and a destination may start its guest.

        A destination whose migration completed owns the guest and can be the
        source of the next migration; a source whose guest left can receive
        the next one (testbeds migrate a guest back and forth).
        """
        m = self.migration
        if self.pguest is not None:
            try:
                self.pguest.migration_completed()
            except Exception as e:  # noqa: BLE001 - the guest process failed its turn: say so, go on
                import sys
                import traceback

                traceback.print_exc(file=sys.stderr)
                self.emit("GUEST_PROCESS_ERROR", {"error": f"{type(e).__name__}: {e}"})
        if self.role == "destination":
            self.role = "source"
            wl = self.workload
            if wl is not None:
                wl.access_hook = None  # every page is here now
                if not wl.running and self.guest.autostart:
                    wl.restore(m.guest_state or {})
                    wl.start()
                    self.emit("RESUME", {"reason": "autostart"})
        else:
            self.role = "destination"
            self.emit("STOP", {"reason": "migrated"})

    def stop(self, args: dict) -> dict:
        """QMP stop: pause the guest where it runs (a no-op where it is stopped already)."""
        wl = self.workload
        if wl is not None and wl.running:
            wl.pause()
            self._user_stopped = True
            self.emit("STOP", {"reason": "stop"})
        return {}

    def cont(self, args: dict) -> dict:
        """QMP cont: run the guest here, if it belongs here (engine/states.py says where it may run)."""
        wl = self.workload
        st = self.status
        if self.role == "source":
            # After a role change (the guest arrived here) the status is none: ours to run.
            if not ST.STATES[st].source_guest_may_run:
                raise _err(f"cont: the guest may not run on this source while the migration is {st} "
                           f"({ST.STATES[st].doc})")
        else:
            m = self.migration
            lost = m is not None and getattr(m, "verdict", None) == "lost" and st == S.DEVICE
            if not (ST.STATES[st].dest_guest_may_run and st == S.COMPLETED) and not lost:
                raise _err(f"cont: no guest to run on this destination while the migration is {st} "
                           f"({ST.STATES[st].doc})")
        if wl is None:
            return {}
        if not wl.running:
            if self.role == "destination" and self.migration is not None:
                wl.restore(self.migration.guest_state or {})  # outcome-unknown: the user's decision
            wl.start() if not wl._threads else wl.resume()
            self._user_stopped = False
            self.emit("RESUME", {"reason": "cont"})
        return {}

    # --- capabilities and parameters (validated by engine.params) ---
    def set_capabilities(self, args: dict) -> dict:
        self._require_idle("migrate-set-capabilities")
        caps = {c["capability"]: c["state"] for c in args["capabilities"]}
        try:
            self.config.set_capabilities(caps)
        except ParameterError as e:
            raise _err(str(e)) from None
        return {}

    def set_parameters(self, args: dict) -> dict:
        running = self.status in IN_PROGRESS
        if running:
            fixed = sorted(k for k in args if k not in LIVE_PARAMETERS)
            if fixed:
                raise _err(f"migrate-set-parameters: {', '.join(fixed)} cannot change during a migration "
                           f"(status {self.status}); only {', '.join(LIVE_PARAMETERS)} can")
        try:
            self.config.set_parameters(args)
        except ParameterError as e:
            raise _err(str(e)) from None
        if running and hasattr(self.migration, "parameters_changed"):
            self.migration.parameters_changed()
        return {}

    def query_capabilities(self, args: dict) -> list:
        return [{"capability": n, "state": v} for n, v in self.config.caps.items()]

    def query_parameters(self, args: dict) -> dict:
        out = dict(self.config.params)
        if out.get("migration-secret"):
            out["migration-secret"] = "(set)"  # a secret is never shown
        return out

    # --- migration ---
    def _refuse_unless(self, verb: str, why_not: str = "") -> None:
        """The state table (engine/states.py) decides which verbs a migration's state allows."""
        st = self.status
        if not ST.verb_allowed(self.role, st, verb):
            allowed = ", ".join(ST.allowed_verbs(self.role, st)) or "none"
            busy = "there's a migration process in progress; " if st in IN_PROGRESS else ""
            raise _err(f"{verb}: {busy}not allowed while the migration is {st} ({ST.STATES[st].doc}); "
                       f"allowed now: {allowed}" + (f". {why_not}" if why_not else ""))

    def migrate(self, args: dict) -> dict:
        uri = args["uri"]
        try:
            parse_uri(uri)
        except ValueError as e:
            raise _err(f"migrate: {e}") from None
        if args.get("resume"):
            if self.status != S.POSTCOPY_PAUSED:
                raise _err(f"migrate: resume needs a postcopy-paused migration; this one is {self.status}")
            try:
                self.migration.resume(uri)
            except (RuntimeError, ValueError) as e:
                raise _err(f"migrate: {e}") from None
            return {}
        if self.status == S.COMPLETED:
            raise _err("migrate: the guest has already migrated (status completed); it runs on the "
                       "destination now and this source's copy is stopped")
        if self.status == S.POSTCOPY_PAUSED:
            raise _err("migrate: the migration is postcopy-paused and the guest may be running on its "
                       "destination; only resuming it is allowed (migrate with resume: true, after "
                       "migrate-recover on the destination)")
        self._refuse_unless("migrate")
        self._drop_migration()
        m = MigrationSource(self.ram, self.workload, self.config, on_event=self._on_event)
        try:
            m.start(uri)
        except (RuntimeError, ValueError) as e:
            raise _err(f"migrate: {e}") from None
        self.migration, self._migration_role = m, "source"
        return {}

    def migrate_incoming(self, args: dict) -> dict:
        if self.migration is not None and self.status not in (S.NONE, S.FAILED, S.CANCELLED):
            if self.status in (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER):
                raise _err(f"migrate-incoming: the guest runs here and waits for pages of the paused "
                           f"migration (status {self.status}); use migrate-recover")
            raise _err(f"migrate-incoming: the incoming migration has already been started "
                       f"(status {self.status})")
        if self.pguest is None and self.workload is not None and self.workload.running:
            self.workload.pause()  # a stale copy: it runs again only if a guest arrives
        self._drop_migration()
        if self.pguest is not None:
            try:
                self.pguest.fresh_destination()  # a guest process that holds nothing yet
            except Exception as e:  # noqa: BLE001 - named by the guest process's error
                raise _err(f"migrate-incoming: cannot start the guest process: {type(e).__name__}: {e}") from None
            self.ram, self.workload = self.pguest.ram, self.pguest.workload
        dest = MigrationDestination(self.ram, self.config, on_event=self._on_event, workload=self.workload,
                                    layout=self.layout)
        try:
            real = dest.listen(args["uri"])
        except (ValueError, OSError) as e:
            raise _err(f"migrate-incoming: {e}") from None
        if self.pguest is not None:
            self.pguest.attach(dest)
        dest.start()
        self.migration, self._migration_role = dest, "destination"
        return {"uri": real}

    def pause(self, args: dict) -> dict:
        if self.migration is None:
            raise _err("migrate-pause: no migration")
        try:
            self.migration.pause()
        except RuntimeError as e:
            raise _err(str(e)) from None
        return {}

    def recover(self, args: dict) -> dict:
        never_ran = self._migration_role == "destination" and getattr(self.migration, "never_ran", False)
        if self.migration is None or (self.status != S.POSTCOPY_PAUSED and not never_ran):
            raise _err(f"migrate-recover: needs a postcopy-paused incoming migration (or one that failed "
                       f"after postcopy was advised, before the guest ran here); status {self.status}")
        try:
            real = self.migration.recover(args["uri"])
        except RuntimeError as e:
            raise _err(str(e)) from None
        except (ValueError, OSError) as e:
            raise _err(f"migrate-recover: {e}") from None
        return {"uri": real}

    def start_postcopy(self, args: dict) -> dict:
        if not self.config.cap("postcopy-ram"):
            implemented = CAPABILITIES["postcopy-ram"][1]
            why = "" if implemented else " (postcopy-ram is not implemented in this version of Ferry)"
            raise _err("migrate-start-postcopy: postcopy is not enabled: set the postcopy-ram capability "
                       "with migrate-set-capabilities (on both sides) before migrate" + why)
        if self.migration is None:
            raise _err("migrate-start-postcopy: no migration is running; run migrate first")
        switch = getattr(self.migration, "start_postcopy", None)
        if switch is None:
            raise _err("migrate-start-postcopy is not implemented in this version of Ferry")
        try:
            switch()
        except (RuntimeError, ValueError) as e:
            raise _err(f"migrate-start-postcopy: {e}") from None
        return {}

    def cancel(self, args: dict) -> dict:
        if self.migration is not None:
            try:
                self.migration.cancel()
            except RuntimeError as e:  # refused in postcopy
                raise _err(f"migrate-cancel: {e}") from None
        return {}

    # --- queries ---
    def usage(self) -> dict:
        return resource_usage(self._proc)

    def query_migrate(self, args: dict) -> dict:
        if self.migration is None:
            out = {"status": S.NONE}
        else:
            out = self.migration.query()
            passes = getattr(self.migration, "passes", None)
            if passes is not None:
                out["passes"] = list(passes)
            if self._migration_role == "source":
                postcopy = getattr(self.migration, "in_postcopy", False)
                S.check_downtime(out, self.config.param("downtime-limit"), postcopy)
        out["role"] = self._migration_role if self.migration is not None else self.role  # in this migration
        if self.pguest is not None:
            out.update(self.pguest.metrics(out["role"]))
        out["worker"] = self.usage()
        return out

    def query_guest_progress(self, args: dict) -> dict:
        """Workload.progress(): the series the guest produced in this worker (see the verb's doc)."""
        if self.workload is None:
            return {"interval": None, "t": [], "ms_per_gib": [], "marks": [], "pages_touched": 0,
                    "running": False}
        out = self.workload.progress()
        out["running"] = self.workload.running
        return out

    def query_postcopy_latency(self, args: dict) -> dict:
        """Every request latency (us) of the last incoming migration, all and per channel."""
        m = self.migration
        faults = getattr(m, "faults", None)
        if faults is None:
            return {"all": []}
        # 0.1 us is far below what the clock and the wake-ups resolve; rounding
        # keeps the reply (and the experiment records) small.
        out = {"all": [round(float(v), 1) for v in faults.latency.samples_us()]}
        for ch, rec in sorted(faults.latency_by_channel.items()):
            out[ch] = [round(float(v), 1) for v in rec.samples_us()]
        return out

    def run_state(self) -> str:
        """QEMU's RunState names for where the guest is."""
        st = self.status
        m = self.migration
        if (self.role == "destination" and m is not None and self._migration_role == "source"
                and m.status == S.COMPLETED):
            return "postmigrate"  # the guest left; this worker can receive the next migration
        if self.role == "destination":
            if st in (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER):
                return "paused"  # guest threads wait for pages the paused migration has not brought
            if self.workload is not None and self.workload.running:
                # postcopy: the guest runs here now (unless its process died)
                return "internal-error" if self._guest_process_gone() else "running"
            return "paused" if st == S.COMPLETED else "inmigrate"
        if st in (S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER):
            return "postmigrate"  # the guest left: it runs (or waits for pages) on the destination
        if st == S.COMPLETED:
            return "postmigrate"
        if st == S.DEVICE:
            return "finish-migrate"
        rs = "running" if self.workload is None or self.workload.running else "paused"
        # A guest process that died runs nothing: QEMU's RunState for a guest that cannot go on.
        return "internal-error" if self._guest_process_gone() else rs

    def _guest_process_gone(self) -> bool:
        """True when this worker's guest process (``--guest process``) has exited."""
        link = getattr(self.pguest, "link", None)
        return link is not None and not link.alive

    def guest_shape(self) -> dict:
        g = self.guest
        wl = None
        if g.workload is not None and g.workload.threads > 0:
            w = g.workload
            wl = {"threads": w.threads, "pattern": w.pattern, "dirty-rate": w.dirty_rate,
                  "write-ratio": w.write_ratio, "hot-fraction": w.hot_fraction, "zipf-a": w.zipf_a,
                  "batch": w.batch}
        ram = self.ram if self.ram is not None else getattr(self.migration, "ram", None)
        if ram is None:
            lim = self.layout
            return {"size": 0, "blocks": [], "fill": "zero", "workload": None,
                    "layout": {"max-total": lim.max_total, "max-blocks": lim.max_blocks,
                               "machine-types": list(lim.machine_types)},
                    "description": f"no fixed guest: takes the source's RAM layout (at most "
                                   f"{format_size(lim.max_total)} in {lim.max_blocks} blocks)"}
        out = {
            "size": ram.total,
            "blocks": [{"idstr": b.idstr, "length": b.length, "page-size": b.page_size, "backing": b.backing}
                       for b in ram.blocks],
            "fill": g.fill if self.role == "source" else "zero",
            "workload": wl,
            "description": f"{format_size(ram.total)} in {len(ram.blocks)} block(s), "
                           f"{format_size(ram.blocks[0].page_size)} pages, {g.backing} memory",
            "guest": g.guest,
        }
        if self.pguest is not None:
            out["guest-pid"] = self.pguest.pid
            out["guest-alive"] = not self._guest_process_gone()
            out["description"] = f"{format_size(ram.total)} in {len(ram.blocks)} block(s), {self.pguest.describe()}"
        return out

    def query_status(self, args: dict) -> dict:
        rs = self.run_state()
        out_reason = {}
        if self.role == "destination" and self.status in (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER):
            out_reason = {"reason": f"waiting for pages: the postcopy migration is {self.status} "
                                    f"({self.migration.stats.error or 'a recovery is under way'})"}
        return {"status": rs, "running": rs == "running", "role": self.role, **out_reason,
                "migration": self.migration.status if self.migration is not None else S.NONE, "guest": self.guest_shape(),
                "control": self.endpoints.get("control"), "events": self.endpoints.get("events"),
                "qmp": self.endpoints.get("qmp", []),
                "curve": self.curve, "worker": self.usage()}

    def query_guest_fingerprints(self, args: dict) -> dict:
        """Fingerprints of the guest's pages (all blocks in order) as this worker's memory holds them."""
        from .process_guest import ram_fingerprints

        ram = self.ram if self.ram is not None else getattr(self.migration, "ram", None)
        if ram is None:
            raise _err("x-query-guest-fingerprints: no guest memory here yet")
        if self.role == "destination" and self.status not in (S.NONE, S.FAILED, S.CANCELLED, S.COMPLETED):
            raise _err(f"x-query-guest-fingerprints: an incoming migration is {self.status}: its memory is "
                       "not complete (and reading a missing page of a guest process would allocate it)")
        start, count = int(args.get("start", 0)), args.get("count")
        count = min(int(count), max(0, ram.npages - start)) if count is not None else None
        try:
            return {"fingerprints": ram_fingerprints(ram, start, count), "start": start, "total": ram.npages}
        except ValueError as e:
            raise _err(f"x-query-guest-fingerprints: {e}") from None

    def guest_check(self, args: dict) -> dict:
        """The destination guest process's own check of what it read first against ``fingerprints``."""
        if self.pguest is None:
            raise _err("x-guest-check: the guest runs in this worker (--guest in-process), which keeps no "
                       "record of what it read first; start the worker with --guest process")
        try:
            return self.pguest.check(args["fingerprints"], int(args.get("start", 0)))
        except Exception as e:  # noqa: BLE001 - the guest process's error, named
            raise _err(f"x-guest-check: {type(e).__name__}: {e}") from None

    def query_commands(self, args: dict) -> list:
        return [{"name": n} for n, v in P.VERBS.items() if v.implemented and self.role in v.roles]

    def quit(self, args: dict) -> dict:
        self.request_stop()
        return {}

    # --- shutdown ---
    def shutdown(self, reason: str) -> None:
        """Cancel the migration, stop the guest (blocking; run it off the loop)."""
        m = self.migration
        if m is not None and m.status not in S.FINAL_STATES:
            try:
                m.cancel()
            except RuntimeError:
                # Postcopy: cannot be cancelled. Quitting cuts the channels: the
                # peer pauses; a paused thread here ends without resuming anything.
                try:
                    m.pause()
                except RuntimeError:
                    pass
                m.quit()
            m.wait(SHUTDOWN_WAIT)
        if self.pguest is not None:
            # The guest process goes with its worker (threads stopped on missing pages cannot pause).
            self.pguest.close(kill=True)
        elif self.workload is not None:
            self.workload.stop()
        self.emit("SHUTDOWN", {"guest": False, "reason": reason})
        thread = getattr(m, "_thread", None)
        if self.pguest is not None:
            return
        ram = self.ram if self.ram is not None else getattr(m, "ram", None)
        if ram is not None and (thread is None or not thread.is_alive()):
            ram.close()


def guest_config(size="256M", page_size="4K", backing="anon", blocks=1, fill="mixed",
                 workload_threads=1, workload_pattern="hotset", dirty_rate="32M", write_ratio=1.0,
                 hot_fraction=0.1, zipf_a=1.2, batch=None, prealloc=True, autostart=True,
                 guest="in-process") -> GuestConfig:
    """A GuestConfig from CLI-style values (sizes as strings with K/M/G).

    ``guest``: in-process (threads of the worker) or process (``ferry guest``, engine/process_guest.py;
    anonymous backing becomes memfd, which the worker can map too). Raises ValueError naming the value.
    """
    from .ram import parse_size
    from .workload import WorkloadConfig

    from ferry_migrate.channels import constants as C
    from ferry_migrate.channels.constants import HOST_PAGE_SIZES

    nbytes, page = parse_size(size), parse_size(page_size)
    if page not in HOST_PAGE_SIZES:
        raise ValueError(f"guest page size {page_size}: expected 4K, 2M or 1G")
    if blocks < 1:
        raise ValueError(f"guest blocks {blocks}: expected 1 or more RAM blocks")
    if nbytes <= 0:
        raise ValueError(f"guest size {size}: expected a positive size, e.g. 256M")
    if backing == "hugetlb" and page == C.PAGE_SIZE_4K:
        raise ValueError("hugetlb backing needs huge pages: give a page size of 2M or 1G (--page-size)")
    if nbytes % (blocks * page):
        raise ValueError(f"guest size {size} does not split into {blocks} block(s) of whole {page_size} pages")
    from .process_guest import GUESTS, process_backing

    if guest not in GUESTS:
        raise ValueError(f"guest {guest!r}: expected one of {', '.join(GUESTS)}")
    if guest == "process":
        backing = process_backing(backing)
    wl = None
    if workload_threads:
        wl = WorkloadConfig(threads=workload_threads, pattern=workload_pattern, dirty_rate=parse_size(dirty_rate),
                            write_ratio=write_ratio, hot_fraction=hot_fraction, zipf_a=zipf_a)
        if batch is not None:
            wl.batch = batch
        wl.validate()
    return GuestConfig(size=nbytes, page_size=page, backing=backing,
                       nblocks=blocks, fill=fill, workload=wl, dest_prealloc=prealloc, autostart=autostart,
                       guest=guest)


async def _serve(worker: Worker, control: str, events: str | None, keys: ServerKeys | None,
                 ready_json: bool, exit_with_parent: bool, qmp_addresses: list[str] | None = None) -> int:
    from . import __version__
    from .control.qmp import QMPServer

    server = ControlServer(worker, control, events, keys)
    await server.start()
    qmp = QMPServer(worker, qmp_addresses or [], package=f"ferry {__version__}")
    try:
        await qmp.start()
    except BaseException:
        await server.close()
        raise
    server.listeners.append(qmp.event)
    worker.emit = server.emit
    worker.endpoints = {"control": server.control, "events": server.events, "qmp": qmp.addresses}
    worker.curve = keys is not None
    reason = {"why": "host-qmp-quit"}

    def on_signal(name: str) -> None:
        reason["why"] = f"host-signal ({name})"
        server.stop()

    def quit_requested() -> None:
        server.stop()

    worker.request_stop = quit_requested
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig.name)
    watchdog = None
    if exit_with_parent:
        watchdog = asyncio.ensure_future(_watch_parent(os.getppid(), server, reason))
    ready = {"ready": True, "role": worker.role, "pid": os.getpid(), "control": server.control,
             "events": server.events, "qmp": qmp.addresses, "curve": keys is not None,
             "guest": worker.guest_shape()["description"]}
    if ready_json:
        print(json.dumps(ready), flush=True)
    else:
        print(f"ferry worker: {worker.role} ready (pid {ready['pid']}), guest {ready['guest']}\n"
              f"  control {server.control}\n  events  {server.events}"
              + "".join(f"\n  qmp     {a}" for a in qmp.addresses)
              + ("\n  CURVE authentication on" if keys else ""), flush=True)
    try:
        await server.serve()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        await asyncio.to_thread(worker.shutdown, reason["why"])
        await server.close()
        await qmp.close()
    return 0


async def _watch_parent(ppid: int, server: ControlServer, reason: dict) -> None:
    # A worker started by `ferry demo` must not outlive it, even if the demo
    # is killed with SIGKILL and cannot clean up.
    while True:
        await asyncio.sleep(0.5)
        if os.getppid() != ppid:
            reason["why"] = "parent-exited"
            server.stop()
            return


def run_worker(role: str, control: str, guest: GuestConfig, events: str | None = None,
               curve_dir: str | None = None, ready_json: bool = False, exit_with_parent: bool = False,
               layout: LayoutLimits | None = None, qmp: list[str] | None = None) -> int:
    """The `ferry worker` process: build the guest, serve until quit or SIGTERM. Returns the exit code.

    ``qmp``: QMP listener addresses (``unix:PATH``, ``tcp:HOST:PORT`` on loopback), see engine/control/qmp.py.
    """
    from .control.qmp import parse_qmp_address

    for a in qmp or []:
        parse_qmp_address(a)  # before the guest is built
    endpoints.check(control)
    if events:
        endpoints.check(events)
    keys = ServerKeys.load(curve_dir) if curve_dir else None
    if keys is None:
        # Checked before the guest is built: fail in milliseconds, not after filling RAM.
        for ep in (control, events or endpoints.default_events_endpoint(control)):
            endpoints.refuse_without_curve(ep)
    worker = Worker(role, guest, layout)
    return asyncio.run(_serve(worker, control, events, keys, ready_json, exit_with_parent, qmp))
