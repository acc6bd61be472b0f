"""Tandem's CPU kernels: decode attention that reads the paged KV cache in place
(`cpu_attention.c`), the element-wise glue of a decoder layer (`cpu_layer_ops.c`) and
bfloat16 linear layers at a decode step's few rows (`cpu_linear.c`).

Torch has no op for the first: the padded path gathers every decode's whole context, converts
it to float32, expands it per query head and masks it, which at 32 sequences of 192 tokens
cost more than the step's linear layers. The glue exists in torch, as 3 to 12 ops a call
whose dispatch, at a decode step's few rows, costs more than their arithmetic. The kernels are
plain C (no torch headers), so they compile in about a second with the machine's C compiler,
for this CPU (`-march=native`), on first use; the library is cached under `~/.cache/tandem/`
keyed by the sources, the compiler and the CPU's flags. It is called through `ctypes`, which
drops the GIL for the call, and runs on the OpenMP runtime that importing torch loaded
(`libgomp.so.1`, shared by name).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in
           ("cpu_kernels.h", "cpu_attention.c", "cpu_layer_ops.c", "cpu_linear.c")]  # fmt: skip
# Sums may be reordered (vector reductions, a tree at the end); NaN and inf keep their meaning.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]  # fmt: skip
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why."""


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "tandem" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join([*(f.read_text() for f in SOURCES), *FLAGS, version, _cpu_flags()]).encode()
    ).hexdigest()[:16]
    path = _cache_dir() / f"cpu_kernels-{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: workers starting together never load half a file.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        done = subprocess.run(
            [compiler, *FLAGS, "-o", str(built), *(str(f) for f in SOURCES[1:]), "-lm"],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise KernelUnavailable(f"{compiler} failed: {done.stderr.strip()[-400:]}")
        built.replace(path)
    return path


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernel, built on first use; raises KernelUnavailable with the reason."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise KernelUnavailable("no C compiler found (set CC, or install gcc)")
    lib = ctypes.CDLL(str(_build(compiler)))
    i64, i32, ptr, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    signatures = {
        "decode_attention": [ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, ptr, i64, ptr, ptr,
                             i64, i64, i32, i32, i32, i32, i32, f32, i32],
        "add_rms_norm": [ptr, i64, ptr, i64, ptr, ptr, i64, i32, i32, f32, i32],
        "rope_store": [ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, i64, ptr, ptr, i64,
                       ptr, i32, i32, i32, i32, i32],
        "silu_and_mul": [ptr, i64, ptr, i64, i32, i32, i32],
    }  # fmt: skip
    lib.fn = {}  # (name, dtype) -> the C function: looked up once, called every layer
    for name, argtypes in signatures.items():
        for dtype, suffix in _SUFFIX.items():
            fn = lib.fn[name, dtype] = getattr(lib, f"{name}_{suffix}")
            fn.restype = None
            fn.argtypes = argtypes
    lib.linear_bf16.restype = i32
    lib.linear_bf16.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i32, i32, i32, i32]
    lib.decode_attention_limits.restype = i32
    # (query heads per KV head, head dim, block size): read once, checked at every layer
    lib.limits = tuple(lib.decode_attention_limits(i) for i in range(3))
    return lib


def load() -> ctypes.CDLL | None:
    """The kernel, or None after logging once why the padded torch path stays."""
    try:
        return library()
    except (KernelUnavailable, OSError) as e:
        _warn_once(str(e))
        return None


@functools.cache
def _warn_once(reason: str) -> None:
    log.warning("CPU kernels unavailable: decode attention keeps torch's padded SDPA (several "
                "times slower at batch) and the layers torch's ops: %s", reason)  # fmt: skip


