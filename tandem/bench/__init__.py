"""Load generator for OpenAI-compatible servers: workloads, streaming client, reports.

`tandem bench run ...` / `python -m tandem.bench run ...` drive a server;
`tandem bench compare A.json B.json` puts two runs side by side.
See `client` for how TTFT and ITL are defined and `stats` for goodput.
"""

from tandem.bench.client import ClientConfig, StreamClient, inter_token_latencies
from tandem.bench.records import RequestRecord, RequestSpec
from tandem.bench.report import compare, format_summary, load_results, write_results
from tandem.bench.runner import Arrival, Bounds, RunResult, run_load
from tandem.bench.stats import Slo, describe, goodput, percentile, summarize
from tandem.bench.trace import Trace, TraceError, load_trace
from tandem.bench.workloads import (
    LengthDist,
    SessionWorkload,
    SyntheticWorkload,
    TraceWorkload,
    Workload,
)

__all__ = [
    "Arrival",
    "Bounds",
    "ClientConfig",
    "LengthDist",
    "RequestRecord",
    "RequestSpec",
    "RunResult",
    "SessionWorkload",
    "Slo",
    "StreamClient",
    "SyntheticWorkload",
    "Trace",
    "TraceError",
    "TraceWorkload",
    "Workload",
    "compare",
    "describe",
    "format_summary",
    "goodput",
    "inter_token_latencies",
    "load_results",
    "load_trace",
    "percentile",
    "run_load",
    "summarize",
    "write_results",
]
