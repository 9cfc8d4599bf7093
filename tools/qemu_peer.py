"""QEMU-to-QEMU precopy runs for bench_precopy.py ``--peer qemu``: the same measurement on QEMU 7.2.

Two ``qemu-system-x86_64`` processes (pc machine, TCG, paused guests: ``-S``,
no devices) on loopback, driven over QMP (the qemu.qmp package): the source's
guest RAM is filled with random bytes by ``-device loader`` (a blob file of
the guest size less 2 MiB, loaded at 1 MiB), the destination preallocates its
RAM (``-mem-prealloc``), ``max-bandwidth`` is lifted (QEMU 7.2's default is
128 MiB/s) and, with ``multifd``, ``multifd-channels`` is set on both. The
figure is QEMU's own: ``ram.transferred`` / ``total-time`` of the source's
query-migrate (start to completion; setup included, as in Ferry's
transfer-time).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import numpy as np

QEMU = shutil.which("qemu-system-x86_64")
LOAD_ADDR = 1 << 20
MIB = 1 << 20


def available() -> str | None:
    """None when QEMU and qemu.qmp are there, else why not."""
    if QEMU is None:
        return "qemu-system-x86_64 not installed (apt install qemu-system-x86)"
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        return "the qemu.qmp package is missing (pip install qemu.qmp)"
    return None


def random_blob(path: str, size: int, seed: int = 11) -> str:
    """A file of ``size`` random bytes (written in 64 MiB pieces)."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 64 * MIB)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Qemu:
    def __init__(self, name: str, mem: int, extra: list[str], logdir: str):
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.dir = tempfile.mkdtemp(prefix=f"fq-{name}-", dir="/tmp")  # AF_UNIX paths stay short
        qmp = os.path.join(self.dir, "qmp.sock")
        args = [QEMU, "-machine", "pc", "-accel", "tcg", "-m", f"{mem // MIB}M", "-nodefaults", "-S",
                "-display", "none", "-serial", "none", "-monitor", "none",
                "-qmp", f"unix:{qmp},server=on,wait=off", *extra]
        self.log = open(os.path.join(logdir, f"qemu-{name}.log"), "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        self.qmp = QEMUMonitorProtocol(qmp)
        deadline = time.monotonic() + 120  # -mem-prealloc of a large guest takes a while
        while True:
            try:
                self.qmp.connect()
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"QEMU {name} did not start: see {self.log.name}")
                time.sleep(0.1)

    def cmd(self, name: str, **args):
        r = self.qmp.cmd_raw(name, args or None) if hasattr(self.qmp, "cmd_raw") else self.qmp.cmd(name, args or None)
        if "error" in r:
            raise RuntimeError(f"QMP {name}: {r['error'].get('desc')}")
        return r["return"]

    def close(self) -> None:
        try:
            self.qmp.cmd("quit")
        except Exception:  # noqa: BLE001 - already gone
            pass
        try:
            self.qmp.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_qemu(size: int, blob: str, multifd: int, downtime_limit: int, logdir: str,
             timeout: float = 300.0) -> dict:
    """One QEMU 7.2 precopy migration of a paused ``size``-byte guest; returns its figures.

    ``multifd``: multifd-channels (0: capability multifd off). Raises
    RuntimeError when a QEMU does not start or the migration fails.
    """
    port = _free_port()
    dst = _Qemu("dst", size, ["-mem-prealloc", "-incoming", f"tcp:127.0.0.1:{port}"], logdir)
    src = None
    try:
        src = _Qemu("src", size, ["-device", f"loader,file={blob},addr=0x{LOAD_ADDR:x},force-raw=on"], logdir)
        caps = [{"capability": "multifd", "state": bool(multifd)}]
        for q in (src, dst):
            q.cmd("migrate-set-capabilities", capabilities=caps)
            params = {"downtime-limit": downtime_limit}
            if multifd:
                params["multifd-channels"] = multifd
            q.cmd("migrate-set-parameters", **params)
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + timeout
        while True:
            q = src.cmd("query-migrate")
            if q.get("status") == "completed":
                break
            if q.get("status") in ("failed", "cancelled"):
                raise RuntimeError(f"QEMU migration {q.get('status')}: {q.get('error-desc')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"QEMU migration still {q.get('status')} after {timeout:.0f} s")
            time.sleep(0.02)
        nbytes = q["ram"]["transferred"]
        return {"transferred": nbytes, "total-time-ms": q["total-time"], "setup-time-ms": q.get("setup-time", 0),
                "downtime-ms": q.get("downtime", 0), "mibps": nbytes / MIB / (q["total-time"] / 1000)}
    finally:
        for q in (src, dst):
            if q is not None:
                q.close()
