"""GPU micro-benchmark: Tandem's Triton paged attention against torch SDPA on contiguous K/V.

Shapes of Llama-3.1-8B's attention (32 query heads, 8 KV heads, head_dim 128, bf16) over a
block-16 paged cache whose blocks are shuffled (so the kernel really gathers). SDPA reads
K/V that are already contiguous: it is the speed to aim at, not a paged competitor. Each
case also checks the kernel's output against SDPA's. Prints a table and writes
results/attention_kernels.json.

    python benchmarks/attention_kernels.py [--sweep]

`--sweep` also times other tile configurations of the kernel (for tuning).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE = 32, 8, 128, 16, torch.bfloat16
#: (BLOCK_N, num_warps, num_stages) of decode tiles that `--sweep` tries.
DECODE_SWEEP = [(bn, w, s) for bn in (16, 32, 64, 128) for w in (1, 2, 4) for s in (1, 2, 3)]


def bench(fn) -> float:
    """Median milliseconds of `fn` (CUDA events, after warm-up)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=100, rep=300, return_mode="median")


def ceilings() -> dict[str, float]:
    """Copy bandwidth (bytes read + written) and bf16 matmul rate, measured here and now."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_ms = bench(lambda: y.copy_(x))
    a = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    mm_ms = bench(lambda: a @ a)
    return {"copy_GBps": 2 * x.numel() / copy_ms / 1e6, "matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


def make_case(seq_lens: list[int], q_lens: list[int]):
    """A shuffled paged cache holding the sequences, and the kernel's arguments."""
    need = [-(-s // BLOCK) for s in seq_lens]
    num_blocks = sum(need)
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    v_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    perm = torch.randperm(num_blocks, device="cuda", dtype=torch.int32)
    tables = torch.zeros(len(seq_lens), max(need), dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used : used + n]
        used += n
    starts = torch.tensor([0, *q_lens], device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(sum(q_lens), HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    meta = dict(
        query_start_loc=starts,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        block_tables=tables,
        scale=HEAD_DIM**-0.5,
        max_query_len=max(q_lens),
    )
    return q, k_cache, v_cache, meta


def dense(q, k_cache, v_cache, meta, i: int):
    """Sequence i's q, K, V as contiguous [1, heads, len, head_dim] tensors for SDPA."""
    a, b = meta["query_start_loc"][i : i + 2].tolist()
    seq_len = int(meta["seq_lens"][i])
    blocks = meta["block_tables"][i, : -(-seq_len // BLOCK)].long()

    def gather(c):
        return c[blocks].flatten(0, 1)[:seq_len].transpose(0, 1).unsqueeze(0).contiguous()

    return q[a:b].transpose(0, 1).unsqueeze(0).contiguous(), gather(k_cache), gather(v_cache)


def sdpa_decode(q, k_cache, v_cache, meta):
    """Batched SDPA for equal-length decodes; returns (fn, output as [T, heads, dim])."""
    parts = [dense(q, k_cache, v_cache, meta, i) for i in range(len(meta["seq_lens"]))]
    qd, kd, vd = (torch.cat(t) for t in zip(*parts, strict=True))

    def fn():
        return F.scaled_dot_product_attention(qd, kd, vd, scale=meta["scale"], enable_gqa=True)

    return fn, lambda: fn().squeeze(2)


def sdpa_prefill(q, k_cache, v_cache, meta):
    """SDPA for one sequence, causal aligned to the end (the chunk sits after its prefix)."""
    qd, kd, vd = dense(q, k_cache, v_cache, meta, 0)
    if qd.shape[2] == kd.shape[2]:
        def fn():
            return F.scaled_dot_product_attention(
                qd, kd, vd, is_causal=True, scale=meta["scale"], enable_gqa=True
            )
    else:
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(qd.shape[2], kd.shape[2])
        group = HEADS // KV_HEADS
        kd, vd = kd.repeat_interleave(group, 1), vd.repeat_interleave(group, 1)

        def fn():
            return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=bias, scale=meta["scale"])

    return fn, lambda: fn()[0].transpose(0, 1)


def sdpa_mixed(q, k_cache, v_cache, meta):
    """Decodes (all first, equal contexts) batched, then the last sequence's chunk."""
    n = len(meta["seq_lens"]) - 1
    dec = {**meta, "seq_lens": meta["seq_lens"][:n], "block_tables": meta["block_tables"][:n]}
    dec_fn, dec_out = sdpa_decode(q, k_cache, v_cache, dec)
    last = {**meta, "query_start_loc": meta["query_start_loc"][n:] - n,
            "seq_lens": meta["seq_lens"][n:], "block_tables": meta["block_tables"][n:]}
    pre_fn, pre_out = sdpa_prefill(q[n:], k_cache, v_cache, last)

    def fn():
        dec_fn()
        pre_fn()

    return fn, lambda: torch.cat([dec_out(), pre_out()])


def sdpa_prefills(q, k_cache, v_cache, meta):
    """Several whole prompts, one SDPA call each."""
    qsl = meta["query_start_loc"]
    calls = []
    for i in range(len(meta["seq_lens"])):
        one = {**meta, "query_start_loc": qsl[i : i + 2] - qsl[i],
               "seq_lens": meta["seq_lens"][i : i + 1],
               "block_tables": meta["block_tables"][i : i + 1]}  # fmt: skip
        calls.append(sdpa_prefill(q[qsl[i] : qsl[i + 1]], k_cache, v_cache, one))

    def fn():
        for call, _ in calls:
            call()

    return fn, lambda: torch.cat([out() for _, out in calls])


def run_case(name, seq_lens, q_lens, splits_options, sweep: bool):
    from tandem.engine.kernels import attention as ka

    q, k_cache, v_cache, meta = make_case(seq_lens, q_lens)
    out = torch.empty_like(q)
    decode = max(q_lens) == 1
    prefills = len(q_lens) > 1 and q_lens == seq_lens
    mixed = not decode and len(q_lens) > 1 and not prefills
    baseline = (sdpa_decode if decode else sdpa_mixed if mixed
                else sdpa_prefills if prefills else sdpa_prefill)  # fmt: skip
    base_fn, base_out = baseline(q, k_cache, v_cache, meta)
    want = base_out().float()
    # Work: each query row attends over its visible keys; bytes: K/V read once plus q and out.
    seen = sum(q * (s - q) + q * (q + 1) // 2 for s, q in zip(seq_lens, q_lens, strict=True))
    flops = 4 * HEADS * HEAD_DIM * seen
    nbytes = 2 * sum(seq_lens) * KV_HEADS * HEAD_DIM * 2 + 2 * q.numel() * 2
    rows = []

    def record(label, ms):
        rows.append({
            "case": name, "impl": label, "ms": ms, "TFLOPs": flops / ms / 1e9,
            "GBps": nbytes / ms / 1e6,
        })  # fmt: skip

    record("sdpa (contiguous)" + (", 2 calls" if mixed else ""), bench(base_fn))
    configs = [None]
    if sweep and decode:
        configs += DECODE_SWEEP
    if sweep and not decode:
        configs += [(bm, bn, w, s) for bm in (32, 64, 128) for bn in (32, 64, 128)
                    for w in (4, 8) for s in (1, 2, 3)]  # fmt: skip
    saved = ka._decode_config, ka._prefill_config
    for cfg in configs:
        if cfg is not None:
            if decode:
                ka._decode_config = lambda d, t, c=cfg: c
            else:
                ka._prefill_config = lambda d, t, m, *_, c=cfg: c
        # In a mixed batch `splits_options` holds num_decodes values instead.
        for splits in splits_options:
            extra = {"num_decodes": splits} if mixed else {"num_splits": splits}

            def fn(extra=extra):
                return ka.paged_attention(q, k_cache, v_cache, out, **meta, **extra)

            out.fill_(float("nan"))  # every element must be written
            try:
                fn()
                torch.cuda.synchronize()
            except Exception as e:  # a sweep config over the shared-memory limit
                print(f"  {name} {cfg}: {type(e).__name__}", file=sys.stderr)
                continue
            err = ((out.float() - want).norm() / want.norm()).item()
            assert err < 2e-2, f"{name}: relative error {err} against SDPA"
            label = f"triton {next(iter(extra))}={splits}" + ("" if cfg is None else f" {cfg=}")
            record(label, bench(fn))
        ka._decode_config, ka._prefill_config = saved
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time other tile configs")
    parser.add_argument("--cases", nargs="+", help="run only the cases whose name starts so")
    parser.add_argument("--out", default="results/attention_kernels.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_kernels.py needs a CUDA GPU (this machine has none)")
    from tandem.engine.kernels.attention import choose_num_splits

    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    auto = choose_num_splits(1, KV_HEADS, 32768, sms)
    cases = [
        ("decode b1 ctx32768", [32768], [1], sorted({1, auto, 32})),
        ("decode b1 ctx256", [256], [1], [1, 2, 4, 8]),
        ("decode b64 ctx256", [256] * 64, [1] * 64,
         sorted({1, choose_num_splits(64, KV_HEADS, 256, sms)})),
        ("decode b64 ctx192", [192] * 64, [1] * 64, [1, 2]),
        ("decode b256 ctx192", [192] * 256, [1] * 256,
         sorted({1, choose_num_splits(256, KV_HEADS, 192, sms)})),
        ("prefill 8192", [8192], [8192], [1]),
        ("prefill 64x128", [128] * 64, [128] * 64, [1]),
        ("chunk 2048 on 6144", [8192], [2048], [1]),
        ("mixed 200x1 + 1024", [320] * 200 + [3072], [1] * 200 + [1024], [0, 200]),
    ]  # fmt: skip
    peak = ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {peak['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {peak['matmul_TFLOPs']:.0f} TFLOP/s")  # fmt: skip
    rows = []
    for case in cases:
        if args.cases and not any(case[0].startswith(c) for c in args.cases):
            continue
        rows += run_case(*case, sweep=args.sweep)
    print(f"{'case':<22} {'impl':<40} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>7}")
    for r in rows:
        print(f"{r['case']:<22} {r['impl']:<40} {r['ms']:9.4f} {r['TFLOPs']:8.1f} "
              f"{r['GBps']:7.0f}")  # fmt: skip
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK,
             "dtype": str(DTYPE)}  # fmt: skip
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "shape": shape,
                                "ceilings": peak, "rows": rows}, indent=1))  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
