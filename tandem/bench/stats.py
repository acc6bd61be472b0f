"""Statistics over request records: percentiles, throughput, goodput.

Pure functions over `RequestRecord`s so they can be tested on known data and
recomputed from a saved JSON file.

Conventions:

- Latency statistics (TTFT, ITL, TPOT, E2E) use successful requests only.
  ITL pools every inter-token gap of every successful request (so long answers
  weigh more, as they do for users reading them); TPOT is one value per request
  (its mean ITL).
- Throughput divides by the run's elapsed time; token throughput counts the
  tokens of successful requests.
- Goodput: successful requests with TTFT ≤ the TTFT target and with the chosen
  per-request ITL statistic (default: mean, i.e. TPOT, as in DistServe and
  vLLM) ≤ the ITL target, per second. A missing target is not checked. Failed
  requests always miss; cancelled ones are neither counted nor missed. A
  request with a single output token has no ITL and passes that check.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.bench.records import ERROR_CANCELLED, ERROR_HTTP, RequestRecord

PERCENTILES = (50, 90, 99)
ITL_STATS = ("mean", "p50", "p90", "p99", "max")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, interpolating linearly between ranks (numpy's default); NaN for
    no data."""
    if not 0 <= q <= 100:
        raise ValueError("percentile must be in [0, 100]")
    return float(np.percentile(values, q)) if len(values) else math.nan


def describe(values: Iterable[float], scale: float = 1.0) -> dict[str, float | int]:
    """count, mean, p50, p90, p99, min, max of `values` times `scale` (NaN when empty)."""
    xs = sorted(v * scale for v in values)
    n = len(xs)
    out: dict[str, float | int] = {"count": n, "mean": math.fsum(xs) / n if n else math.nan}
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(xs, p)
    out["min"] = xs[0] if n else math.nan
    out["max"] = xs[-1] if n else math.nan
    return out


def itl_stat(rec: RequestRecord, stat: str) -> float | None:
    """A request's own ITL statistic (None when it has fewer than two output tokens)."""
    if not rec.itl_s:
        return None
    if stat == "mean":
        return math.fsum(rec.itl_s) / len(rec.itl_s)
    if stat == "max":
        return max(rec.itl_s)
    if stat.startswith("p"):
        return percentile(sorted(rec.itl_s), float(stat[1:]))
    raise ValueError(f"unknown ITL statistic {stat!r}; use one of {ITL_STATS}")


@dataclass(frozen=True, slots=True)
class Slo:
    """Latency targets for goodput, in seconds; None means not checked."""

    ttft_s: float | None = None
    itl_s: float | None = None
    itl_stat: str = "mean"

    def __post_init__(self) -> None:
        if self.itl_stat not in ITL_STATS:
            raise ValueError(f"ITL statistic must be one of {ITL_STATS}")

    @property
    def active(self) -> bool:
        return self.ttft_s is not None or self.itl_s is not None

    def met(self, rec: RequestRecord) -> bool:
        if not rec.ok or rec.ttft_s is None:
            return False
        if self.ttft_s is not None and rec.ttft_s > self.ttft_s:
            return False
        if self.itl_s is not None:
            v = itl_stat(rec, self.itl_stat)
            if v is not None and v > self.itl_s:
                return False
        return True


def goodput(records: Iterable[RequestRecord], slo: Slo, elapsed_s: float) -> tuple[int, float]:
    """(requests meeting every target, those per second)."""
    good = sum(1 for r in records if r.error != ERROR_CANCELLED and slo.met(r))
    return good, good / elapsed_s if elapsed_s > 0 else math.nan


def error_key(rec: RequestRecord) -> str:
    """`http 503`, `timeout`, ...: how errors are grouped in the summary."""
    if rec.error == ERROR_HTTP:
        return f"http {rec.http_status}"
    return str(rec.error)


def summarize(records: list[RequestRecord], elapsed_s: float, slo: Slo) -> dict[str, Any]:
    """The summary the table, the JSON file and `compare` are made of (latencies in ms)."""
    ok = [r for r in records if r.ok]
    cancelled = [r for r in records if r.error == ERROR_CANCELLED]
    failed = [r for r in records if not r.ok and r.error != ERROR_CANCELLED]
    per_s = (lambda x: x / elapsed_s) if elapsed_s > 0 else (lambda x: math.nan)
    in_tok = sum(r.input_tokens for r in ok)
    out_tok = sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "requests": {
            "sent": len(records),
            "completed": len(ok),
            "failed": len(failed),
            "cancelled": len(cancelled),
            "errors": dict(Counter(error_key(r) for r in failed).most_common()),
        },
        "elapsed_s": elapsed_s,
        "request_throughput": per_s(len(ok)),
        "input_token_throughput": per_s(in_tok),
        "output_token_throughput": per_s(out_tok),
        "total_token_throughput": per_s(in_tok + out_tok),
        "input_tokens": in_tok,
        "output_tokens": out_tok,
        "ttft_ms": describe((r.ttft_s for r in ok if r.ttft_s is not None), 1e3),
        "itl_ms": describe((x for r in ok for x in r.itl_s), 1e3),
        "tpot_ms": describe((v for r in ok if (v := itl_stat(r, "mean")) is not None), 1e3),
        "e2e_ms": describe((r.e2e_s for r in ok if r.e2e_s is not None), 1e3),
    }
    lags = [r.start_s - r.scheduled_s for r in records if r.scheduled_s is not None]
    if lags:
        summary["dispatch_lag_ms"] = describe(lags, 1e3)
    reported = [r for r in ok if r.cached_tokens is not None]
    if reported:
        cached = sum(r.cached_tokens or 0 for r in reported)
        inputs = sum(r.input_tokens for r in reported)
        summary["cached_tokens"] = {
            "reported_requests": len(reported),
            "cached": cached,
            "fraction_of_input": cached / inputs if inputs else math.nan,
        }
    if slo.active:
        good, rate = goodput(records, slo, elapsed_s)
        summary["goodput"] = {
            "ttft_slo_ms": None if slo.ttft_s is None else slo.ttft_s * 1e3,
            "itl_slo_ms": None if slo.itl_s is None else slo.itl_s * 1e3,
            "itl_stat": slo.itl_stat,
            "good_requests": good,
            "requests_per_s": rate,
            "fraction": good / (len(ok) + len(failed)) if ok or failed else math.nan,
        }
    return summary
