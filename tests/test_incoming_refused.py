"""A destination whose listener refused a source at the channel hello (here: multifd-channels
differ, with a migration-secret) stays in setup, and its query-migrate says why in
`incoming-refused`, naming the parameter and both values as the source's error does."""
from __future__ import annotations

import pytest

from ferry_migrate.engine import states as ST

from .test_channel_security import SECRET, _config, _dest, _source

WAIT = 30


@pytest.mark.parametrize("src_n,dst_n", [(4, 2), (2, 5)])
def test_a_refused_source_is_named_in_the_destinations_query(src_n, dst_n):
    def cfg(n):
        c = _config(**{"migration-secret": SECRET, "liveness-timeout": 10})
        c.set_capabilities({"multifd": True})
        c.set_parameters({"multifd-channels": n})
        return c

    words = f"multifd-channels: source {src_n}, destination {dst_n}"
    d, uri = _dest(cfg(dst_n))
    s = _source(cfg(src_n), uri)
    try:
        assert s.wait(WAIT) == "failed"
        assert words in s.stats.error
        q = d.query()
        assert q["status"] == ST.SETUP and "error-desc" not in q
        assert words in q["incoming-refused"], q.get("incoming-refused")
    finally:
        if d.status not in ST.FINAL_STATES:
            d.cancel()
        s.quit()
        d.quit()


def test_a_fresh_listener_has_no_refusal():
    d, _ = _dest(_config(**{"migration-secret": SECRET}))
    try:
        assert "incoming-refused" not in d.query()
    finally:
        d.cancel()
        d.quit()
