"""`tandem bench run ...` and `tandem bench compare A.json B.json`.

`add_arguments(parser)` adds the two sub-commands to a parser that the
`tandem` CLI (or `python -m tandem.bench`) owns; `run(args)` executes them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import random
import signal
import sys
from pathlib import Path
from typing import Any

from tandem.bench.client import (
    API_CHAT,
    FORMAT_TEXT,
    FORMAT_TOKENS,
    ClientConfig,
    ServerInfo,
    StreamClient,
    probe_server,
)
from tandem.bench.flags import DEFAULT_VOCAB_SIZE, add_arguments
from tandem.bench.records import RequestRecord
from tandem.bench.report import compare, format_summary, write_results
from tandem.bench.runner import (
    ARRIVAL_CONCURRENCY,
    ARRIVAL_POISSON,
    ARRIVAL_TRACE,
    Arrival,
    Bounds,
    RunResult,
    run_load,
)
from tandem.bench.stats import Slo, summarize
from tandem.bench.tokens import TokenSpace
from tandem.bench.trace import TraceError, load_trace
from tandem.bench.workloads import (
    SessionWorkload,
    SyntheticWorkload,
    TraceWorkload,
    Workload,
)
from tandem.runtime.heap import freeze_startup_heap

SUBCOMMANDS = ("run", "compare")


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
            freeze_startup_heap()  # a collection pause here would be timed as the server's
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
