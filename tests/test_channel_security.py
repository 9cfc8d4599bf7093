"""Migration channels only the right peer can use: TLS (X.509, both sides verified), the
channel hello (migration, role, index, HMAC over the migration secret) and the version and
feature handshake. Real sockets on loopback, engine objects in this process; intruders are
real connections made by the test."""
import socket
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from ferry_migrate.channels import constants as C
from ferry_migrate.channels import hello as H
from ferry_migrate.channels.tls import TLSError, TLSTransport, gather, load_creds
from ferry_migrate.channels.transport import Listener, connect
from ferry_migrate.engine import states as ST
from ferry_migrate.engine.certs import make_certs
from ferry_migrate.engine.channel_auth import ROLE_MAIN, ROLE_MULTIFD, ROLE_POSTCOPY, ChannelGate, PlaintextRefused, open_channel
from ferry_migrate.engine.destination import MigrationDestination
from ferry_migrate.engine.params import MigrationConfig
from ferry_migrate.engine.ram import GuestRAM
from ferry_migrate.engine.source import MigrationSource
from ferry_migrate.engine.workload import Workload, WorkloadConfig

SIZE = 32 << 20
WAIT = 60  # s: generous; these wait for states, not for speed
SECRET = "a3f1c0ffee"


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    d = tmp_path_factory.mktemp("creds")
    make_certs(str(d))
    return str(d)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    d = tmp_path_factory.mktemp("other")
    make_certs(str(d))
    return str(d)


def _config(postcopy=False, preempt=False, channels=1, **params):
    cfg = MigrationConfig()
    cfg.set_capabilities({"postcopy-ram": postcopy or preempt, "postcopy-preempt": preempt})
    p = {"postcopy-channels": channels, **params}
    if postcopy or preempt:
        p.setdefault("postcopy-after-passes", 1)
    cfg.set_parameters(p)
    return cfg


def _dest(cfg, uri="tcp:127.0.0.1:0"):
    d_ram = GuestRAM.create(SIZE, 4096)
    d = MigrationDestination(d_ram, cfg)
    real = d.listen(uri)
    d.start()
    return d, real


def _source(cfg, uri, fill=True):
    s_ram = GuestRAM.create(SIZE, 4096)
    if fill:
        s_ram.fill("random")
    s = MigrationSource(s_ram, None, cfg)
    s.start(uri)
    return s


def _completes(s, d):
    try:
        assert s.wait(WAIT) == "completed", (s.status, s.stats.error, d.status, d.stats.error)
        assert d.wait(WAIT) == "completed", (d.status, d.stats.error)
        assert s.stats.digests and s.stats.digests == d.stats.digests
    finally:
        for m in (s, d):
            m.quit()


def _wait_refused(d, n):
    gate = d.gate if hasattr(d, "gate") else d
    deadline = time.monotonic() + WAIT
    while len(gate.refused) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(gate.refused) >= n, gate.refused
    return gate.refused


def _raw(uri):
    host, port = uri.split(":")[1], int(uri.split(":")[2])
    return socket.create_connection((host, port), timeout=WAIT)


# --- the hello codec (sans I/O) ---

@given(role=hs.sampled_from([C.FERRY_HELLO_ROLE_MAIN, C.FERRY_HELLO_ROLE_POSTCOPY]),
       index=hs.integers(0, 255), secret=hs.text(max_size=40),
       feats=hs.dictionaries(hs.text("abcdefghij-", min_size=1, max_size=12),
                             hs.one_of(hs.booleans(), hs.integers(0, 99), hs.text("xyz.0123", max_size=8)),
                             max_size=6))
def test_hello_round_trip_and_every_flipped_byte_is_refused(role, index, secret, feats):
    data = H.encode_hello(secret, role, index, feats)
    head, flen = data[:C.FERRY_HELLO_FIXED_SIZE], H.parse_hello_fixed(data[:C.FERRY_HELLO_FIXED_SIZE])[5]
    body, mac = data[C.FERRY_HELLO_FIXED_SIZE:C.FERRY_HELLO_FIXED_SIZE + flen], data[-C.FERRY_HELLO_MAC_SIZE:]
    h = H.verify_hello(secret, head, body, mac)
    assert (h.role, h.index, h.version) == (role, index, C.FERRY_WIRE_VERSION)
    assert h.features == {k: ("on" if v is True else "off" if v is False else str(v)) for k, v in feats.items()}
    with pytest.raises(H.HelloRefused):
        H.verify_hello(secret + "x", head, body, mac)
    for i in (0, 9, 11, 12, 20, 30, len(data) - 1):
        bad = bytearray(data)
        bad[i] ^= 0x40
        b = bytes(bad)
        with pytest.raises(H.HelloError):
            H.verify_hello(secret, b[:C.FERRY_HELLO_FIXED_SIZE], b[C.FERRY_HELLO_FIXED_SIZE:-32], b[-32:])


