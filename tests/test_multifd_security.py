"""Multifd channels under the channel hello and TLS (engine/channel_auth.py).

Each multifd connection is TLS'd like the others and proves itself with a
hello of role multifd; a multifd index connecting twice is refused by the gate
and the migration goes on; multifd (or its channel count) on one side only is
a named mismatch before anything moves.
"""
from __future__ import annotations

import pytest

from ferry_migrate.channels import constants as C
from ferry_migrate.channels import hello as H
from ferry_migrate.channels.tls import TLSTransport
from ferry_migrate.engine import states as ST
from ferry_migrate.engine.channel_auth import wire_features

from .test_channel_security import SECRET, _completes, _config, _dest, _raw, _source, _wait_refused, creds  # noqa: F401


def _mf(n=2, **params):
    cfg = _config(**params)
    cfg.set_capabilities({"multifd": True})
    cfg.set_parameters({"multifd-channels": n})
    return cfg


def test_multifd_over_tls_every_channel_tls_and_proved(creds):  # noqa: F811
    p = {"tls-creds": creds, "migration-secret": SECRET}
    d, uri = _dest(_mf(3, **p))
    s = _source(_mf(3, **p), uri)
    _completes(s, d)
    mf = d._multifd
    assert sorted(mf.by_id) == [1, 2, 3]
    assert all(isinstance(c.reader.transport, TLSTransport) for c in mf.channels)
    assert all(isinstance(c.writer.transport, TLSTransport) for c in s.multifd.channels)
    assert all(c.normal_pages > 0 for c in mf.channels)


def test_a_multifd_channel_connecting_twice_is_refused_and_the_migration_completes():
    cfg = _mf(2, **{"migration-secret": SECRET, "liveness-timeout": 5})
    d, uri = _dest(cfg)
    s = _source(_mf(2, **{"migration-secret": SECRET}), uri)
    _completes(s, d)
    # An intruder claiming multifd-1 again: refused by the gate, the migration is not touched.
    d2, uri2 = _dest(_mf(2, **{"migration-secret": SECRET, "liveness-timeout": 5}))
    c1 = _raw(uri2)
    c1.sendall(H.encode_hello(SECRET, C.FERRY_HELLO_ROLE_MULTIFD, 1, wire_features(cfg)))
    c2 = _raw(uri2)
    c2.sendall(H.encode_hello(SECRET, C.FERRY_HELLO_ROLE_MULTIFD, 1, wire_features(cfg)))
    reasons = [r for _, r in _wait_refused(d2, 1)]
    assert any("multifd-1: index already taken" in r for r in reasons), reasons
    c1.close()
    c2.close()
    d2.cancel()


@pytest.mark.parametrize("dest_n,words", [(3, "multifd-channels: source 2, destination 3"),
                                          (0, "multifd: source on, destination off")])
def test_multifd_mismatch_is_named_before_anything_moves(dest_n, words):
    dcfg = _mf(dest_n, **{"migration-secret": SECRET}) if dest_n else _config(**{"migration-secret": SECRET})
    d, uri = _dest(dcfg)
    bad = _source(_mf(2, **{"migration-secret": SECRET}), uri)
    assert bad.wait(60) == "failed"
    assert words in bad.stats.error, bad.stats.error
    assert d.status == ST.SETUP
    d.cancel()
    bad.quit()
