"""Keeping a server's start-up heap out of the garbage collector's way.

A Tandem process starts by creating hundreds of thousands of objects that live as long as it
does (torch, transformers, FastAPI, the tokenizer, the model's modules). Python's collections
of the oldest generation walk every one of them: in the frontend and the workers of
`benchmarks/overload.py` (370-440k objects each) a 250-400 ms pause every 15-20 s, which every
request in flight waited through; the tail of its time to first token was made of them.
`gc.freeze()` moves what exists once the process is ready into a permanent generation that
collections skip.
"""

from __future__ import annotations

import atexit
import gc


def freeze_startup_heap() -> None:
    """Call when the process is ready to serve: what start-up left as garbage is collected
    first, the rest is not scanned again until the process exits (then it is given back,
    so that exit frees it as it would have: extension modules check for leaks then)."""
    gc.collect()
    gc.freeze()
    atexit.unregister(gc.unfreeze)
    atexit.register(gc.unfreeze)