def test_hello_names_a_tls_handshake_and_a_qemu_stream():
    with pytest.raises(H.HelloRefused, match="TLS handshake"):
        H.parse_hello_fixed(b"\x16\x03\x01" + bytes(C.FERRY_HELLO_FIXED_SIZE - 3))
    with pytest.raises(H.HelloRefused, match="QEMU's stream header"):
        H.parse_hello_fixed(b"QEVM\x00\x00\x00\x03" + bytes(C.FERRY_HELLO_FIXED_SIZE - 8))


@pytest.mark.parametrize("kernel", [True, False], ids=["process_vm_readv", "memmove"])
def test_gather_copies_what_an_iovec_describes(kernel, monkeypatch):
    import numpy as np

    import ferry_migrate.channels.tls as T
    from ferry_migrate.channels.iovec import IOVEC, address
    monkeypatch.setattr(T, "_use_pvr", kernel and T._pvr is not None)
    bufs = [bytes([i % 256]) * (i % 97 + 1) for i in range(2500)]  # more than IOV_MAX entries
    iov = np.empty(len(bufs), IOVEC)
    iov["base"] = [address(b) for b in bufs]
    iov["len"] = [len(b) for b in bufs]
    out = bytearray(sum(map(len, bufs)))
    assert gather(iov, memoryview(out)) == len(out)
    assert bytes(out) == b"".join(bufs)


# --- the gate, with real sockets ---

def test_gate_refuses_an_index_already_taken_and_a_replayed_hello():
    cfg = _config(preempt=True, channels=2, **{"migration-secret": SECRET})
    lst = Listener("tcp:127.0.0.1:0")
    gate = ChannelGate(cfg)
    try:
        main = open_channel_async(lst.uri, cfg, ROLE_MAIN, 0)
        t_main = gate.accept(lst, ROLE_MAIN, 0, WAIT)
        main.join(WAIT)
        assert main.result is not None, main.error
        # A second connection claiming the main channel, then a replay of a POSTCOPY hello.
        dup = socket.create_connection((lst.uri.host, lst.uri.port))
        dup.sendall(H.encode_hello(SECRET, ROLE_MAIN, 0, _features(cfg)))
        p1 = H.encode_hello(SECRET, ROLE_POSTCOPY, 1, _features(cfg))
        first = socket.create_connection((lst.uri.host, lst.uri.port))
        first.sendall(p1)
        t1 = gate.accept(lst, ROLE_POSTCOPY, 1, WAIT)
        replay = socket.create_connection((lst.uri.host, lst.uri.port))
        replay.sendall(p1)
        deadline = time.monotonic() + WAIT
        while len(gate.refused) < 2 and time.monotonic() < deadline:
            with pytest.raises(TimeoutError):  # the gate accepts while the destination waits (for channel 2)
                gate.accept(lst, ROLE_POSTCOPY, 2, 0.5)
        reasons = [r for _, r in _wait_refused(gate, 2)]
        assert any("main: index already taken" in r for r in reasons), reasons
        assert any("replayed hello" in r for r in reasons), reasons
        for s in (dup, replay):
            s.settimeout(WAIT)
            assert s.recv(64) == b""  # closed without a reply
        for t in (t_main, t1):
            t.close()
        main.result.close()
        first.close()
    finally:
        gate.close()
        lst.close()


class open_channel_async(threading.Thread):
    """open_channel in a thread (it waits for the gate's reply)."""

    def __init__(self, uri, cfg, role, index):
        super().__init__(daemon=True)
        self.args, self.result, self.error = (uri, cfg, role, index), None, None
        self.start()

    def run(self):
        try:
            self.result = open_channel(*self.args)
        except BaseException as e:  # noqa: BLE001
            self.error = e


def _features(cfg):
    from ferry_migrate.engine.channel_auth import wire_features
    return wire_features(cfg)


# --- migrations ---