def supports(lib: ctypes.CDLL | None, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel serves these shapes and dtypes (float16 caches, for one, do not)."""
    if lib is None:
        return False
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    max_group, max_dim, max_block = lib.limits
    return (
        q.dtype in _SUFFIX
        and k_cache.dtype == q.dtype
        and q.shape[1] // num_kv_heads <= max_group
        and head_dim <= max_dim
        and block_size <= max_block
        and q.stride(2) == 1
        and k_cache.stride(3) == 1
    )


def decode_attention(
    lib: ctypes.CDLL,
    q: torch.Tensor,  # [T, num_heads, head_dim]; rows `rows` decode
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    out: torch.Tensor,  # like q; rows `rows` are written
    rows: torch.Tensor,  # [B] int32
    block_tables: torch.Tensor,  # [B, W] int32, contiguous rows
    seq_lens: torch.Tensor,  # [B] int32: tokens to attend, this step's included
    scale: float,
) -> None:
    """Each decode row attends over its sequence's first `seq_lens` cached tokens."""
    assert k_cache.stride() == v_cache.stride() and out.stride(2) == 1
    assert rows.dtype == block_tables.dtype == seq_lens.dtype == torch.int32
    assert block_tables.stride(1) == 1 and rows.is_contiguous() and seq_lens.is_contiguous()
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    lib.fn["decode_attention", q.dtype](
        q.data_ptr(), q.stride(0), q.stride(1),
        k_cache.data_ptr(), v_cache.data_ptr(), *k_cache.stride()[:3],
        rows.data_ptr(), block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(),
        out.data_ptr(), out.stride(0), out.stride(1),
        rows.shape[0], q.shape[1], num_kv_heads, head_dim, block_size, scale,
        torch.get_num_threads(),
    )  # fmt: skip


def glue_supports(lib: ctypes.CDLL | None, x: torch.Tensor) -> bool:
    """Whether the layer-glue kernels serve `x` (float32 or bfloat16 on a CPU)."""
    return lib is not None and x.dtype in _SUFFIX and x.device.type == "cpu"


def add_rms_norm(
    lib: ctypes.CDLL,
    x: torch.Tensor,  # [rows, dim], last dim contiguous
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`fused.rms_norm_torch` in one call; with `residual`, the sum is written into `x`,
    which comes back as the next residual."""
    assert x.stride(-1) == 1 and weight.is_contiguous() and weight.dtype == x.dtype
    out = torch.empty_like(x)
    rows, dim = x.shape
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(-1) == 1
    lib.fn["add_rms_norm", x.dtype](
        x.data_ptr(), x.stride(0),
        None if residual is None else residual.data_ptr(),
        0 if residual is None else residual.stride(0),
        weight.data_ptr(), out.data_ptr(), out.stride(0), rows, dim, eps,
        torch.get_num_threads(),
    )  # fmt: skip
    return out if residual is None else (out, x)


def rope_store(
    lib: ctypes.CDLL,
    q: torch.Tensor,  # [T, heads, dim], rotated in place
    k: torch.Tensor,  # [T, kv_heads, dim], rotated in place
    v: torch.Tensor,
    table: torch.Tensor,  # [T, dim]: each token's cos then sin
    k_cache: torch.Tensor,  # [blocks, block_size, kv_heads, dim]
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [T] int64
) -> None:
    """RoPE on q and k, then k and v stored at their cache slots."""
    tokens, num_heads, dim = q.shape
    assert q.stride(2) == k.stride(2) == v.stride(2) == table.stride(1) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and slots.dtype == torch.int64
    assert table.dtype == q.dtype == k_cache.dtype and slots.is_contiguous()
    lib.fn["rope_store", q.dtype](
        q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
        v.data_ptr(), v.stride(0), v.stride(1), table.data_ptr(), table.stride(0),
        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(1), slots.data_ptr(),
        tokens, num_heads, k.shape[1], dim, torch.get_num_threads(),
    )  # fmt: skip


def silu_and_mul(lib: ctypes.CDLL, x: torch.Tensor) -> torch.Tensor:
    """`fused.silu_and_mul_torch` in one call: x = [gate | up] -> silu(gate) * up."""
    assert x.stride(-1) == 1
    rows, width = x.shape
    out = x.new_empty(rows, width // 2)
    lib.fn["silu_and_mul", x.dtype](
        x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), rows, width // 2,
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def linear(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` in bfloat16 for a few rows, reading the plain `[out, in]` weight."""
    assert x.dtype == weight.dtype == torch.bfloat16 and weight.is_contiguous()
    assert x.stride(-1) == 1 and (bias is None or bias.is_contiguous())
    rows, k = x.shape
    out = x.new_empty(rows, weight.shape[0])
    failed = lib.linear_bf16(
        x.data_ptr(), x.stride(0), weight.data_ptr(), None if bias is None else bias.data_ptr(),
        out.data_ptr(), out.stride(0), rows, weight.shape[0], k, torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError(f"no memory for a float32 copy of {rows} x {k} inputs")
    return out
