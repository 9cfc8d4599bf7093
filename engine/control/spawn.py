"""Start `ferry worker` processes on this host and wait until they serve (demo, tests).

A worker prints one JSON line on stdout once its sockets are bound (with
``--json``); everything else it says goes to stderr, here a log file, so a
pipe never fills up and blocks it.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY_TIMEOUT = 60.0  # s: a large guest takes a while to fill


class WorkerStartError(RuntimeError):
    """A worker exited or stayed silent instead of reporting ready; carries its log's tail."""


def worker_command(role: str, control: str, options: list[str] | None = None) -> list[str]:
    """The command line of a worker run with this Python (works without the console script)."""
    return [sys.executable, "-m", "ferry_migrate.engine.cli", "worker", "--role", role, "--control", control, "--json",
            *(options or [])]


@dataclass
class WorkerProcess:
    """A running worker: its process, its endpoints and where its log is."""

    role: str
    proc: subprocess.Popen
    log_path: str
    control: str = ""
    events: str = ""
    own_group: bool = False  # started in its own session: signals go to its whole group
    ready: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict:
        """Read the ready line; raises WorkerStartError with the log if it never comes."""
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        buf = b""
        try:
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorkerStartError(f"{self.role} worker (pid {self.pid}) not ready after {timeout:g} s\n"
                                           + self.log_tail())
                if not sel.select(left):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    self.proc.wait(5)
                    raise WorkerStartError(f"{self.role} worker exited with status {self.proc.returncode} "
                                           f"before it was ready:\n{self.log_tail()}")
                buf += chunk
        finally:
            sel.close()
        self.ready = json.loads(buf.split(b"\n", 1)[0])
        self.control = self.ready["control"]
        self.events = self.ready["events"]
        return self.ready

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (a clean exit: cancel, close sockets, remove ipc files), then SIGKILL."""
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_pipes()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the worker (its whole process group when it has its own)."""
        self._signal(signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._close_pipes()

    def _signal(self, sig: int) -> None:
        try:
            if self.own_group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _close_pipes(self) -> None:
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()


def spawn_worker(role: str, control: str, options: list[str] | None = None, log_path: str = os.devnull,
                 new_session: bool = False, env: dict | None = None,
                 wrapper: list[str] | None = None) -> WorkerProcess:
    """Start a worker (do not wait for it: call ``wait_ready``, so several can start at once).

    ``wrapper`` goes in front of the command, e.g. ``["ip", "netns", "exec", NS]`` to run
    the worker in a network namespace (``ip netns exec`` execs the command in place,
    so the process is still the worker and signals reach it directly).
    """
    cmd = [*(wrapper or []), *worker_command(role, control, options)]
    env = dict(os.environ if env is None else env)
    # Run the same Ferry as the caller, installed or not (the working
    # directory stays the caller's: relative paths in options keep their meaning).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                start_new_session=new_session, env=env)
    finally:
        log.close()
    return WorkerProcess(role, proc, log_path, own_group=new_session)