def test_intruders_connecting_first_are_refused_and_the_migration_completes():
    # liveness-timeout bounds the handshake of the silent intruder.
    cfg = dict(**{"migration-secret": SECRET, "liveness-timeout": 3})
    d, uri = _dest(_config(**cfg))
    silent = _raw(uri)  # never says anything
    garbage = _raw(uri)
    garbage.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(64))
    wrong = _raw(uri)
    wrong.sendall(H.encode_hello("not-the-secret", ROLE_MAIN, 0, _features(_config(**cfg))))
    reasons = [r for _, r in _wait_refused(d, 2)]
    assert any("not a Ferry channel hello" in r for r in reasons), reasons
    assert any("another migration, or a different migration-secret" in r for r in reasons), reasons
    assert d.status == ST.SETUP
    s = _source(_config(**cfg), uri)
    _completes(s, d)
    reasons = [r for _, r in _wait_refused(d, 3)]
    assert any("handshake bound" in r for r in reasons), reasons  # the silent one, after 3 s
    silent.close()
    garbage.close()
    wrong.close()


def test_a_source_with_the_wrong_secret_fails_and_the_right_one_then_completes():
    d, uri = _dest(_config(**{"migration-secret": SECRET}))
    bad = _source(_config(**{"migration-secret": "guess"}), uri)
    assert bad.wait(WAIT) == "failed"
    assert "refused the channel hello" in bad.stats.error, bad.stats.error
    assert [new for _, _, new in bad.sm.history] == [ST.SETUP, ST.FAILED]
    assert d.status == ST.SETUP
    _completes(_source(_config(**{"migration-secret": SECRET}), uri), d)


def test_a_feature_mismatch_is_named_and_changes_nothing_then_a_matching_source_completes():
    dcfg = _config(preempt=True, channels=1, **{"migration-secret": SECRET})
    d, uri = _dest(dcfg)
    s_ram = GuestRAM.create(SIZE, 4096)
    s_ram.fill("random")
    wl = Workload(s_ram, WorkloadConfig(threads=1, pattern="random", dirty_rate=4 << 20, batch=1))
    wl.start()
    try:
        before = bytes(s_ram.blocks[0].view[:1 << 20]) if hasattr(s_ram.blocks[0], "view") else None
        bad = MigrationSource(s_ram, wl, _config(preempt=True, channels=2, **{"migration-secret": SECRET}))
        bad.start(uri)
        assert bad.wait(WAIT) == "failed"
        assert "postcopy-channels: source 2, destination 1" in bad.stats.error, bad.stats.error
        assert [new for _, _, new in bad.sm.history] == [ST.SETUP, ST.FAILED]
        assert wl.running  # the source's guest was never paused
        del before
    finally:
        wl.stop()
    assert d.status == ST.SETUP and d.gate.mismatch is not None
    assert "postcopy-channels" in d.gate.mismatch.differences
    _completes(_source(_config(preempt=True, channels=1, **{"migration-secret": SECRET}), uri), d)


def test_a_newer_wire_version_is_a_named_mismatch():
    cfg = _config(**{"migration-secret": SECRET})
    d, uri = _dest(cfg)
    c = _raw(uri)
    hello = H.encode_hello(SECRET, ROLE_MAIN, 0, _features(cfg), version=C.FERRY_WIRE_VERSION + 1)
    c.sendall(hello)
    t = _SockT(c)
    with pytest.raises(H.WireMismatch, match=f"wire version: source {C.FERRY_WIRE_VERSION + 1}, destination "
                                              f"{C.FERRY_WIRE_VERSION}"):
        H.read_reply(t, SECRET, hello)
    c.close()
    assert d.status == ST.SETUP
    _completes(_source(cfg, uri), d)


class _SockT:
    def __init__(self, s):
        self.sock = s

    def recv_into(self, b):
        return self.sock.recv_into(b)


# --- TLS ---

def test_tls_precopy_completes_over_tls(creds):
    p = {"tls-creds": creds, "migration-secret": SECRET}
    d, uri = _dest(_config(**p))
    s = _source(_config(**p), uri)
    _completes(s, d)
    assert isinstance(d._transport, TLSTransport) and d._transport.cipher[1].startswith("TLSv1.")
    assert d._transport.peer_cert["subject"][1][0][1] == "ferry-source"


