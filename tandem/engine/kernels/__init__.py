"""Triton kernels of the GPU path: paged attention, KV store, fused layer pieces.

Each kernel has a torch twin that the tests compare it with; on a CPU they run under
Triton's interpreter (`TRITON_INTERPRET=1`), which is how CI checks them.
"""
