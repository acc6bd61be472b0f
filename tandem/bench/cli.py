"""`tandem bench run ...` and `tandem bench compare A.json B.json`.

`add_arguments(parser)` adds the two sub-commands to a parser that the
`tandem` CLI (or `python -m tandem.bench`) owns; `run(args)` executes them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

from tandem.bench.client import (
    API_CHAT,
    API_COMPLETIONS,
    FORMAT_TEXT,
    FORMAT_TOKENS,
    ClientConfig,
    ServerInfo,
    StreamClient,
    probe_server,
)
from tandem.bench.records import RequestRecord
from tandem.bench.report import compare, format_summary, write_results
from tandem.bench.runner import (
    ARRIVAL_CONCURRENCY,
    ARRIVAL_POISSON,
    ARRIVAL_TRACE,
    ARRIVALS,
    Arrival,
    Bounds,
    RunResult,
    run_load,
)
from tandem.bench.stats import ITL_STATS, Slo, summarize
from tandem.bench.tokens import DEFAULT_MIN_TOKEN_ID, TokenSpace
from tandem.bench.trace import MOONCAKE_BLOCK_SIZE, TraceError, load_trace
from tandem.bench.workloads import (
    LengthDist,
    SessionWorkload,
    SyntheticWorkload,
    TraceWorkload,
    Workload,
)

DEFAULT_VOCAB_SIZE = 32000
"""Used only when neither the flag, the server, nor a local model config says."""

SUBCOMMANDS = ("run", "compare")


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


def run(args: argparse.Namespace) -> int:
    """Execute the parsed `tandem bench` command; returns the process exit code."""
    cmd = getattr(args, "bench_command", None)
    if cmd == "compare":
        try:
            print(compare(args.a, args.b))
        except (OSError, ValueError) as e:
            print(f"tandem bench compare: {e}", file=sys.stderr)
            return 2
        return 0
    if cmd == "run":
        return _run(args)
    parser = getattr(args, "bench_parser", None)
    if parser is not None:
        parser.print_help(sys.stderr)
    return 2


def _err(msg: str) -> None:
    print(f"tandem bench: {msg}", file=sys.stderr)


def _local_vocab_size(model: str) -> int | None:
    """vocab_size from a Hugging Face config already on this machine (never downloads)."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model, local_files_only=True)
        return int(cfg.get_text_config().vocab_size)
    except Exception:
        return None


def _resolve_server(args: argparse.Namespace) -> tuple[str, int | None, ServerInfo] | None:
    try:
        info = asyncio.run(probe_server(args.base_url, args.api_key))
    except Exception as e:
        if args.model is None:
            _err(
                f"cannot list models at {args.base_url}/v1/models ({type(e).__name__}: {e}); "
                "is the server up? (--model skips this lookup)"
            )
            return None
        info = ServerInfo(None)
    model = args.model or info.model
    if model is None:
        _err("the server lists no model; pass --model")
        return None
    vocab = args.vocab_size or info.vocab_size
    if vocab is None and args.prompt_format == FORMAT_TOKENS and args.api != API_CHAT:
        vocab = _local_vocab_size(model)
        if vocab is None:
            vocab = DEFAULT_VOCAB_SIZE
            _err(
                f"warning: vocabulary size unknown; drawing token ids below {vocab} "
                "(set --vocab-size)"
            )
    return model, vocab, info


def _make_workload(
    args: argparse.Namespace, space: TokenSpace, text_answers: bool
) -> Workload | None:
    kind = args.workload or ("trace" if args.trace else "synthetic")
    if kind == "synthetic":
        return SyntheticWorkload(
            args.input_len, args.output_len, space, args.seed, args.shared_prefix_len
        )
    if kind == "sessions":
        return SessionWorkload(
            args.users,
            args.system_prompt_len,
            args.turns,
            args.input_len,
            args.output_len,
            space,
            args.seed,
            args.think_time,
            args.max_context,
            collect_text=text_answers,
        )
    if not args.trace:
        _err("--workload trace needs --trace FILE")
        return None
    try:
        trace = load_trace(args.trace, strict=args.strict_trace, limit=args.num_requests)
    except TraceError as e:
        _err(str(e))
        return None
    except OSError as e:
        _err(f"cannot read trace: {e}")
        return None
    if trace.malformed:
        shown = "; ".join(f"line {n}: {why}" for n, why in trace.malformed[:5])
        more = f" (and {len(trace.malformed) - 5} more)" if len(trace.malformed) > 5 else ""
        _err(
            f"warning: skipped {len(trace.malformed)} malformed line(s) in {args.trace}: "
            f"{shown}{more}"
        )
    if not trace.entries:
        _err(f"{args.trace}: no valid requests")
        return None
    return TraceWorkload(
        trace, space, args.seed, args.time_scale, args.trace_block_size, source=str(args.trace)
    )


