"""A destination cancelled while it waited for a source it had refused says why none got in.

Real source and destination over loopback TCP: the source's hello differs in
multifd-channels, the destination refuses it and waits on (a right source may still
come); cancelled then, its error names the refused difference, as the source's does.
"""
from __future__ import annotations

from ferry_migrate.engine import states as ST

from .test_channel_security import SECRET, WAIT, _config, _dest, _source


def test_a_cancelled_destination_names_the_source_it_refused():
    dcfg = _config(**{"migration-secret": SECRET})
    dcfg.set_capabilities({"multifd": True})
    dcfg.set_parameters({"multifd-channels": 2})
    d, uri = _dest(dcfg)
    scfg = _config(**{"migration-secret": SECRET})
    scfg.set_capabilities({"multifd": True})
    scfg.set_parameters({"multifd-channels": 16})
    s = _source(scfg, uri, fill=False)
    try:
        assert s.wait(WAIT) == ST.FAILED
        assert "multifd-channels: source 16, destination 2" in s.stats.error, s.stats.error
        assert d.status == ST.SETUP and d.gate.mismatch is not None
        d.cancel()
        assert d.wait(WAIT) == ST.CANCELLED
        assert d.stats.error.startswith("incoming migration cancelled"), d.stats.error
        assert "multifd-channels: source 16, destination 2" in d.stats.error, d.stats.error
    finally:
        for m in (s, d):
            m.quit()
