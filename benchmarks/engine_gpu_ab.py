"""engine_gpu.py with kernel features turned off, for side-by-side figures in one lease.

    python benchmarks/engine_gpu_ab.py OFF [engine_gpu.py flags...]

OFF is a comma-separated list: `pdl` (programmatic dependent launch), `kv` (a decode step's
RoPE and KV store as their own launch, not inside attention), `rowsN` (the skinny Triton
linear for batches up to N rows, tiles for more than 16 rows from `--tiles JSON`, the best
of a `linear_shapes.py --sweep`), `splitk` (o_proj and down at 17-64 rows through cuBLAS, not
split-K partial sums left for the residual norm; `--split-tiles JSON` instead sets their
and qkv's tiles to the best of a `linear_shapes.py --splits` sweep), `summed` (qkv at 17-64
rows through cuBLAS, not split-K summed in the launch), `shortq` (prompts of
<= 128 tokens with the default prefill tile, not the short-query one), `gated` (gate_up
through cuBLAS
or the plain skinny kernel, then the SiLU kernel, instead of one gated launch; `--gated-tiles
JSON` instead sets its tiles to the best of `linear_shapes.py --gated`), or `none` (the code
as is). It patches the engine in this process only; nothing else changes.
"""

import json
import runpy
import sys
from pathlib import Path

import torch

off = set(sys.argv.pop(1).split(","))
tiles = {}
if "--tiles" in sys.argv:  # the faster of cuBLAS and the best tile, per shape
    at = sys.argv.index("--tiles")
    tiles = {(r["n"], r["k"]): (tuple(r["triton_best_config"])
                                if r["triton_best_us"] < r["cublas_us"] else None)
             for r in json.loads(Path(sys.argv[at + 1]).read_text())
             if r["batch"] > 16 and "triton_best_config" in r}  # fmt: skip
    del sys.argv[at : at + 2]
for item in [o for o in off if o.startswith("rows")]:
    from tandem.engine.kernels import skinny_linear as sl

    sl.MAX_ROWS = int(item[4:])
    skinny = sl.skinny_linear

    def tiled(x, weight, out=None, bias=None, *, config=None, _skinny=skinny, **kw):
        if config is None and x.shape[0] > 16:
            config = tiles.get(tuple(weight.shape), ())
            if config is None:
                return torch.nn.functional.linear(x, weight, bias)
        return _skinny(x, weight, out, bias, config=config or None, **kw)

    sl.skinny_linear = tiled
if "--attention-tiles" in sys.argv:  # the best decode tile and split count at batch 64
    at = sys.argv.index("--attention-tiles")
    rows = json.loads(Path(sys.argv[at + 1]).read_text())["rows"]
    del sys.argv[at : at + 2]
    best = min((r for r in rows if r["case"].startswith("decode b64")
                and r["impl"].startswith("triton")), key=lambda r: r["ms"])  # fmt: skip
    print("attention at batch 64:", best["impl"], best["ms"], "ms", flush=True)
    from tandem.engine import attention_triton as atn
    from tandem.engine.kernels import attention as ka

    label = best["impl"].split()
    splits = int(label[1].split("=")[1])
    if "cfg=" in best["impl"]:
        cfg = tuple(int(v) for v in best["impl"].split("cfg=(")[1].rstrip(")").split(","))
        default = ka._decode_config
        ka._decode_config = lambda d, t, c=cfg: c if t != torch.float32 else default(d, t)
    choose = atn.choose_num_splits
    atn.choose_num_splits = lambda b, h, n, sms: splits if b >= 32 else choose(b, h, n, sms)
if "splitk" in off:
    from tandem.engine.kernels import skinny_linear as sl

    sl.linear_into_residual = lambda x, weight: sl.linear(x, weight, None)
if "--split-tiles" in sys.argv:  # the best split-K tile per narrow shape, at the largest batch
    at = sys.argv.index("--split-tiles")
    rows = [r for r in json.loads(Path(sys.argv[at + 1]).read_text()) if "triton_split_config" in r]
    del sys.argv[at : at + 2]
    rows.sort(key=lambda r: r["batch"])
    best = {(r["n"], r["k"]): r["triton_split_config"] for r in rows}
    print("split-K tiles:", best, flush=True)
    from tandem.engine.kernels import skinny_linear as sl

    default_split = sl.split_config
    sl.split_config = lambda n, k: ((tuple(best[n, k][:4]), best[n, k][4]) if (n, k) in best
                                    else default_split(n, k))  # fmt: skip
if "summed" in off:
    from tandem.engine.kernels import skinny_linear as sl

    def cublas_past_16_rows(x, weight, bias, _linear=sl.linear):
        if x.dim() == 2 and x.shape[0] > sl.MAX_ROWS:
            return torch.nn.functional.linear(x, weight, bias)
        return _linear(x, weight, bias)

    sl.linear = cublas_past_16_rows
if "shortq" in off:
    from tandem.engine.kernels import attention as ka

    ka._SHORT_QUERY = 0
if "gated" in off:
    from tandem.engine.kernels import skinny_linear as sl

    sl.gated_mlp_input = lambda x, weight: None
if "--gated-tiles" in sys.argv:  # the best gated tile at 1 and at 64 rows
    at = sys.argv.index("--gated-tiles")
    best = {r["batch"] > 16: tuple(r["gated_best_config"])
            for r in json.loads(Path(sys.argv[at + 1]).read_text())}  # fmt: skip
    del sys.argv[at : at + 2]
    print("gated tiles (wide, skinny):", best, flush=True)
    from tandem.engine.kernels import skinny_linear as sl

    default_gated = sl.gated_config
    sl.gated_config = lambda rows: best.get(rows > 16) or default_gated(rows)
if "pdl" in off:
    from tandem.engine.kernels import pdl

    pdl._supported = lambda device: False
if "kv" in off:
    from tandem.engine import attention_triton as at
    from tandem.engine.kernels.attention import paged_attention
    from tandem.engine.kernels.kv_store import rope_store_kv, store_kv

    def forward(self, layer, q, k, v, meta, rope=None):  # the backend before the fusion
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        if rope is None:
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        else:
            rope_store_kv(q, k, v, k_cache, v_cache, meta.slot_mapping, *rope)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return paged_attention(q, k_cache, v_cache, out, query_start_loc=meta.query_start_loc,
                               seq_lens=meta.seq_lens, block_tables=meta.block_tables,
                               scale=self.scale, max_query_len=meta.max_query_len,
                               num_splits=meta.num_splits, num_decodes=meta.num_decodes)

    at.TritonAttention.forward = forward
sys.argv[0] = str(Path(__file__).with_name("engine_gpu.py"))
runpy.run_path(sys.argv[0], run_name="__main__")
