"""The Llama-family decoder: Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, SmolLM2.

They differ only in small switches read from the Hugging Face config: biases on the QKV
projection (Qwen2), per-head RMSNorm on queries and keys (Qwen3), the RoPE variant
(llama3 scaling, linear, yarn...: computed by transformers' own RoPE functions so the
frequencies match bit for bit) and tied embeddings. Q/K/V and gate/up projections are fused
into one matmul each: fewer kernel launches per layer matter a lot for small models.

Tokens arrive flattened across sequences: `input_ids[T]`, `positions[T]`; the attention
backend reads the paged KV cache through the metadata it prepared for the step.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from tandem.engine import cpu, cpu_kernels
from tandem.engine.attention import AttentionBackend
from tandem.engine.kernels import fused, skinny_linear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def rope_cos_sin(config: PretrainedConfig, head_dim: int, max_positions: int) -> torch.Tensor:
    """A [max_positions, head_dim] table: cos in the first half, sin in the second."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float), inv_freq.float())
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Hugging Face layout). x: [T, heads, dim]; cos/sin: [T, 1, dim/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Linear(nn.Linear):
    """nn.Linear whose GPU path sends decode-sized batches to the skinny Triton kernel, and
    whose CPU path may use a oneDNN-packed copy of its weight (`tandem.engine.cpu`)."""

    fused = False
    #: Its output only feeds the residual add (o_proj, down): it may return `PartialSums`.
    into_residual = False
    packed: torch.Tensor | None = None
    #: CPU, bfloat16: up to this many rows `cpu_kernels.linear` computes it (timed faster).
    few_rows = 0
    cpu_kernels: ctypes.CDLL | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor | skinny_linear.PartialSums:
        if x.shape[0] <= self.few_rows and self.cpu_kernels is not None and x.dim() == 2:
            return cpu_kernels.linear(self.cpu_kernels, x, self.weight, self.bias)
        if self.packed is not None:
            return cpu.packed_linear(x, self.packed, self.bias)
        if self.fused and self.into_residual and self.bias is None:
            return skinny_linear.linear_into_residual(x, self.weight)
        if self.fused:
            return skinny_linear.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Hugging Face's RMSNorm; with `residual`, the skip connection's add fused in front."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.fused = False
        self.cpu_kernels: ctypes.CDLL | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.cpu_kernels is not None and x.dim() == 2 and x.stride(-1) == 1:
            return cpu_kernels.add_rms_norm(self.cpu_kernels, x, self.weight, self.eps, residual)
        norm = fused.rms_norm if self.fused else fused.rms_norm_torch
        return norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(
        self, config: PretrainedConfig, layer: int, backend: AttentionBackend | None
    ) -> None:
        super().__init__()
        self.layer = layer
        self.backend = backend
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        bias = getattr(config, "attention_bias", config.model_type == "qwen2")
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        self.o_proj.into_residual = True
        self.qk_norm = config.model_type == "qwen3"
        self.fused = False
        self.cpu_kernels: ctypes.CDLL | None = None
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: Any):
        """`rope`: (cos, sin) rows of the tokens; with fused kernels (positions, table); with
        CPU kernels the tokens' rows of the table."""
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.fused or self.cpu_kernels is not None:  # rotated where the KV is stored
            o = self.backend.forward(self.layer, q, k, v, meta, rope=rope)
        else:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            o = self.backend.forward(self.layer, q, k, v, meta)
        return self.o_proj(o.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.inter = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * self.inter, bias=False)
        self.down_proj = Linear(self.inter, config.hidden_size, bias=False)
        self.down_proj.into_residual = True
        self.fused = False
        self.cpu_kernels: ctypes.CDLL | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernels is not None:
            return self.down_proj(cpu_kernels.silu_and_mul(self.cpu_kernels, self.gate_up_proj(x)))
        if not self.fused:
            return self.down_proj(fused.silu_and_mul_torch(self.gate_up_proj(x)))
        act = skinny_linear.gated_mlp_input(x, self.gate_up_proj.weight)
        if act is None:
            act = fused.silu_and_mul(self.gate_up_proj(x))
        return self.down_proj(act)


