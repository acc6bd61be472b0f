"""How the engine runs on a CPU: its thread count, and linear layers through oneDNN's
pre-packed weights where they measure faster.

`F.linear` in bfloat16 re-lays the weight out for oneDNN's kernels on every call; a decode
step of a small model then spends most of its time there. PyTorch ships the packed path
that its own compiler uses on CPUs (`mkldnn._reorder_linear_weight` once, at load, then
`mkldnn._linear_pointwise`): each weight shape is timed both ways at load, at the row
counts a step has, and the packed copy kept only where it wins (it is a second copy of the
weight). One bfloat16 layer of the demo model at one row, one thread: 69 / 44 / 153 / 83
µs (qkv, o, gate_up, down) through F.linear, 36 / 28 / 73 / 44 packed, the same bits.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time

import torch
import torch.nn.functional as F

from tandem.engine import cpu_kernels

log = logging.getLogger(__name__)

#: Rows of a step that the choice is timed at: a decode of one, and of a batch.
TIMED_ROWS = (1, 16)
#: The packed path must win by this much to be kept (it costs a copy of the weight).
MIN_GAIN = 1.1
#: Weights of these dtypes are tried. float32 keeps F.linear: its packed kernels round
#: differently from MKL's, and float32 is the path checked against transformers token for
#: token (in bfloat16 both paths give the same bits).
PACKED_DTYPES = (torch.bfloat16, torch.float16)


#: A step of at least this many tokens (a prefill) is bound by arithmetic, not by reading the
#: weights: it takes every core (`thread_counts`).
PREFILL_TOKENS = 64


def default_threads() -> int:
    """Threads for a CPU engine's decode steps: the cores this process may use but one, which
    the step loop and the HTTP server keep (on 2 cores, 1 thread served the demo model 1.2x
    faster at concurrency 1 and 1.6x at 8 than 2 threads sharing both cores with them)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def thread_counts(configured: int | None) -> tuple[int, int]:
    """(decode, all-cores) threads: `configured` (`--cpu-threads`) for both if given; else
    decode steps keep `default_threads()`, and prefills and the logits matmul (the whole
    vocabulary's weights, 56 MB for the demo) take every core, which the server barely uses
    meanwhile (the demo's 128-token prefill 190 -> 150 ms on 2 cores)."""
    if configured:
        return configured, configured
    return default_threads(), len(os.sched_getaffinity(0))


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's blocked layout, for `packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


#: Seconds of calls `_time` takes the best of: these timings are most of a CPU engine's load
#: (~0.9 s of the demo's 8 s start-up at 10 ms); the paths differ by 1.3-2x where it matters.
TIMING_WINDOW = 0.004


def _time(fn, x: torch.Tensor) -> float:
    """Seconds a call, the best of a few (`TIMING_WINDOW` of calls after a warm-up)."""
    fn(x)  # first call: oneDNN builds its primitive
    best = float("inf")
    end = time.perf_counter() + TIMING_WINDOW
    for _ in range(50):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
        if start > end:
            break
    return best


@torch.inference_mode()
def pack_if_faster(weights: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Each weight's packed copy, or None where `F.linear` is as fast (timed once per
    distinct shape and dtype, summed over `TIMED_ROWS`; packing must win by `MIN_GAIN`)."""
    faster: dict[tuple, bool] = {}
    out: list[torch.Tensor | None] = []
    for weight in weights:
        key = (*weight.shape, weight.dtype)
        packed = pack(weight) if faster.get(key, weight.dtype in PACKED_DTYPES) else None
        if key not in faster:
            faster[key] = packed is not None and _gain(weight, packed) >= MIN_GAIN
        out.append(packed if faster[key] else None)
    return out


#: Row counts at which `cpu_kernels.linear` is timed against the path `pack_if_faster` kept:
#: it streams the weight once for all rows, so it wins at one or two and loses at four.
FEW_ROWS = (1, 2, 4)


@torch.inference_mode()
def few_rows_limits(
    weights: list[torch.Tensor], packs: list[torch.Tensor | None], lib: ctypes.CDLL | None
) -> list[int]:
    """For each weight, the most rows up to which `cpu_kernels.linear` (bfloat16) beats the
    kept path by `MIN_GAIN` at every count of `FEW_ROWS` (0: never). Timed per shape over
    all the weights of that shape, as a step reads them: out of cache (one weight read
    again and again from cache flatters oneDNN's packed path, which costs more per call)."""
    groups: dict[tuple, list[int]] = {}
    for i, (weight, packed) in enumerate(zip(weights, packs, strict=True)):
        groups.setdefault((*weight.shape, weight.dtype, packed is not None), []).append(i)
    out = [0] * len(weights)
    for members in groups.values():
        group = [(weights[i], packs[i]) for i in members]
        weight = group[0][0]
        if lib is None or weight.dtype != torch.bfloat16 or not weight.is_contiguous():
            continue
        limit = _few_rows_limit(group, lib)
        for i in members:
            out[i] = limit
    return out


def _few_rows_limit(
    group: list[tuple[torch.Tensor, torch.Tensor | None]], lib: ctypes.CDLL
) -> int:
    def kept(x: torch.Tensor) -> None:
        for weight, packed in group:
            packed_linear(x, packed, None) if packed is not None else F.linear(x, weight)

    def ours(x: torch.Tensor) -> None:
        for weight, _ in group:
            cpu_kernels.linear(lib, x, weight, None)

    shape, limit = tuple(group[0][0].shape), 0
    for rows in FEW_ROWS:
        x = torch.randn(rows, shape[1], dtype=torch.bfloat16)
        kept_s, ours_s = _time(kept, x), _time(ours, x)
        log.debug("linears %s x%d at %d rows: kept path %.1f us, C %.1f us", shape,
                  len(group), rows, kept_s * 1e6, ours_s * 1e6)  # fmt: skip
        if kept_s < MIN_GAIN * ours_s:
            break
        limit = rows
    return limit


def _gain(weight: torch.Tensor, packed: torch.Tensor) -> float:
    """F.linear's time over the packed path's."""
    plain = fast = 0.0
    for rows in TIMED_ROWS:
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
        plain += _time(lambda x: F.linear(x, weight), x)
        fast += _time(lambda x: packed_linear(x, packed, None), x)
    log.debug("linear %s: F.linear %.1f us, packed %.1f us",
              tuple(weight.shape), plain * 1e6, fast * 1e6)  # fmt: skip
    return plain / fast
