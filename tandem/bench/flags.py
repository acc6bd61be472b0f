"""The flags of `tandem bench run` and `compare` (and of `python -m tandem.bench`), with the
parsers that check their values; `tandem.bench.cli` drives what they describe."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from tandem.bench.client import (
    API_CHAT,
    API_COMPLETIONS,
    FORMAT_TEXT,
    FORMAT_TOKENS,
)
from tandem.bench.runner import (
    ARRIVALS,
)
from tandem.bench.stats import ITL_STATS
from tandem.bench.tokens import DEFAULT_MIN_TOKEN_ID
from tandem.bench.trace import MOONCAKE_BLOCK_SIZE
from tandem.bench.workloads import (
    LengthDist,
)

DEFAULT_VOCAB_SIZE = 32000
"""Used only when neither the flag, the server, nor a local model config says."""


def _length(text: str) -> LengthDist:
    try:
        return LengthDist.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def _json_object(text: str) -> dict[str, Any]:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return v


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument(
        "--base-url",
        default="http://127.0.0.1:8000",
        help="OpenAI-compatible server (default %(default)s)",
    )
    g.add_argument(
        "--api",
        choices=(API_COMPLETIONS, API_CHAT),
        default=API_COMPLETIONS,
        help="/v1/completions or /v1/chat/completions (default %(default)s)",
    )
    g.add_argument(
        "--prompt-format",
        choices=(FORMAT_TOKENS, FORMAT_TEXT),
        default=FORMAT_TOKENS,
        help="completions prompt as token ids (exact lengths) or text (one word per "
        "synthetic token, ~1 token each); chat always sends text (default %(default)s)",
    )
    g.add_argument("--model", help="model name (default: the first one /v1/models lists)")
    g.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default $OPENAI_API_KEY)",
    )
    g.add_argument(
        "--vocab-size",
        type=_positive_int,
        help="token ids are drawn from [--min-token-id, vocab size); default: from "
        f"/v1/models, else the local HF config of --model, else {DEFAULT_VOCAB_SIZE}",
    )
    g.add_argument(
        "--min-token-id",
        type=int,
        default=DEFAULT_MIN_TOKEN_ID,
        help="lowest synthetic token id, to avoid special tokens (default %(default)s)",
    )
    g.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=300.0,
        help="seconds before a request counts as a timeout (default %(default)s)",
    )
    g.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="do not send the vLLM extension ignore_eos (answers may end early)",
    )
    g.add_argument(
        "--continuous-usage",
        action="store_true",
        help="ask for usage on every chunk (vLLM continuous_usage_stats): exact "
        "tokens per chunk for ITL",
    )
    g.add_argument(
        "--return-token-ids",
        action="store_true",
        help="ask for generated token ids (vLLM return_token_ids): exact tokens per "
        "chunk, and real answers in token-id sessions",
    )
    g.add_argument(
        "--extra-body",
        type=_json_object,
        help="JSON object merged into every request body, e.g. '{\"temperature\": 0}'",
    )

    g = p.add_argument_group("workload")
    g.add_argument(
        "--workload",
        choices=("synthetic", "sessions", "trace"),
        help="default: trace when --trace is given, else synthetic",
    )
    g.add_argument(
        "--input-len",
        type=_length,
        default=LengthDist.fixed(512),
        help="prompt tokens (sessions: tokens per user message): N, uniform:LO:HI or "
        "normal:MEAN:STD[:LO:HI] (default 512)",
    )
    g.add_argument(
        "--output-len",
        type=_length,
        default=LengthDist.fixed(128),
        help="output tokens (max_tokens), same syntax (default 128)",
    )
    g.add_argument(
        "--shared-prefix-len",
        type=int,
        default=0,
        help="synthetic: tokens of a prefix common to all prompts (default 0)",
    )
    g.add_argument("--users", type=_positive_int, default=8, help="sessions: users (default 8)")
    g.add_argument(
        "--system-prompt-len",
        type=int,
        default=1024,
        help="sessions: tokens of the shared system prompt (default %(default)s)",
    )
    g.add_argument(
        "--turns",
        type=_positive_int,
        default=5,
        help="sessions: turns per conversation, then a new one (default %(default)s)",
    )
    g.add_argument(
        "--think-time",
        type=float,
        default=0.0,
        help="sessions: seconds between an answer and the next turn (default 0)",
    )
    g.add_argument(
        "--max-context",
        type=_positive_int,
        help="sessions: start a new conversation before exceeding this many tokens",
    )
    g.add_argument("--trace", help="Mooncake-format JSONL trace to replay")
    g.add_argument(
        "--time-scale",
        type=_positive_float,
        default=1.0,
        help="trace: multiply timestamps by this (0.5 = twice as fast) (default 1)",
    )
    g.add_argument(
        "--trace-block-size",
        type=_positive_int,
        default=MOONCAKE_BLOCK_SIZE,
        help="trace: tokens per hash id (default %(default)s)",
    )
    g.add_argument(
        "--strict-trace",
        action="store_true",
        help="trace: fail listing malformed lines instead of skipping them",
    )
    g.add_argument(
        "--seed",
        type=int,
        help="seed for prompts and arrival (default: random, recorded in the results); reusing "
        "one repeats the prompts, which a server may still hold in its prefix cache",
    )

    g = p.add_argument_group("arrival and bounds")
    g.add_argument(
        "--arrival",
        choices=ARRIVALS,
        help="default: poisson with --request-rate, trace for a trace (unless "
        "--concurrency is given), else concurrency",
    )
    g.add_argument(
        "--concurrency",
        type=_positive_int,
        help="closed-loop workers (default 8; sessions: --users)",
    )
    g.add_argument("--request-rate", type=_positive_float, help="Poisson arrival rate, req/s")
    g.add_argument(
        "--max-concurrency", type=_positive_int, help="open-loop arrival: cap on requests in flight"
    )
    g.add_argument(
        "--num-requests",
        type=_positive_int,
        help="stop after sending this many (default 200; trace: all its lines)",
    )
    g.add_argument(
        "--duration",
        type=_positive_float,
        default=600.0,
        help="stop after this many seconds, cancelling what is in flight (default %(default)s)",
    )

    g = p.add_argument_group("report")
    g.add_argument("--ttft-slo", type=_positive_float, help="goodput target for TTFT, ms")
    g.add_argument("--itl-slo", type=_positive_float, help="goodput target for ITL, ms")
    g.add_argument(
        "--itl-slo-stat",
        choices=ITL_STATS,
        default="mean",
        help="which per-request ITL statistic must meet --itl-slo (default mean, i.e. TPOT)",
    )
    g.add_argument(
        "--output",
        help="results JSON (default results/bench-<time>.json); plots "
        "go next to it as <name>_cdf.png and <name>_throughput.png",
    )
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--label", help="name of this run in reports and compare")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `run` and `compare` sub-commands to `parser` (dest `bench_command`)."""
    sub = parser.add_subparsers(dest="bench_command", metavar="{run,compare}")
    run_p = sub.add_parser(
        "run",
        help="drive an OpenAI-compatible server and report latency and throughput",
        description="Stream requests at an OpenAI-compatible server; print a summary table and "
        "write JSON results and PNG plots.",
    )
    _add_run_arguments(run_p)
    cmp_p = sub.add_parser("compare", help="print two result files side by side with ratios")
    cmp_p.add_argument("a", help="results JSON of run A")
    cmp_p.add_argument("b", help="results JSON of run B")
    parser.set_defaults(bench_parser=parser)
