"""Counter-based sampling noise: Exp(1) values that are a pure function of
(seed, sequence index, output position, token id).

Why counter-based: a seeded request must sample the same tokens whatever else is batched
with it and on whichever worker decodes it. A stateful generator per sequence needs per-row
host work each step (draw a vocab-sized row on the CPU, copy it to the device) and its state
has to travel with a migrated sequence. A hash of the position needs neither: all seeded rows
get their noise in a few elementwise ops on the logits' device, and a decode worker continues
the stream by itself, because the position is the number of output tokens already generated.

Definition (SplitMix64 by Steele, Lea and Flood, 2014, used here as a hash):

    mix(z)  = SplitMix64's finaliser, a bijection on 64-bit words
    key     = mix(mix(mix(seed + G) ^ (index + G)) ^ (position + G))     (mod 2**64)
    bits(t) = mix(key + (t + 1) * G)   i.e. the first vocab outputs of SplitMix64(key)
    u(t)    = ((bits(t) >> 41) + 0.5) / 2**23  strictly inside (0, 1), exact in float32
    noise   = max(-log(u), 2**-24)  ~ Exp(1), positive (the floor only guards a sloppy log)

The per-row key is computed on the host in numpy uint64, where wraparound is defined. The
vocab-wide part has two implementations with the same integer bits: int64 torch ops (CPU,
and the reference), whose multiply and add wrap and whose right shift is arithmetic, so each
shift is masked into a logical one; and, for CUDA tensors, one Triton kernel in uint64, which
writes each noise value once instead of making some twenty passes over a [rows, vocab] int64
tensor (about 1 ms for 256 rows of a 49k vocab on an H200). The float32 -log(u) may differ
in the last ulp between implementations of log.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the torch path does everything
    triton = None
    tl = None

HAS_TRITON = triton is not None

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2**64 / golden ratio, odd
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB
SHIFTS = (30, 27, 31)
UNIT_BITS = 23  # (k + 0.5) / 2**23 is exact in float32 for every 23-bit k, and below 1.0
MIN_NOISE = 2.0**-24  # -log(1 - 2**-24) rounded to float32: no correct log goes below it


def _signed(value: int) -> int:
    """The int64 with the same 64 bits as `value`: torch scalars must fit in int64."""
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


_GAMMA_I64, _MUL1_I64, _MUL2_I64 = _signed(GAMMA), _signed(MUL1), _signed(MUL2)


# -- the specification, in Python integers (tests check the fast paths against it) ----------


def mix64_reference(z: int) -> int:
    z &= MASK64
    z = ((z ^ (z >> SHIFTS[0])) * MUL1) & MASK64
    z = ((z ^ (z >> SHIFTS[1])) * MUL2) & MASK64
    return z ^ (z >> SHIFTS[2])


def key_reference(seed: int, index: int, position: int) -> int:
    h = mix64_reference(seed + GAMMA)
    h = mix64_reference(h ^ ((index + GAMMA) & MASK64))
    return mix64_reference(h ^ ((position + GAMMA) & MASK64))


def bits_reference(seed: int, index: int, position: int, token: int) -> int:
    return mix64_reference(key_reference(seed, index, position) + (token + 1) * GAMMA)


# -- host side: one key per row ------------------------------------------------------------


def _mix64_np(z: np.ndarray) -> np.ndarray:
    """`mix64_reference` over a uint64 array (numpy array arithmetic wraps silently)."""
    z = (z ^ (z >> np.uint64(SHIFTS[0]))) * np.uint64(MUL1)
    z = (z ^ (z >> np.uint64(SHIFTS[1]))) * np.uint64(MUL2)
    return z ^ (z >> np.uint64(SHIFTS[2]))


def row_keys(seeds: Sequence[int], indices: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """The noise key of each row, as int64 (the same 64 bits as `key_reference`), ready to be
    moved to the device. Seeds may be any Python int: only their low 64 bits count."""
    g = np.uint64(GAMMA)
    h = _mix64_np(np.array([s & MASK64 for s in seeds], dtype=np.uint64) + g)
    h = _mix64_np(h ^ (np.asarray(indices, dtype=np.uint64) + g))
    h = _mix64_np(h ^ (np.asarray(positions, dtype=np.uint64) + g))
    return h.view(np.int64)


# -- device side: a vocab-wide row per key ---------------------------------------------------


def _shr(x: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """Logical right shift of int64 bits into `out`: `>>` sign-extends, the mask clears what
    it copied."""
    return torch.bitwise_right_shift(x, k, out=out).bitwise_and_((1 << (64 - k)) - 1)


def _mix64_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """`mix64_reference` in place over int64 tensors (multiplication wraps mod 2**64). In
    place with one scratch buffer: on a CPU, fresh vocab-sized tensors cost more than the
    arithmetic (page faults), and on a GPU it keeps the working set small."""
    x.bitwise_xor_(_shr(x, SHIFTS[0], scratch)).mul_(_MUL1_I64)
    x.bitwise_xor_(_shr(x, SHIFTS[1], scratch)).mul_(_MUL2_I64)
    return x.bitwise_xor_(_shr(x, SHIFTS[2], scratch))


def bits(keys: torch.Tensor, vocab: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, vocab] int64: `bits_reference` for every row key and token id, on keys' device."""
    tokens = torch.arange(1, vocab + 1, dtype=torch.int64, device=keys.device)
    x = keys.to(torch.int64).unsqueeze(1) + tokens.mul_(_GAMMA_I64)
    return _mix64_(x, torch.empty_like(x) if scratch is None else scratch)


