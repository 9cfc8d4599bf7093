"""A small real QEMU guest for interop tests, driven over QMP (qemu.qmp).

Paused TCG guests (``-S``), 64 MiB, no default devices, with a few MiB of
known random bytes loaded into guest RAM by ``-device loader``. Tests skip,
saying why, when qemu-system-x86_64 or the qemu.qmp package is absent.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import numpy as np
import pytest

QEMU = shutil.which("qemu-system-x86_64")
GUEST_MEM = 64 << 20
LOAD_ADDR = 0x200000  # guest-physical = offset in pc.ram (below 4 GiB)
LOAD_SIZE = 4 << 20
BIOS = "/usr/share/qemu/bios-256k.bin"


LAST_KNOWN_PAGE = LOAD_ADDR + LOAD_SIZE - 4096  # guest-physical: the last page of the known bytes


def require_qemu():
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 not installed (apt install qemu-system-x86; CI installs it)")
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        pytest.skip("the qemu.qmp package is missing (pip install -e '.[test]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def known_bytes(seed: int = 7, size: int = LOAD_SIZE) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


class QemuVM:
    """One qemu-system-x86_64 process with a QMP socket; closed (quit, then killed) by close()."""

    def __init__(self, workdir: str, name: str, load: bytes | None = None, incoming: str | None = None,
                 mem: int = GUEST_MEM):
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.dir = tempfile.mkdtemp(prefix=f"{name}-", dir="/tmp")  # short: AF_UNIX paths <= 107 bytes
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        args = [QEMU, "-machine", "pc", "-accel", "tcg", "-m", f"{mem >> 20}M", "-nodefaults", "-S",
                "-display", "none", "-serial", "none", "-monitor", "none",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if load is not None:
            blob = os.path.join(self.dir, "known.bin")
            with open(blob, "wb") as f:
                f.write(load)
            args += ["-device", f"loader,file={blob},addr=0x{LOAD_ADDR:x},force-raw=on"]
        if incoming is not None:
            args += ["-incoming", incoming]
        self.log = open(os.path.join(workdir, f"{name}.log"), "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        self.qmp = QEMUMonitorProtocol(self.qmp_path)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.qmp.connect()
                break
            except (OSError, Exception):  # noqa: BLE001 - the socket is not there yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"QEMU {name} did not start: see {self.log.name}")
                time.sleep(0.1)

    def cmd(self, name: str, **args):
        """A QMP command's return value; RuntimeError with QEMU's error description."""
        r = self.qmp.cmd_raw(name, args or None) if hasattr(self.qmp, "cmd_raw") else self.qmp.cmd(name, args or None)
        if "error" in r:
            raise RuntimeError(f"QMP {name}: {r['error'].get('desc')}")
        return r["return"]

    def hmp(self, line: str) -> str:
        return self.cmd("human-monitor-command", **{"command-line": line})

    def caps(self, **caps):
        self.cmd("migrate-set-capabilities",
                 capabilities=[{"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()])

    def wait_migration(self, want=("completed",), timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            q = self.cmd("query-migrate")
            if q.get("status") in want:
                return q
            if q.get("status") == "failed" and "failed" not in want:
                raise RuntimeError(f"QEMU migration failed: {q.get('error-desc')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"QEMU migration status {q.get('status')}, waiting for {want}")
            time.sleep(0.05)

    def read_memory(self, addr: int, size: int) -> bytes:
        """Guest-physical memory via pmemsave (on a postcopy destination it requests missing pages)."""
        path = os.path.join(self.dir, f"mem-{addr:x}-{size:x}.bin")
        self.cmd("pmemsave", val=addr, size=size, filename=path)
        with open(path, "rb") as f:
            data = f.read()
        os.unlink(path)
        return data

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


@pytest.fixture
def vms(tmp_path):
    """``make(name, **QemuVM kwargs)``: QEMU guests for one test, all closed at its end."""
    require_qemu()
    made = []

    def make(name, **kw):
        vm = QemuVM(str(tmp_path), name, **kw)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        vm.close()


def assert_reads_known_page(vm: "QemuVM", known: bytes) -> None:
    """QEMU's monitor reads the last known page's first 16 bytes (in postcopy: a page request)."""
    out = vm.hmp(f"xp /4wx 0x{LAST_KNOWN_PAGE:x}")
    words = [int(w, 16) for w in out.split(":")[1].split()]
    assert words == np.frombuffer(known[-4096:-4080], "<u4").tolist()