def test_tls_postcopy_with_preempt_completes_and_every_channel_is_tls(creds):
    p = {"tls-creds": creds, "migration-secret": SECRET}
    d, uri = _dest(_config(preempt=True, channels=2, **p))
    s = _source(_config(preempt=True, channels=2, **p), uri)
    _completes(s, d)
    assert len(d._pc_channels) == 2
    assert all(isinstance(c.reader.transport, TLSTransport) for c in d._pc_channels)
    assert all(isinstance(c.writer.transport, TLSTransport) for c in s.channels)
    assert d.stats.to_dict()["status"] == "completed"


def test_tls_recovery_after_a_pause_completes(creds):
    p = {"tls-creds": creds, "migration-secret": SECRET, "max-postcopy-bandwidth": 8 << 20}
    s_ram, d_ram = GuestRAM.create(64 << 20, 2 << 20), GuestRAM.create(64 << 20, 2 << 20)
    s_ram.fill("random")
    wl = WorkloadConfig(threads=1, pattern="random", dirty_rate=8 << 20, batch=1)
    s_wl, d_wl = Workload(s_ram, wl), Workload(d_ram, wl)
    s_wl.start()
    d = MigrationDestination(d_ram, _config(preempt=True, **p), workload=d_wl)
    uri = d.listen("tcp:127.0.0.1:0")
    d.start()
    s = MigrationSource(s_ram, s_wl, _config(preempt=True, **p))
    s.start(uri)
    try:
        for m in (s, d):
            assert m.sm.wait_for(ST.POSTCOPY_ACTIVE, WAIT) == ST.POSTCOPY_ACTIVE, (m.status, m.stats.error)
        s.pause()
        for m in (s, d):
            assert m.sm.wait_for(ST.POSTCOPY_PAUSED, WAIT) == ST.POSTCOPY_PAUSED
        new = d.recover("tcp:127.0.0.1:0")
        intruder = _raw(new)  # connects to the recovery's window first
        intruder.sendall(bytes(200))
        s.resume(new)
        assert s.wait(WAIT) == "completed", (s.status, s.stats.error)
        assert d.wait(WAIT) == "completed", (d.status, d.stats.error)
        assert s.stats.digests == d.stats.digests and d.recoveries == 1
        assert isinstance(d._transport, TLSTransport)
        assert any("TLS" in r for _, r in d.gate.refused), d.gate.refused
        intruder.close()
    finally:
        for m in (s, d):
            m.quit()
        s_wl.stop()
        d_wl.stop()


def test_a_certificate_from_another_ca_is_refused_and_the_real_source_then_completes(creds, other_ca):
    d, uri = _dest(_config(**{"tls-creds": creds, "migration-secret": SECRET}))
    bad = _source(_config(**{"tls-creds": other_ca, "migration-secret": SECRET}), uri)
    assert bad.wait(WAIT) == "failed"
    assert "certificate does not verify" in bad.stats.error, bad.stats.error
    assert d.status == ST.SETUP
    _completes(_source(_config(**{"tls-creds": creds, "migration-secret": SECRET}), uri), d)


def test_a_client_certificate_from_another_ca_is_refused_by_the_destination(creds, other_ca, tmp_path):
    # Trusts the destination's CA, presents a client certificate the destination's CA never signed.
    import shutil
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(f"{creds}/ca-cert.pem", mixed / "ca-cert.pem")
    for f in ("client-cert.pem", "client-key.pem"):
        shutil.copy(f"{other_ca}/{f}", mixed / f)
    d, uri = _dest(_config(**{"tls-creds": creds, "migration-secret": SECRET}))
    bad = _source(_config(**{"tls-creds": str(mixed), "migration-secret": SECRET}), uri)
    assert bad.wait(WAIT) == "failed", bad.status
    reasons = [r for _, r in _wait_refused(d, 1)]
    assert any("certificate does not verify" in r or "certificate" in r for r in reasons), reasons
    assert d.status == ST.SETUP
    d.cancel()


def test_tls_authz_refuses_a_client_not_listed(creds):
    d, uri = _dest(_config(**{"tls-creds": creds, "tls-authz": "someone-else", "migration-secret": SECRET}))
    bad = _source(_config(**{"tls-creds": creds, "migration-secret": SECRET}), uri)
    assert bad.wait(WAIT) == "failed"
    reasons = [r for _, r in _wait_refused(d, 1)]
    assert any("tls-authz: client certificate CN=ferry-source" in r or "O=ferry,CN=ferry-source" in r
               for r in reasons), reasons
    d.cancel()


