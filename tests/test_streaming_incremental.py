"""Streaming stays incremental at near-zero step time: through `tandem serve --workers 2`
(mock steps of ~0.35 ms, a 64-token answer in ~25 ms), the tokens of one request reach the
client over its generation, not in one burst at its end. A frontend that falls behind merges
what already waits into one chunk; one that keeps up, as here, sends a chunk per step."""

from __future__ import annotations

import time

from nats_support import needs_nats
from test_distributed_serve import Cluster

pytestmark = needs_nats


def test_tokens_arrive_over_the_generation(tmp_path):
    cluster = Cluster(tmp_path, "--mock-speedup", "20")
    try:
        cluster.wait_for_workers(2, timeout=180)
        spans, counts = [], []
        for i in range(6):
            stream = cluster.client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"tell me {i}"}],
                max_tokens=64, stream=True, extra_body={"ignore_eos": True},
            )  # fmt: skip
            arrivals = [
                time.monotonic() for c in stream if c.choices and c.choices[0].delta.content
            ]
            counts.append(len(arrivals))
            spans.append(arrivals[-1] - arrivals[0])
        # 64 tokens: many chunks, spread over tens of milliseconds (a burst is ~1 ms).
        assert sorted(counts)[len(counts) // 2] >= 16, counts
        assert sorted(spans)[len(spans) // 2] >= 0.010, spans
    finally:
        cluster.close()
