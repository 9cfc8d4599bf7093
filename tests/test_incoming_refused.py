"""A destination whose listener refused a source at the channel hello stays in setup, and its
query-migrate says why in `incoming-refused` (a refused source: test_multifd_downtime.py,
test_a_channel_count_mismatch_names_the_parameter_and_both_values); a fresh listener has none."""
from __future__ import annotations

from .test_channel_security import SECRET, _config, _dest


def test_a_fresh_listener_has_no_refusal():
    d, _ = _dest(_config(**{"migration-secret": SECRET}))
    try:
        assert "incoming-refused" not in d.query()
    finally:
        d.cancel()
        d.quit()
