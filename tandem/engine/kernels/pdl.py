"""Programmatic dependent launch (PDL, Hopper and later) for the engine's Triton kernels.

A decode step is ~180 kernels back to back; between two of them the GPU drains one grid and
fills the next, a microsecond or two of idle SMs each time. Launched with PDL, a kernel's
programs may start while the kernel before it is still finishing: each one first waits
(`griddepcontrol.wait`) until everything before it is complete and visible, and then signals
that the kernel after it may start too. So every memory access still happens in stream
order; only the launch and the wave's start-up overlap the previous kernel's tail.

Kernels take a `PDL: tl.constexpr` and call `pdl_prologue(PDL)` before touching memory;
launchers pass `**launch_options(tensor)`.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a CPU-only install (or a Triton without grid dependency control)
    triton = None


def _pdl_prologue(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


pdl_prologue = triton.jit(_pdl_prologue) if triton is not None else _pdl_prologue


def launch_options(x: torch.Tensor) -> dict:
    """`PDL=` and `launch_pdl=` for a launch on x's device: on where the GPU and Triton can."""
    on = x.is_cuda and _supported(x.device.index or 0)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@functools.cache
def _supported(device: int) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1" or triton is None:
        return False
    from triton.backends.nvidia.compiler import CUDAOptions

    has_option = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
    return has_option and torch.cuda.get_device_capability(device)[0] >= 9
