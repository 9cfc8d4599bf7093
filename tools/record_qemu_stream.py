"""Record a real QEMU migration stream into a file (gzip-compressed), for the interop tests.

Starts ``qemu-system-x86_64 -S -m 64M -nographic -nodefaults -machine pc,accel=tcg``
(the guest never runs: its RAM is what the firmware loader left, mostly zero), drives
it over a QMP unix socket, migrates it with ``migrate`` to ``exec:cat > FILE`` and
waits for ``completed``; then quits QEMU and gzips the file. The result is a few
hundred KiB: header, configuration, the RAM section (MEM_SIZE block list, PAGE and
ZERO records with and without CONTINUE, EOS) and QEMU's device sections. Beside it,
FILE.json records how it was made: QEMU's version, the stream's size and sha256, and
the sha256 of the firmware QEMU loaded into its "pc.bios" RAM block (bios-256k.bin),
so a reader can check the pages it decodes against a file it did not decode.

    python tools/record_qemu_stream.py tests/data/qemu-7.2-pc-64M.stream.gz

Prints QEMU's version and the stream's size. Exit status 1 (with QEMU's output) if
QEMU is missing, or the migration does not complete within --timeout seconds.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

QEMU = "qemu-system-x86_64"
QEMU_ARGS = ["-S", "-m", "64M", "-nographic", "-nodefaults", "-machine", "pc,accel=tcg"]
# Where Debian's QEMU finds the SeaBIOS image it maps as "pc.bios".
BIOS_PATHS = ("/usr/share/seabios/bios-256k.bin", "/usr/share/qemu/bios-256k.bin")


def bios_path() -> str | None:
    """The bios-256k.bin QEMU loads for -machine pc, or None if not found."""
    return next((p for p in BIOS_PATHS if os.path.exists(p)), None)


class QMP:
    """A minimal QMP client over a unix socket: one command at a time, events skipped."""

    def __init__(self, path: str, timeout: float):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self.greeting = self._read()
        self.call("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP: QEMU closed the connection")
        return json.loads(line)

    def call(self, cmd: str, **args) -> dict:
        self.file.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self._read()
            if "event" in msg:
                continue
            if "error" in msg:
                raise RuntimeError(f"QMP {cmd}: {msg['error']}")
            return msg["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def record(out: str, timeout: float = 120.0, qemu: str = QEMU) -> dict:
    """Record one stream into ``out`` (gzip) and its facts into ``out + ".json"``; returns the facts.

    Raises RuntimeError naming what failed (QEMU missing, no QMP, migration not completed).
    """
    exe = shutil.which(qemu)
    if exe is None:
        raise RuntimeError(f"{qemu} not found in PATH: install qemu-system-x86")
    with tempfile.TemporaryDirectory(prefix="ferry-qemu-") as tmp:
        qmp_path = os.path.join(tmp, "qmp.sock")
        raw = os.path.join(tmp, "stream")
        proc = subprocess.Popen([exe, *QEMU_ARGS, "-qmp", f"unix:{qmp_path},server=on,wait=off"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        qmp = None
        try:
            deadline = time.monotonic() + timeout
            while not os.path.exists(qmp_path):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"QEMU did not open its QMP socket: {proc.communicate()[0]!r}")
                time.sleep(0.05)
            qmp = QMP(qmp_path, timeout)
            ver = qmp.greeting["QMP"]["version"]["qemu"]
            version = f"{ver['major']}.{ver['minor']}.{ver['micro']}"
            qmp.call("migrate", uri=f"exec:cat > {raw}")
            while True:
                st = qmp.call("query-migrate")
                if st.get("status") == "completed":
                    break
                if st.get("status") in ("failed", "cancelled"):
                    raise RuntimeError(f"QEMU migration {st['status']}: {st.get('error-desc')}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"QEMU migration not completed after {timeout:g} s: {st}")
                time.sleep(0.05)
            qmp.call("quit")
        finally:
            if qmp is not None:
                qmp.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with open(raw, "rb") as f:
            data = f.read()
    # mtime=0: the same stream gives the same file.
    with open(out, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(data)
    bios = bios_path()
    facts = {"qemu": version, "command": [qemu, *QEMU_ARGS], "migrate": "exec:cat > FILE",
             "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
             "bios-256k.bin": {"path": bios, "sha256": sha256_file(bios) if bios else None}}
    with open(out + ".json", "w") as f:
        json.dump(facts, f, indent=1)
        f.write("\n")
    return facts


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="where to write the gzip-compressed stream")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for QEMU to start and migrate")
    ap.add_argument("--qemu", default=QEMU, help="QEMU binary")
    a = ap.parse_args(argv)
    try:
        info = record(a.out, a.timeout, a.qemu)
    except RuntimeError as e:
        print(f"record_qemu_stream: {e}", file=sys.stderr)
        return 1
    print(f"QEMU {info['qemu']}: {info['bytes']} bytes of stream, {os.path.getsize(a.out)} gzip-compressed "
          f"in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
