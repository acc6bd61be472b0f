"""Llama-3.1-8B shape in bfloat16 on a GPU: the Triton path (fused kernels, paged attention,
CUDA graphs) against the torch reference path on the same random weights.

Teacher-forced: the reference computes the logits of every generated position in one pass
over prompt + output, so one disagreement does not derail the rest of the comparison.
"""

from __future__ import annotations

import pytest
import torch

from tandem.bench.dummy_model import write_model_folder
from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.engine.scheduler import ScheduledBatch
from tandem.engine.sequence import Sequence
from tandem.protocol import GenerateRequest, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BATCH, PROMPT, STEPS = 64, 128, 256


def engine(folder, backend: str) -> EngineCore:
    return EngineCore(
        EngineConfig(
            model=str(folder),
            device="cuda",
            dtype="bfloat16",
            load_format="dummy",
            attention_backend=backend,
            enforce_eager=backend == "torch",
            kv_cache_memory_gb=8,
            max_num_seqs=BATCH,
            max_num_batched_tokens=8192,
            max_model_len=1024,
            enable_prefix_caching=False,
        )
    )


def test_top1_agreement_with_torch_reference(tmp_path):
    folder = write_model_folder(tmp_path / "llama8b", "llama-3.1-8b")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128000, (PROMPT,), generator=g).tolist() for _ in range(BATCH)]
    fast = engine(folder, "triton")
    for i, p in enumerate(prompts):
        fast.add_request(
            GenerateRequest(
                request_id=str(i),
                prompt_token_ids=p,
                sampling=SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True),
            )
        )
    outputs: dict[str, list[int]] = {str(i): [] for i in range(BATCH)}
    while fast.has_work():
        for out in fast.step():
            outputs[out.request_id] += out.token_ids
    del fast
    torch.cuda.empty_cache()
    ref = engine(folder, "torch")
    agree = total = 0
    for i, p in enumerate(prompts):
        tokens = outputs[str(i)]
        assert len(tokens) == STEPS
        seq = Sequence(str(i), 0, p + tokens[:-1], SamplingParams())
        assert ref.block_manager.allocate(seq, seq.num_tokens)
        logits = ref.runner.all_logits(ScheduledBatch([seq], [seq.num_tokens]))
        ref.block_manager.free_seq(seq)
        expected = logits[PROMPT - 1 :].argmax(dim=-1).tolist()
        agree += sum(a == b for a, b in zip(expected, tokens, strict=True))
        total += STEPS
    rate = agree / total
    print(f"top-1 agreement {rate:.4f} over {total} decode positions")
    assert rate >= 0.99
