"""The engine boundary's id check, on both of its paths (plain ints; anything else)."""

from __future__ import annotations

import numpy as np

from tandem.engine.request_checks import _all_ids_below


def test_ids_are_integers_below_the_end():
    ids = list(range(512))
    assert _all_ids_below(ids, 512) and _all_ids_below([], 5)
    assert not _all_ids_below(ids, 511)
    assert not _all_ids_below([-1, *ids], 10**6)
    assert _all_ids_below([np.int64(3), 2], 5) and not _all_ids_below([np.int64(7), 2], 5)
    for bad in ([True, 1], [1, False], [1.0], [1, "a"], [None], [2**70]):
        assert not _all_ids_below(bad, 5), bad