class DecoderLayer(nn.Module):
    def __init__(
        self, config: PretrainedConfig, layer: int, backend: AttentionBackend | None
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, rope, meta):
        """Returns (output, residual): the next layer's norm adds them (vLLM's pattern), the
        same IEEE sums as `x + f(x)`."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rope, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, config: PretrainedConfig, backend: AttentionBackend | None, max_positions: int
    ):
        super().__init__()
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {config.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, backend) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tied:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.fused = False
        self.cpu_kernels: ctypes.CDLL | None = None
        self.logits_packed: torch.Tensor | None = None
        self.logits_few_rows = 0  # as `Linear.few_rows`
        # Filled by `init_rope()` once the module has real storage (it may be built on "meta").
        self.register_buffer("rope", torch.empty(max_positions, head_dim_of(config)))

    def set_fused_kernels(self, on: bool) -> None:
        """Triton kernels for norms, RoPE and SiLU (GPU path); torch otherwise."""
        for module in self.modules():
            if hasattr(module, "fused"):
                module.fused = on

    def set_cpu_kernels(self, lib: ctypes.CDLL | None) -> None:
        """`cpu_kernels`' C library for norms, RoPE with the KV store and SiLU (None: torch's
        ops); the attention backend must take RoPE's table rows (`TorchAttention` does)."""
        for module in self.modules():
            if hasattr(module, "cpu_kernels"):
                module.cpu_kernels = lib

    @torch.inference_mode()
    def warm_up_linears(self) -> None:
        """Compile the skinny linear's variants a step can need (row tiles of 16, 32 and 64,
        gated, split-K partial sums and the residual norm that adds them; past 64 rows the
        SiLU kernel) before serving starts: a compile mid-serving stalls every live stream
        for about a second."""
        hidden = self.config.hidden_size
        attention, mlp = self.layers[0].self_attn, self.layers[0].mlp
        for rows in (1, 32, skinny_linear.TILE_ROWS, skinny_linear.TILE_ROWS + 1):
            x = self.norm.weight.new_zeros(rows, hidden)
            self.compute_logits(x)
            attention.qkv_proj(x)
            for out in (attention.o_proj(x.new_zeros(rows, attention.q_size)), mlp(x)):
                if isinstance(out, skinny_linear.PartialSums):
                    self.norm(out, x)

    @torch.inference_mode()
    def pack_cpu_linears(self, lib: ctypes.CDLL | None) -> tuple[int, int, int]:
        """oneDNN-packed weights (CPU) for the linears and the logits whose shape measures
        faster so, and the rows up to which `lib`'s C linear takes them (also measured);
        returns how many weights were packed, how many take the C linear, of how many."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        weights = [m.weight for m in linears] + [self._logits_weight()]
        packs = cpu.pack_if_faster(weights)
        limits = cpu.few_rows_limits(weights, packs, lib)
        *packs, self.logits_packed = packs
        *limits, self.logits_few_rows = limits
        for m, packed, few_rows in zip(linears, packs, limits, strict=True):
            m.packed, m.few_rows = packed, few_rows
        packed = sum(p is not None for p in [*packs, self.logits_packed])
        return packed, sum(n > 0 for n in [*limits, self.logits_few_rows]), len(weights)

    def _logits_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.tied else self.lm_head.weight

    def set_attention(self, backend: AttentionBackend | None) -> None:
        for layer in self.layers:
            layer.self_attn.backend = backend

    def init_dummy_weights(self, seed: int) -> None:
        """Random weights of the right shapes (vLLM's `--load-format dummy`): throughput
        runs of a real model's shape without its files."""
        generator = torch.Generator(self.rope.device).manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "norm" in name:
                    param.fill_(1.0)
                else:
                    param.uniform_(-0.02, 0.02, generator=generator)

    def init_rope(self) -> None:
        table = rope_cos_sin(self.config, head_dim_of(self.config), self.rope.shape[0])
        self.rope = table.to(self.rope.device)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any
    ) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm."""
        x = self.embed_tokens(input_ids)
        if self.fused:
            rope = (positions, self.rope)
        elif self.cpu_kernels is not None:
            rope = self.rope[positions].to(x.dtype)
        else:
            rope = self.rope[positions].to(x.dtype).unsqueeze(1).chunk(2, dim=-1)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, meta)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self._logits_weight()
        if hidden.shape[0] <= self.logits_few_rows and self.cpu_kernels is not None:
            return cpu_kernels.linear(self.cpu_kernels, hidden, weight, None).float()
        if self.logits_packed is not None:
            return cpu.packed_linear(hidden, self.logits_packed, None).float()
        if self.fused:
            return skinny_linear.linear(hidden, weight, None).float()
        return F.linear(hidden, weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face checkpoint tensors in, fusing q/k/v and gate/up on the way.

        Every parameter must be written exactly once: a missing tensor is an error, not a
        silently random weight.
        """
        params = dict(self.named_parameters())
        fused = {
            "q_proj": ("qkv_proj", 0),
            "k_proj": ("qkv_proj", 1),
            "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0),
            "up_proj": ("gate_up_proj", 1),
        }
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.tied:
                continue
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in fused:
                target, shard = fused[parts[-2]]
                pname = ".".join([*parts[:-2], target, parts[-1]])
                param = self._shard_of(params[pname], target, shard)
                loaded.add(f"{pname}#{shard}")
            else:
                if name not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
                param = params[name]
                loaded.add(name)
            if param.shape != tensor.shape:
                raise ValueError(
                    f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(tensor)
        expected = set()
        for pname in params:
            if ".qkv_proj." in pname:
                expected |= {f"{pname}#{i}" for i in range(3)}
            elif ".gate_up_proj." in pname:
                expected |= {f"{pname}#{i}" for i in range(2)}
            else:
                expected.add(pname)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def _shard_of(self, param: torch.Tensor, target: str, shard: int) -> torch.Tensor:
        if target == "gate_up_proj":
            return param.chunk(2, dim=0)[shard]
        attn = self.layers[0].self_attn
        sizes = [attn.q_size, attn.kv_size, attn.kv_size]
        start = sum(sizes[:shard])
        return param.narrow(0, start, sizes[shard])
