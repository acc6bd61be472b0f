"""Every message that crosses a process boundary, as msgspec Structs (msgpack on the wire).

This package depends on nothing else in Tandem, so every other package may import it.
"""

from tandem.protocol.events import (
    KvBlock,
    KvCleared,
    KvEvent,
    KvRemoved,
    KvSnapshot,
    KvStored,
    LoadStats,
    Tier,
)
from tandem.protocol.generate import (
    FinishReason,
    GenerateOutput,
    GenerateRequest,
    SamplingParams,
    TokenLogprob,
    coalesce,
    merge_output,
)
from tandem.protocol.hashing import block_hashes, lora_seed
from tandem.protocol.transfer import KvLayout, KvTransferParams

__all__ = [
    "FinishReason",
    "GenerateOutput",
    "GenerateRequest",
    "KvBlock",
    "KvCleared",
    "KvEvent",
    "KvLayout",
    "KvRemoved",
    "KvSnapshot",
    "KvStored",
    "KvTransferParams",
    "LoadStats",
    "SamplingParams",
    "Tier",
    "TokenLogprob",
    "block_hashes",
    "coalesce",
    "lora_seed",
    "merge_output",
]
