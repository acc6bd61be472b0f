"""KV tiers on and off, side by side: multi-turn sessions whose histories outgrow the device
pool, on the real engine (the demo model on CPU by default).

    python benchmarks/kv_tiers.py --disk               # ~2 minutes on 2 CPU cores
    python benchmarks/kv_tiers.py --users 4 --turns 4 --message-len 192 --pool-blocks 64
    python benchmarks/kv_tiers.py --model-shape llama-3.1-8b --device cuda --users 8 \
        --turns 6 --message-len 512 --answer-len 32 --pool-blocks 400 --host-gib 4 --disk

Each user's turn is its whole history (earlier turns and answers) plus a new message; users
take turns round-robin, one request at a time, so every turn's TTFT is its prefill alone.
With the working set a few times the device pool, the device has evicted a user's history
by the time they speak again: without tiers it is recomputed, with them it is loaded back.
Prints TTFT p50/p99, throughput and hit rates per tier, and writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.protocol import GenerateRequest, SamplingParams


def sessions(args: argparse.Namespace, vocab: int) -> list[tuple[int, list[int]]]:
    """(user, new message tokens) per turn, in the order they are sent."""
    rng = random.Random(0)
    return [(u, [rng.randrange(100, vocab) for _ in range(args.message_len)])
            for _ in range(args.turns) for u in range(args.users)]  # fmt: skip


def run(args: argparse.Namespace, model: str, tiers: dict) -> dict:
    shape = {"load_format": "dummy", "dtype": "bfloat16"} if args.model_shape else {}
    eng = EngineCore(EngineConfig(model=model, num_gpu_blocks=args.pool_blocks,
                                  max_num_batched_tokens=args.batch_tokens, device=args.device,
                                  **shape, **tiers))  # fmt: skip
    vocab = eng.hf_config.vocab_size
    history: dict[int, list[int]] = {}
    ttfts, tokens, started = [], 0, time.perf_counter()
    sampling = SamplingParams(max_tokens=args.answer_len, temperature=0.0, ignore_eos=True)
    for i, (user, message) in enumerate(sessions(args, vocab)):
        prompt = history.get(user, []) + message
        eng.add_request(GenerateRequest(request_id=str(i), prompt_token_ids=prompt,
                                        sampling=sampling))  # fmt: skip
        sent, answer, first = time.perf_counter(), [], None
        while eng.has_work():
            for out in eng.step():
                first = first or time.perf_counter()
                answer += out.token_ids
        ttfts.append(first - sent)
        tokens += len(prompt) + len(answer)
        history[user] = prompt + answer
    elapsed = time.perf_counter() - started
    bm = eng.block_manager
    looked_up = bm.prefix_queries // args.block_size or 1
    hits = dict(bm.tiers.hits) if bm.tiers is not None else {}
    # Loads not taken (recomputing measured faster) and disk writes shed (the writer behind).
    skipped = dict(bm.tiers.skipped) if bm.tiers is not None else {}
    disk = bm.tiers.disk if bm.tiers is not None else None
    shed = disk.shed if disk is not None else 0
    device_hits = bm.prefix_hits // args.block_size - sum(hits.values())
    del eng, bm  # its device memory goes back before the next configuration's engine
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    ttfts.sort()
    return {
        "tiers": tiers, "requests": len(ttfts),
        "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[int(0.99 * (len(ttfts) - 1))],
        "tokens_per_s": tokens / elapsed, "elapsed_s": elapsed,
        "hit_rate": {"device": device_hits / looked_up,
                     **{t: n / looked_up for t, n in hits.items()}},
        "largest_prompt": max(len(h) for h in history.values()) - args.answer_len,
        "loads_skipped": skipped, "disk_writes_shed": shed,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF model folder (default: the demo model)")
    p.add_argument("--model-shape", help="random bf16 weights of this shape instead (e.g."
                   " llama-3.1-8b, see tandem.bench.dummy_model), no files needed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--users", type=int, default=5)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--message-len", type=int, default=96)
    p.add_argument("--answer-len", type=int, default=16)
    p.add_argument("--pool-blocks", type=int, default=64, help="device KV blocks of 16 tokens")
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--host-gib", type=float, default=1.0)
    p.add_argument("--disk", action="store_true", help="also a run with a disk tier only")
    p.add_argument("--output", type=Path, default=Path("results/kv_tiers.json"))
    args = p.parse_args()
    args.block_size = 16
    with tempfile.TemporaryDirectory() as disk, tempfile.TemporaryDirectory() as folder:
        if args.model_shape:
            from tandem.bench.dummy_model import write_model_folder

            args.model = str(write_model_folder(folder, args.model_shape))
        elif args.model is None:
            from tandem.engine.model_source import resolve_model

            args.model = str(resolve_model(None))
        configs = {"off": {}, "host": {"kv_offloading_size": args.host_gib}}
        if args.disk:
            configs["disk"] = {"kv_disk_path": disk, "kv_disk_size": args.host_gib}
        results = {}
        for name, tiers in configs.items():
            results[name] = r = run(args, args.model, tiers)
            rates = " ".join(f"{t} {v:.0%}" for t, v in r["hit_rate"].items())
            print(f"{name:>5}: TTFT p50 {r['ttft_p50_s'] * 1e3:7.1f} ms, p99"
                  f" {r['ttft_p99_s'] * 1e3:7.1f} ms, {r['tokens_per_s']:7.0f} tok/s;"
                  f" hits: {rates}; loads skipped {r['loads_skipped']}, disk writes shed"
                  f" {r['disk_writes_shed']}", flush=True)  # fmt: skip
    working_set = args.users * r["largest_prompt"]
    print(f"working set ~{working_set} tokens = {working_set / (args.pool_blocks * 16):.1f}x the"
          f" device pool of {args.pool_blocks * 16} tokens")  # fmt: skip
    for name in configs:
        if name != "off":
            ratio = results["off"]["ttft_p50_s"] / results[name]["ttft_p50_s"]
            print(f"TTFT p50 without / with the {name} tier: {ratio:.2f}x")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"benchmark": "kv_tiers", "args": vars(args),
                                       "runs": results}, indent=2, default=str))  # fmt: skip
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
