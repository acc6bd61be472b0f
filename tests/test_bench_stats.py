"""Statistics, goodput, ITL spreading and the report formats, on known data."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from tandem.bench.client import inter_token_latencies
from tandem.bench.records import RequestRecord
from tandem.bench.report import compare, format_summary, load_results, write_results
from tandem.bench.stats import Slo, describe, goodput, itl_stat, percentile, summarize


def test_percentile_on_known_data() -> None:
    xs = list(range(1, 101))
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 90) == pytest.approx(90.1)
    assert percentile(xs, 99) == pytest.approx(99.01)
    assert percentile(xs, 0) == 1 and percentile(xs, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_percentile_matches_numpy_linear() -> None:
    rng = random.Random(0)
    for n in (2, 3, 10, 257):
        xs = sorted(rng.expovariate(1.0) for _ in range(n))
        for q in (1, 25, 50, 90, 99, 99.9):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_describe_scales_and_summarises() -> None:
    d = describe([0.001, 0.002, 0.003, 0.004], scale=1e3)
    assert d["count"] == 4 and d["mean"] == pytest.approx(2.5)
    assert d["p50"] == pytest.approx(2.5) and d["p90"] == pytest.approx(3.7)
    assert d["min"] == pytest.approx(1) and d["max"] == pytest.approx(4)
    assert math.isnan(describe([])["mean"])


def rec(
    ttft: float | None = 0.1, itl: list[float] | None = None, error: str | None = None, **kw: object
) -> RequestRecord:
    r = RequestRecord(index=0, ttft_s=ttft, itl_s=itl or [], error=error, **kw)  # type: ignore[arg-type]
    if r.e2e_s is None and ttft is not None:
        r.e2e_s = ttft + sum(r.itl_s)
    return r


def test_goodput_counts_only_requests_within_both_targets() -> None:
    records = [
        rec(0.1, [0.02, 0.02]),  # good
        rec(0.3, [0.02, 0.02]),  # TTFT miss
        rec(0.1, [0.05, 0.05]),  # ITL miss
        rec(0.3, [0.05]),  # both miss
        rec(0.1, [0.02], error="http", http_status=500),  # failed: always a miss
        rec(0.1, [0.02], error="cancelled"),  # neither good nor counted
        rec(0.2, []),  # on the TTFT edge, one token (no ITL): good
    ]
    slo = Slo(ttft_s=0.2, itl_s=0.03)
    assert [slo.met(r) for r in records] == [True, False, False, False, False, False, True]
    good, rate = goodput(records, slo, elapsed_s=4.0)
    assert good == 2 and rate == pytest.approx(0.5)
    s = summarize(records, 4.0, slo)["goodput"]
    assert s["good_requests"] == 2 and s["fraction"] == pytest.approx(2 / 6)
    # Only one target set: the other is not checked.
    assert goodput(records, Slo(ttft_s=0.2), 1.0)[0] == 3
    assert goodput(records, Slo(itl_s=0.03), 1.0)[0] == 3


def test_goodput_itl_statistic_is_selectable() -> None:
    r = rec(0.1, [0.01] * 9 + [0.2])  # mean 0.029, p90 0.029, max 0.2
    assert itl_stat(r, "mean") == pytest.approx(0.029)
    assert itl_stat(r, "p50") == pytest.approx(0.01)
    assert itl_stat(r, "max") == pytest.approx(0.2)
    assert Slo(itl_s=0.03).met(r)
    assert not Slo(itl_s=0.03, itl_stat="max").met(r)


def test_itl_spreads_tokens_over_chunks() -> None:
    times = [1.0, 2.0, 4.0]
    # 5 tokens, 3 chunks: the 4 after the first spread 2 + 2 over the two gaps.
    assert inter_token_latencies(times, 5) == pytest.approx([0.5, 0.5, 1.0, 1.0])
    # Exact per-chunk counts win.
    assert inter_token_latencies(times, 5, [1, 1, 3]) == pytest.approx([1.0] + [2 / 3] * 3)
    # One token per chunk: plain gaps; sums equal last minus first chunk.
    assert inter_token_latencies(times, 3) == pytest.approx([1.0, 2.0])
    assert sum(inter_token_latencies(times, 7)) == pytest.approx(3.0)
    assert inter_token_latencies([1.0], 4) == []
    # Fewer tokens reported than chunks seen: trust the chunks.
    assert inter_token_latencies(times, 1) == pytest.approx([1.0, 2.0])


def test_summary_throughput_errors_and_cancelled() -> None:
    records = [
        rec(0.1, [0.01] * 9, input_tokens=100, output_tokens=10, cached_tokens=50),
        rec(0.2, [0.02] * 9, input_tokens=100, output_tokens=10, cached_tokens=0),
        rec(None, error="http", http_status=503),
        rec(None, error="timeout"),
        rec(None, error="http", http_status=503),
        rec(0.1, error="cancelled", input_tokens=100),
    ]
    s = summarize(records, 2.0, Slo())
    assert s["requests"] == {
        "sent": 6,
        "completed": 2,
        "failed": 3,
        "cancelled": 1,
        "errors": {"http 503": 2, "timeout": 1},
    }
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_token_throughput"] == pytest.approx(10.0)
    assert s["input_token_throughput"] == pytest.approx(100.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(150.0)
    assert s["itl_ms"]["count"] == 18 and s["itl_ms"]["mean"] == pytest.approx(15.0)
    assert s["tpot_ms"]["count"] == 2
    assert s["cached_tokens"]["fraction_of_input"] == pytest.approx(0.25)
    assert "goodput" not in s
    table = format_summary(s)
    assert "http 503: 2" in table and "cancelled at the end 1" in table


def test_results_round_trip_and_compare(tmp_path: Path) -> None:
    records = [rec(0.1, [0.01, 0.01], output_tokens=3), rec(0.3, [0.03, 0.03], output_tokens=3)]
    paths = []
    for label, recs, elapsed in (("a", records, 1.0), ("b", records[:1], 2.0)):
        s = summarize(recs, elapsed, Slo(ttft_s=0.2))
        paths.append(write_results(tmp_path / f"{label}.json", {"label": label}, s, recs))
    data = load_results(paths[0])
    assert data["config"]["label"] == "a"
    assert data["summary"]["requests"]["completed"] == 2
    assert [r["ttft_s"] for r in data["records"]] == [0.1, 0.3]
    assert RequestRecord.from_dict(data["records"][1]).itl_s == [0.03, 0.03]
    table = compare(*paths)
    line = next(x for x in table.splitlines() if x.startswith("request throughput"))
    assert line.split()[-2] == "0.250"  # 1 req / 2 s against 2 req / 1 s
    line = next(x for x in table.splitlines() if x.startswith("TTFT mean"))
    assert line.split()[-2] == "0.500"