def uniform(keys: torch.Tensor, vocab: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, vocab] float32 uniforms strictly inside (0, 1): the top 23 bits, centred.
    `out`, if given, is a float32 [rows, vocab] tensor to write them into."""
    x = bits(keys, vocab)
    k = _shr(x, 64 - UNIT_BITS, out=x)
    if out is None:
        out = torch.empty(k.shape, dtype=torch.float32, device=k.device)
    return out.copy_(k).add_(0.5).mul_(2.0**-UNIT_BITS)


def exponential(
    keys: torch.Tensor,
    vocab: int,
    out: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """[rows, vocab] float32 Exp(1) noise, in [2**-24, 16.7]: positive, so p / noise is
    finite. With `rows`, key j's noise goes to `out[rows[j]]` instead (other rows of `out`
    are left as they are). CUDA tensors take the Triton kernel, others the torch ops."""
    if keys.is_cuda and HAS_TRITON:
        return exponential_triton(keys, vocab, out, rows)
    return exponential_torch(keys, vocab, out, rows)


def exponential_torch(
    keys: torch.Tensor,
    vocab: int,
    out: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    noise = uniform(keys, vocab, out if rows is None else None).log_().neg_()
    noise.clamp_min_(MIN_NOISE)
    if rows is None:
        return noise
    assert out is not None, "rows needs out"
    return out.index_copy_(0, rows, noise)


# -- the Triton kernel (CUDA; on a CPU the tests run it in Triton's interpreter) -------------

_BLOCK = 1024


def _launch(
    keys: torch.Tensor,
    vocab: int,
    out: torch.Tensor | None,
    rows: torch.Tensor | None,
    bits_only: bool,
) -> torch.Tensor:
    n = keys.shape[0]
    dtype = torch.int64 if bits_only else torch.float32
    if out is None:
        assert rows is None, "rows needs out"
        out = torch.empty(n, vocab, dtype=dtype, device=keys.device)
    assert out.dtype == dtype and out.shape[1] == vocab and out.stride(1) == 1
    if n:
        grid = (n, triton.cdiv(vocab, _BLOCK))
        _noise_kernel[grid](
            keys,
            keys if rows is None else rows,
            out,
            out.stride(0),
            vocab,
            HAS_ROWS=rows is not None,
            BITS=bits_only,
            BLOCK=_BLOCK,
        )
    return out


def exponential_triton(
    keys: torch.Tensor,
    vocab: int,
    out: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    return _launch(keys.to(torch.int64), vocab, out, rows, bits_only=False)


def bits_triton(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """The kernel's integer stage alone, as `bits` gives it (for the tests)."""
    return _launch(keys.to(torch.int64), vocab, None, None, bits_only=True)


if HAS_TRITON:
    _GAMMA_C = tl.constexpr(GAMMA)
    _MUL1_C = tl.constexpr(MUL1)
    _MUL2_C = tl.constexpr(MUL2)

    @triton.jit
    def _noise_kernel(
        keys_ptr,
        rows_ptr,
        out_ptr,
        out_stride,
        vocab,
        HAS_ROWS: tl.constexpr,
        BITS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One program per (key, block of tokens); uint64 arithmetic wraps and shifts
        logically, which is exactly the specification (SHIFTS, then 64 - UNIT_BITS)."""
        r = tl.program_id(0)
        t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        key = tl.load(keys_ptr + r).to(tl.uint64, bitcast=True)
        z = key + (t + 1).to(tl.uint64) * _GAMMA_C
        z = (z ^ (z >> 30)) * _MUL1_C
        z = (z ^ (z >> 27)) * _MUL2_C
        z = z ^ (z >> 31)
        row = r.to(tl.int64)
        if HAS_ROWS:
            row = tl.load(rows_ptr + r).to(tl.int64)
        dst = out_ptr + row * out_stride + t
        if BITS:
            tl.store(dst, z.to(tl.int64, bitcast=True), mask=t < vocab)
        else:
            u = ((z >> 41).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23
            tl.store(dst, tl.maximum(-tl.log(u), 5.960464477539063e-08), mask=t < vocab)
