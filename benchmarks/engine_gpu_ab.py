"""engine_gpu.py with kernel features turned off, for side-by-side figures in one lease.

    python benchmarks/engine_gpu_ab.py OFF [engine_gpu.py flags...]

OFF is a comma-separated list: `pdl` (programmatic dependent launch), `kv` (a decode step's
RoPE and KV store as their own launch, not inside attention), or `none` (the code as is).
It patches the engine in this process only; nothing else changes.
"""

import runpy
import sys
from pathlib import Path

import torch

off = set(sys.argv.pop(1).split(","))
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
