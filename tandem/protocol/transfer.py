"""What crosses process boundaries when a prefill worker hands a request's KV cache to a decode
worker: the cache's geometry, the descriptor of an exported request's blocks, and the pull and
release messages of the host/TCP transport (served beside `generate` on the request plane)."""

from __future__ import annotations

from typing import Any

import msgspec

#: Request-plane endpoints of a prefill worker.
KV_PULL_ENDPOINT = "kv_pull"
KV_RELEASE_ENDPOINT = "kv_release"
#: Confirms an export is still held (its deadline pushed back) and lists its blocks: what a
#: CUDA IPC pull, which reads the blocks in place, checks before copying.
KV_TOUCH_ENDPOINT = "kv_touch"

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class KvLayout(msgspec.Struct, kw_only=True, frozen=True):
    """The geometry of a worker's paged KV cache. Two workers can exchange blocks only if their
    layouts are equal: the bytes of a block mean the same thing on both sides.

    `layout` names the axes of the K cache and of the V cache (two separate tensors).
    """

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # float32 | bfloat16 | float16
    layout: str = "layer,block,token,kv_head,head_dim"

    @property
    def layer_block_bytes(self) -> int:
        """Bytes of K (or of V) of one block in one layer."""
        return self.block_size * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block, K and V over every layer: what a transfer moves per block."""
        return 2 * self.num_layers * self.layer_block_bytes

    def mismatch(self, other: KvLayout) -> str | None:
        """Why blocks of `other` cannot be copied into a cache of this layout, or None."""
        for name in self.__struct_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"KV cache {name} differs: {theirs!r} on the source, {mine!r} here"
        return None


class CudaIpcHandle(msgspec.Struct, kw_only=True, frozen=True):
    """A CUDA allocation shared with other processes of the same node (cudaIpcGetMemHandle):
    what `torch.UntypedStorage._new_shared_cuda` needs to map it, as plain fields."""

    device: int
    handle: bytes
    storage_size: int
    storage_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


class CudaIpcCache(msgspec.Struct, kw_only=True, frozen=True):
    """A prefill worker's K and V caches, mappable from another process on the same GPU node.
    `node` tells whether the mapper is on that node (the boot id of its kernel)."""

    node: str
    device_uuid: str
    shape: list[int]  # [layers, blocks, block_size, kv_heads, head_dim]
    k: CudaIpcHandle
    v: CudaIpcHandle


class NixlCache(msgspec.Struct, kw_only=True, frozen=True):
    """A worker's K and V caches as its NIXL agent registered them: what another agent needs
    to read blocks straight out of them (`metadata` carries the agent's transport addresses
    and memory keys). Block `b` of layer `l` starts `(l * num_blocks + b)` layer-blocks into
    `k_addr` (or `v_addr`)."""

    agent: str
    metadata: bytes
    mem_type: str  # DRAM | VRAM
    device: int
    k_addr: int
    v_addr: int
    num_blocks: int


class KvTransferParams(msgspec.Struct, kw_only=True):
    """An exported request's KV: the prefill worker returns it with the first token, the
    frontend passes it to the decode worker, which pulls the blocks and then releases them.

    `block_ids` are slots in the prefill worker's cache, in sequence order, covering
    `num_tokens` tokens (the prompt). `token_ids` are the tokens already sampled (the first
    one); `rng_state` is the seeded sampler's state after them, so that a seeded request
    samples on the decode worker exactly what it would have sampled in one place.

    `cuda_ipc` and `nixl`: how else than TCP the prefill worker's cache can be read, set by
    the prefill worker and checked by the decode worker against the card it registered.

    `connector`: set instead when the engines move KV themselves (vLLM workers: their
    connector's `kv_transfer_params`, passed to the decode worker unread); `block_ids` and
    `token_ids` are then empty and `layout` None, and the decode worker generates from the
    first token on.
    """

    request_id: str
    block_ids: list[int]
    num_tokens: int
    layout: KvLayout | None = None
    token_ids: list[int] = msgspec.field(default_factory=list)
    rng_state: bytes | None = None
    expires_in: float = 30.0  # seconds the prefill worker holds the blocks after export
    worker_id: str = ""  # the prefill worker, and where its kv_pull / kv_release are served
    address: str = ""
    cuda_ipc: CudaIpcCache | None = None
    nixl: NixlCache | None = None
    connector: dict[str, Any] | None = None


class KvPullRequest(msgspec.Struct, kw_only=True):
    """Ask a prefill worker for the blocks at `indices` of an exported request's `block_ids`."""

    request_id: str
    indices: list[int]


class KvChunk(msgspec.Struct, kw_only=True, array_like=True):
    """K and V of blocks `indices[first : first + count]` of a pull, in one layer, as raw bytes
    in the layout's dtype ([count, block_size, kv_heads, head_dim] each). Decoded as views into
    the received frame, so that the receiver copies them once, into their place."""

    layer: int
    first: int
    count: int
    k: memoryview
    v: memoryview


class KvReleaseRequest(msgspec.Struct, kw_only=True):
    request_id: str


class KvHeld(msgspec.Struct, kw_only=True):
    """The blocks an export holds, in the prefill worker's cache."""

    block_ids: list[int]


class KvReleased(msgspec.Struct, kw_only=True):
    """How many blocks the release freed (0: already released or expired)."""

    blocks: int
