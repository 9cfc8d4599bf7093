"""The destination's proof that its guest never ran: the one way back for a paused source.

The window it closes: the source enters ``postcopy-active`` before the first
byte of the package with POSTCOPY_RUN (the point of no return), so a link that
dies just then leaves the source ``postcopy-paused`` (the destination may run
the guest) while the destination, which never read the package, failed before
RUN (``failed``; its guest never ran). Neither side alone can end that safely:
only the destination knows it never ran the guest.

So a destination that failed after POSTCOPY_ADVISE and before RUN accepts
``migrate-recover`` too. It listens as a recovery would, lets in only a
connection that proves it belongs to this migration (the channel hello with
this migration's secret: engine/channel_auth.py), and answers it on the return
path with SHUT carrying FERRY_SHUT_NEVER_RAN. A source in ``postcopy-recover``
that reads it fails the migration (event ``never-ran``) and runs its guest
again: both sides end ``failed``, the guest runs on the source, as for any
failure before the switch.

Without a migration secret nothing identifies the migration a connection
belongs to, and the word could reach the source of another migration whose
guest does run elsewhere: the proof is refused then (NeverRanRefused).
"""
from __future__ import annotations

import logging
import threading
import time

from ferry_migrate.channels import codec
from ferry_migrate.channels import constants as C
from ferry_migrate.channels.errors import ChannelError
from ferry_migrate.channels.qemufile import QEMUFileWriter
from ferry_migrate.channels.transport import Listener

from .channel_auth import ROLE_MAIN, ChannelGate, check_plaintext

log = logging.getLogger("ferry.migration")

PROOF_WAIT = 120.0  # s the listener waits for the source's recovery connection
READ_BACK = 10.0  # s to let the source read the word before the connection closes


class NeverRanRefused(RuntimeError):
    """migrate-recover on a failed destination that cannot prove its guest never ran."""


class NeverRanProof:
    """Serves the proof on one listener, in its own thread (``start``); ``close`` ends it.

    ``dest`` is the failed MigrationDestination; ``uri`` where to listen.
    ``sent``: how many recovery connections got the word; ``error``: why the
    last try did not (a refused or missing connection).
    """

    def __init__(self, dest, uri: str):
        cfg = dest.config
        if not (cfg.param("migration-secret") and cfg.param("peer") == "ferry"):
            raise NeverRanRefused(
                "migrate-recover: this destination failed before it ran the guest, but it can say so only to "
                "a Ferry source that proves it belongs to this migration (parameter migration-secret, set by "
                "`ferry migrate`); without it the word could reach another migration's source")
        self.dest = dest
        self.listener = Listener(uri, liveness=cfg.param("liveness-timeout"))
        try:
            check_plaintext(cfg, self.listener.uri, "listening on")
        except ValueError:
            self.listener.close()
            raise
        self.gate = ChannelGate(cfg)
        self.sent = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="never-ran", daemon=True)

    @property
    def uri(self) -> str:
        return str(self.listener.uri)

    @property
    def serving(self) -> bool:
        """Still listening for the source (not closed, not given up)."""
        return self._thread.is_alive() and not self._stop.is_set()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(2)

    def _serve(self) -> None:
        deadline = time.monotonic() + PROOF_WAIT
        try:
            while not self._stop.is_set():
                if time.monotonic() > deadline:
                    self.error = f"no recovery connection came in {PROOF_WAIT:.0f} s"
                    return
                try:
                    t = self.gate.accept(self.listener, ROLE_MAIN, 0, 0.2)
                except TimeoutError:
                    continue
                self._answer(t)
                return
        except (ChannelError, OSError) as e:
            self.error = f"recovery connection: {e}"
        finally:
            self.listener.close()
            self.gate.close()

    def _answer(self, t) -> None:
        w = QEMUFileWriter(t, name="return-path")
        try:
            w.put_bytes(codec.encode_rp_shut(C.FERRY_SHUT_NEVER_RAN))
            w.flush()
            self.sent += 1
            log.warning("told the source that this destination never ran the guest (it failed before "
                        "POSTCOPY_RUN); the guest runs on the source again")
            # Let the source read it before the connection goes: wait for its close.
            t.set_recv_timeout(0.5)  # short waits: close() is not held up
            buf = bytearray(64 << 10)
            end = time.monotonic() + READ_BACK
            while time.monotonic() < end and not self._stop.is_set():
                try:
                    if t.recv_into(memoryview(buf)) == 0:
                        break
                except (BlockingIOError, TimeoutError):
                    continue
                except (ChannelError, OSError):
                    break
        finally:
            t.close()