def _make_arrival(args: argparse.Namespace, workload: Workload) -> Arrival:
    kind = args.arrival
    if kind is None:
        if args.request_rate is not None:
            kind = ARRIVAL_POISSON
        elif isinstance(workload, TraceWorkload) and args.concurrency is None:
            kind = ARRIVAL_TRACE
        else:
            kind = ARRIVAL_CONCURRENCY
    concurrency = args.concurrency or (
        workload.users if isinstance(workload, SessionWorkload) else 8
    )
    return Arrival(kind, concurrency, args.request_rate or 0.0, args.max_concurrency, args.seed)


def _run(args: argparse.Namespace) -> int:
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    resolved = _resolve_server(args)
    if resolved is None:
        return 2
    model, vocab, info = resolved
    text_prompts = args.api == API_CHAT or args.prompt_format == FORMAT_TEXT
    try:
        space = TokenSpace.for_vocab(vocab or DEFAULT_VOCAB_SIZE, args.min_token_id)
        workload = _make_workload(args, space, text_answers=text_prompts)
        if workload is None:
            return 2
        arrival = _make_arrival(args, workload)
        default_n = None if isinstance(workload, TraceWorkload) else 200
        bounds = Bounds(args.duration, args.num_requests or default_n)
        slo = Slo(
            None if args.ttft_slo is None else args.ttft_slo / 1e3,
            None if args.itl_slo is None else args.itl_slo / 1e3,
            args.itl_slo_stat,
        )
    except ValueError as e:
        _err(str(e))
        return 2
    client_cfg = ClientConfig(
        base_url=args.base_url,
        model=model,
        api=args.api,
        prompt_format=FORMAT_TEXT if text_prompts else FORMAT_TOKENS,
        ignore_eos=args.ignore_eos,
        request_timeout_s=args.request_timeout,
        max_connections=arrival.connections,
        api_key=args.api_key,
        extra_body=args.extra_body,
        continuous_usage=args.continuous_usage,
        return_token_ids=args.return_token_ids,
    )
    total = bounds.num_requests
    if isinstance(workload, TraceWorkload):
        total = min(total or len(workload.trace.entries), len(workload.trace.entries))
    result = asyncio.run(_drive(workload, client_cfg, arrival, bounds, total, args.quiet))
    if result.interrupted:
        _err("interrupted: in-flight requests were cancelled; reporting what finished")

    started = dt.datetime.fromtimestamp(result.started_at, dt.UTC)
    config: dict[str, Any] = {
        "label": args.label,
        "base_url": args.base_url,
        "api": args.api,
        "prompt_format": client_cfg.prompt_format,
        "model": model,
        "server": {"vocab_size": info.vocab_size, "max_model_len": info.max_model_len},
        "token_range": [space.lo, space.hi] if not text_prompts else None,
        "workload": workload.describe(),
        "arrival": {
            "kind": arrival.kind,
            "concurrency": arrival.concurrency,
            "rate": arrival.rate,
            "max_concurrency": arrival.max_concurrency,
        },
        "bounds": {"num_requests": bounds.num_requests, "duration_s": bounds.duration_s},
        "seed": args.seed,
        "request_timeout_s": args.request_timeout,
        "ignore_eos": args.ignore_eos,
        "extra_body": args.extra_body,
        "started_at": started.isoformat(timespec="seconds"),
        "hit_time_bound": result.hit_time_bound,
        "interrupted": result.interrupted,
        "argv": sys.argv[1:],
    }
    summary = summarize(result.records, result.elapsed_s, slo)
    print(format_summary(summary, config))

    out = Path(args.output or f"results/bench-{started.strftime('%Y%m%d-%H%M%S')}.json")
    write_results(out, config, summary, result.records)
    written = [out]
    if not args.no_plots:
        try:
            from tandem.bench.plots import write_plots

            written += write_plots(
                result.records,
                result.elapsed_s,
                out.with_suffix(""),
                title=args.label or f"{model} · {workload.name}",
            )
        except ImportError as e:
            _err(f"warning: no plots ({e}); pip install matplotlib")
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0 if summary["requests"]["completed"] > 0 else 1


async def _drive(
    workload: Workload,
    cfg: ClientConfig,
    arrival: Arrival,
    bounds: Bounds,
    total: int | None,
    quiet: bool,
) -> RunResult:
    from tqdm import tqdm

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_sigint() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C kills as usual

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    failed = 0
    with tqdm(
        total=total,
        file=sys.stderr,
        disable=quiet,
        unit="req",
        mininterval=0.5,
        dynamic_ncols=True,
        desc="bench",
    ) as bar:

        def on_done(rec: RequestRecord) -> None:
            nonlocal failed
            bar.update(1)
            if rec.error is not None and rec.error != "cancelled":
                failed += 1
                bar.set_postfix(failed=failed, refresh=False)

        async with StreamClient(cfg) as client:
            return await run_load(workload, client.send, arrival, bounds, on_done, stop)


def main(argv: list[str] | None = None, prog: str = "python -m tandem.bench") -> int:
    """`python -m tandem.bench`: like `tandem bench`, but `run` may be left out."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        argv.insert(0, "run")
    parser = argparse.ArgumentParser(
        prog=prog, description="Load generator for OpenAI-compatible servers."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