@pytest.mark.parametrize("tls_on", ["source", "destination"])
def test_tls_on_one_side_only_is_refused_with_a_name(creds, tls_on):
    tls = {"tls-creds": creds, "migration-secret": SECRET}
    plain = {"migration-secret": SECRET}
    d, uri = _dest(_config(**(tls if tls_on == "destination" else plain)))
    bad = _source(_config(**(tls if tls_on == "source" else plain)), uri)
    assert bad.wait(WAIT) == "failed"
    reasons = [r for _, r in _wait_refused(d, 1)]
    if tls_on == "source":
        assert any("TLS handshake: the peer uses tls-creds and this side does not" in r for r in reasons), reasons
    else:
        assert any("does not speak TLS" in r for r in reasons), reasons
        assert "tls-creds set on both or neither" in bad.stats.error, bad.stats.error
    assert d.status == ST.SETUP
    d.cancel()


def test_a_tls_handshake_that_never_finishes_is_bounded_by_liveness_timeout(creds):
    d, uri = _dest(_config(**{"tls-creds": creds, "liveness-timeout": 2}))
    silent = _raw(uri)
    reasons = [r for _, r in _wait_refused(d, 1)]
    assert "handshake bound (liveness-timeout)" in reasons[0], reasons
    silent.close()
    d.cancel()


def test_plaintext_off_loopback_is_refused_unless_allowed(creds):
    with pytest.raises(PlaintextRefused, match="needs tls-creds"):
        MigrationDestination(GuestRAM.create(1 << 20, 4096), _config()).listen("tcp:0.0.0.0:0")
    with pytest.raises(PlaintextRefused, match="plaintext-off-loopback"):
        MigrationSource(GuestRAM.create(1 << 20, 4096), None, _config()).start("tcp:192.0.2.1:4444")
    for p in ({"plaintext-off-loopback": True}, {"tls-creds": creds}):
        d = MigrationDestination(GuestRAM.create(1 << 20, 4096), _config(**p))
        assert d.listen("tcp:0.0.0.0:0").startswith("tcp:0.0.0.0:")
        d.listener.close()


def test_load_creds_names_what_is_missing(tmp_path):
    with pytest.raises(TLSError, match="ca-cert.pem missing"):
        load_creds(str(tmp_path))
    with pytest.raises(TLSError, match="not a directory"):
        load_creds(str(tmp_path / "nope"))


def test_tls_transport_send_timeout_is_a_peer_timeout(creds):
    """A TLS writer whose peer reads nothing fails with PeerTimeout after the liveness bound."""
    from ferry_migrate.channels.errors import PeerTimeout
    from ferry_migrate.channels.qemufile import QEMUFileWriter
    from ferry_migrate.channels.tls import client_wrap, server_wrap
    c = load_creds(creds)
    lst = Listener("tcp:127.0.0.1:0", liveness=1)
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("t", server_wrap(lst.accept(WAIT), c, "", WAIT)))
    th.start()
    t = client_wrap(connect(lst.uri, liveness=1), c, "127.0.0.1", WAIT)
    th.join(WAIT)
    w = QEMUFileWriter(t, name="precopy")
    with pytest.raises(PeerTimeout, match="send timed out"):
        for _ in range(10_000):
            w.put_ref(bytes(1 << 20))
    t.close()
    out["t"].close()
    lst.close()


def test_query_migrate_parameters_never_shows_the_secret():
    from ferry_migrate.engine.worker import Worker, guest_config
    w = Worker("source", guest_config(size="4M", workload_threads=0))
    try:
        assert w.query_parameters({})["migration-secret"] == ""
        w.set_parameters({"migration-secret": "hunter2"})
        q = w.query_parameters({})
        assert q["migration-secret"] == "(set)" and "hunter2" not in repr(q)
        assert w.config.param("migration-secret") == "hunter2"
    finally:
        w.shutdown("test")


def test_a_file_migration_with_a_secret_needs_no_hello(tmp_path):
    p = {"migration-secret": SECRET}
    s = _source(_config(**p), f"file:{tmp_path}/saved")
    assert s.wait(WAIT) == "completed", s.stats.error
    d, _ = _dest(_config(**p), f"file:{tmp_path}/saved")
    assert d.wait(WAIT) == "completed", d.stats.error
    s.quit()
    d.quit()


