"""Output tokens/s of our engine vs Hugging Face `generate`, same weights, same machine, one run.

Workload: 128-token prompts, 64 output tokens each (EOS ignored), at 1, 8 and 32 concurrent
requests. Our engine serves them through its async API with continuous batching; Hugging Face
gets the same prompts as one static batch per concurrency level (left-padded batch of equal
lengths, greedy, KV cache on), the best it can do with all requests present at once.

    python benchmarks/engine_cpu.py [--model DIR] [--concurrency 1 8 32] [--output FILE]

With no --model it converts (once) and uses the demo model, SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import torch

PROMPT_LEN = 128
OUTPUT_LEN = 64


def make_prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(100, vocab - 1, (PROMPT_LEN,), generator=g).tolist() for _ in range(count)
    ]


async def _run_ours(engine, prompts: list[list[int]], tag: str) -> int:
    from tandem.protocol import GenerateRequest, SamplingParams

    async def one(i: int, prompt: list[int]) -> int:
        sampling = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0, ignore_eos=True)
        req = GenerateRequest(request_id=f"{tag}-{i}", prompt_token_ids=prompt, sampling=sampling)
        n = 0
        async for out in engine.generate(req):
            n += len(out.token_ids)
        return n

    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return sum(counts)


def bench_ours(model: str, concurrency: list[int], vocab: int, threads: int) -> dict[int, dict]:
    from tandem.engine.async_engine import AsyncEngine
    from tandem.engine.config import EngineConfig

    engine = AsyncEngine(
        EngineConfig(model=model, max_num_seqs=max(concurrency), enable_prefix_caching=False)
    )
    results = {}
    try:
        asyncio.run(_run_ours(engine, make_prompts(2, vocab, seed=99), "warm"))
        for c in concurrency:
            prompts = make_prompts(c, vocab, seed=c)
            start = time.perf_counter()
            tokens = asyncio.run(_run_ours(engine, prompts, f"c{c}"))
            elapsed = time.perf_counter() - start
            results[c] = {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}
            print(
                f"  tandem  c={c:>3}: {tokens / elapsed:8.1f} tok/s ({elapsed:.2f} s)", flush=True
            )
    finally:
        engine.shutdown()
    return results


def bench_hf(model: str, concurrency: list[int], vocab: int) -> dict[int, dict]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def generate(prompts: list[list[int]]) -> int:
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=OUTPUT_LEN,
                min_new_tokens=OUTPUT_LEN,
                do_sample=False,
                pad_token_id=0,
            )
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    generate(make_prompts(2, vocab, seed=99))
    results = {}
    for c in concurrency:
        prompts = make_prompts(c, vocab, seed=c)
        start = time.perf_counter()
        tokens = generate(prompts)
        elapsed = time.perf_counter() - start
        results[c] = {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}
        print(f"  hf      c={c:>3}: {tokens / elapsed:8.1f} tok/s ({elapsed:.2f} s)", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", help="HF model folder (default: the demo SmolLM2-135M)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--output", default="results/engine_cpu.json")
    args = parser.parse_args()

    if args.model:
        model = args.model
    else:
        from tandem.engine.model_source import resolve_model

        model = str(resolve_model(None))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model).vocab_size
    threads = torch.get_num_threads()
    print(f"model {model}, torch threads {threads}, {PROMPT_LEN} in / {OUTPUT_LEN} out")
    ours = bench_ours(model, args.concurrency, vocab, threads)
    hf = bench_hf(model, args.concurrency, vocab)
    rows = []
    print(f"\n{'concurrency':>11} {'tandem tok/s':>13} {'hf tok/s':>9} {'ratio':>6}")
    for c in args.concurrency:
        ratio = ours[c]["tokens_per_s"] / hf[c]["tokens_per_s"]
        rows.append({"concurrency": c, "tandem": ours[c], "hf": hf[c], "ratio": ratio})
        print(
            f"{c:>11} {ours[c]['tokens_per_s']:>13.1f} {hf[c]['tokens_per_s']:>9.1f} {ratio:>5.2f}x"
        )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "engine_cpu",
                "model": model,
                "prompt_len": PROMPT_LEN,
                "output_len": OUTPUT_LEN,
                "torch_threads": threads,
                "machine": platform.processor() or platform.machine(),
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
