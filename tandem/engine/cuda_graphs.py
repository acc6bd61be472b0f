"""CUDA graphs of the model's forward pass for decode steps.

A decode step of an 8B model launches hundreds of small kernels; replaying them as one
captured graph removes the host from the loop. Graphs are captured at a ladder of batch
sizes, each once per split-K factor its attention may use, largest first so that smaller
ones reuse its memory pool; a step runs in the smallest graph that fits it, the rows
beyond its sequences padded (the backend makes padding rows store and read nothing).
Logits and sampling stay outside the graph.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch
from torch import nn

from tandem.engine.step_inputs import DeviceStep, StepInputs

log = logging.getLogger(__name__)


def graph_batch_sizes(max_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_seqs]
    sizes += range(16, max_seqs, 16)
    return [*sizes, max_seqs]


class DecodeGraphs:
    def __init__(self, model: nn.Module, backend, max_seqs: int, max_model_len: int) -> None:
        self.model = model
        self.backend = backend
        self.sizes = graph_batch_sizes(max_seqs)
        largest = self.sizes[-1]
        block_size = backend.k_cache.shape[2]
        backend.init_graphs(largest, -(-max_model_len // block_size))
        device = backend.k_cache.device
        self.input_ids = torch.zeros(largest, dtype=torch.int32, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int32, device=device)
        hidden_size = model.config.hidden_size
        self.hidden = torch.zeros(largest, hidden_size, dtype=backend.k_cache.dtype, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (batch, splits)
        started = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):
            for splits in reversed(backend.graph_split_factors(size, max_model_len)):
                meta = backend.graph_metadata(size, splits)
                self._forward(size, meta)  # compiles the kernels outside the capture
                graph = torch.cuda.CUDAGraph()
                # Thread-local: a KV tier's writer thread (or anything else in the process)
                # waiting on a CUDA event must not invalidate the capture; only this thread's
                # work goes into the graph either way.
                with torch.cuda.graph(graph, pool, capture_error_mode="thread_local"):
                    self._forward(size, meta)
                pool = graph.pool()
                self.graphs[size, splits] = graph
        torch.cuda.synchronize()
        log.info(
            "captured %d decode CUDA graphs (batch 1..%d) in %.1f s",
            len(self.graphs),
            largest,
            time.perf_counter() - started,
        )

    @torch.inference_mode()
    def _forward(self, size: int, meta) -> None:
        self.hidden[:size] = self.model(self.input_ids[:size], self.positions[:size], meta)

    def fits(self, step: StepInputs) -> bool:
        return step.max_query_len == 1 and step.num_seqs <= self.sizes[-1]

    def run(self, step: StepInputs, dev: DeviceStep) -> torch.Tensor:
        """Hidden states [num_seqs, hidden] of a decode step."""
        n = step.num_seqs
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        graph = self.graphs[size, self.backend.graph_splits(size, step.max_seq_len)]
        self.input_ids[:n].copy_(dev.input_ids)
        self.positions[:n].copy_(dev.positions)
        self.backend.load_graph_step(dev, size)
        graph.replay()
        return self.hidden[:n]