def test_a_destination_that_never_answers_the_hello_fails_the_source_within_liveness_timeout():
    lst = socket.create_server(("127.0.0.1", 0))
    held = []
    th = threading.Thread(target=lambda: held.append(lst.accept()[0]), daemon=True)
    th.start()
    s = _source(_config(**{"migration-secret": SECRET, "liveness-timeout": 2}),
                f"tcp:127.0.0.1:{lst.getsockname()[1]}")
    assert s.wait(WAIT) == "failed"
    assert "channel hello reply: no byte within the handshake bound" in s.stats.error, s.stats.error
    assert [new for _, _, new in s.sm.history] == [ST.SETUP, ST.FAILED]
    th.join(WAIT)
    for c in held:
        c.close()
    lst.close()


def test_tls_writer_sends_small_fields_pages_and_a_buffer_larger_than_the_gather_buffer(creds):
    import os as _os

    from ferry_migrate.channels.qemufile import QEMUFileReader, QEMUFileWriter
    from ferry_migrate.channels.tls import GATHER_BUFFER, client_wrap, server_wrap
    c = load_creds(creds)
    lst = Listener("tcp:127.0.0.1:0", liveness=WAIT)
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("t", server_wrap(lst.accept(WAIT), c, "", WAIT)))
    th.start()
    t = client_wrap(connect(lst.uri, liveness=WAIT), c, "127.0.0.1", WAIT)
    th.join(WAIT)
    big = _os.urandom(3 * GATHER_BUFFER + 5)
    pages = [_os.urandom(4096) for _ in range(600)]
    w = QEMUFileWriter(t, name="precopy")
    w.auto_flush = 1 << 30  # everything goes in the one flush below
    w.put_be32(0x5145564D)
    w.put_iov(pages, 4096 * len(pages))
    w.put_ref(big)
    w.put_byte(7)
    sender = threading.Thread(target=w.flush)  # more than the socket buffers hold: read meanwhile
    sender.start()
    want = (0x5145564D).to_bytes(4, "big") + b"".join(pages) + big + b"\x07"
    r = QEMUFileReader(out["t"], bufsize=8 << 20, name="precopy")
    r.fill(len(want))
    assert bytes(r.view()[:len(want)]) == want
    sender.join(WAIT)
    assert w.error is None and w.transferred == len(want)
    t.close()
    out["t"].close()
    lst.close()


class _CountingListener:
    """A real Listener that counts accept calls that timed out (no connection came), and sets
    ``accepted`` when one came."""

    def __init__(self, lst):
        self.lst, self.uri, self.idle, self.accepted = lst, lst.uri, 0, threading.Event()

    def accept(self, timeout=None):
        try:
            t = self.lst.accept(timeout=timeout)
        except TimeoutError:
            self.idle += 1
            raise
        self.accepted.set()
        return t


def test_gate_takes_sequential_channels_without_idling_in_accept():
    # A source opens its channels one by one, each waiting for its reply: the gate must hand
    # each out once its handshake is done, not after idling in accept for a next connection
    # that cannot come yet (64 multifd channels took seconds so).
    n = 8
    cfg = _config(**{"migration-secret": SECRET})
    cfg.set_capabilities({"multifd": True})
    lst = Listener("tcp:127.0.0.1:0")
    counting = _CountingListener(lst)
    gate = ChannelGate(cfg)
    got, clients = [], []
    try:
        for i in range(1, n + 1):
            counting.accepted.clear()
            hello = H.encode_hello(SECRET, ROLE_MULTIFD, i, _features(cfg))
            s = socket.create_connection((lst.uri.host, lst.uri.port))
            clients.append(s)
            # The hello leaves a little after the gate accepted the connection, as a source's
            # does when either side is busy: the handshake is still running when the gate loops.
            sender = threading.Thread(target=lambda s=s, h=hello: (counting.accepted.wait(WAIT), time.sleep(0.005),
                                                                   s.sendall(h)), daemon=True)
            sender.start()
            got.append(gate.accept(counting, ROLE_MULTIFD, i, WAIT))
            sender.join(WAIT)
        for s in clients:
            s.settimeout(WAIT)
            assert s.recv(4)  # each got its reply
        # The old gate idled once per channel; a loaded host may delay a handshake now and then.
        assert counting.idle < n // 2, counting.idle
    finally:
        for t in got:
            t.close()
        for s in clients:
            s.close()
        gate.close()
        lst.close()
