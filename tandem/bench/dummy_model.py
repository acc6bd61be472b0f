"""Model folders with no weights: `config.json` plus a synthetic tokenizer.

For benchmarks that load random weights (`load_format="dummy"`, `tandem serve --load-format
dummy`): the engine needs only the shape, the frontend needs a tokenizer with the model's
vocabulary. The tokenizer is a word-level one over synthetic tokens `t0`, `t1`, ... (one per
id), split on whitespace and decoded by joining with spaces, so any id decodes and a prompt of
N words is N tokens. The top ids carry Llama-3-style special tokens (begin/end of text, end of
turn) when the vocabulary is large enough.

    from tandem.bench.dummy_model import write_model_folder
    folder = write_model_folder("/tmp/llama8b", "llama-3.1-8b")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_LLAMA_31_8B: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}

_TINY: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 8192,
    "max_position_embeddings": 16384,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 2048,
    },
}

SHAPES: dict[str, dict[str, Any]] = {"llama-3.1-8b": _LLAMA_31_8B, "tiny": _TINY}
"""Model shapes by name: Llama-3.1-8B, and a few-MB one for smoke tests on a CPU."""

CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] + ' ' }}{% endfor %}"
"""The messages' contents, one after the other: the tokens are synthetic anyway."""

NUM_SPECIAL = 256  # Llama 3: ids 128000..128255 are special (128256 - 256)


def special_ids(vocab_size: int) -> dict[str, int]:
    """Ids of the special tokens: bos, eos (end of text) and eot (end of turn)."""
    if vocab_size < 2 * NUM_SPECIAL:
        return {"bos": vocab_size - 3, "eos": vocab_size - 2, "eot": vocab_size - 1}
    base = vocab_size - NUM_SPECIAL
    return {"bos": base, "eos": base + 1, "eot": base + 9}


def model_config(shape: str) -> dict[str, Any]:
    """The `config.json` contents of a Llama-family model of the named shape (bf16)."""
    try:
        dims = SHAPES[shape]
    except KeyError:
        raise ValueError(f"unknown model shape {shape!r}: choose from {sorted(SHAPES)}") from None
    ids = special_ids(dims["vocab_size"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **dims,
        "head_dim": dims["hidden_size"] // dims["num_attention_heads"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
    }


def num_parameters(config: dict[str, Any]) -> dict[str, int]:
    """Parameter counts of a Llama config: embedding, the layers, final norm, lm_head."""
    h = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv = config["num_key_value_heads"]
    d = config.get("head_dim") or h // heads
    inter = config["intermediate_size"]
    vocab = config["vocab_size"]
    attn = h * heads * d + 2 * h * kv * d + heads * d * h  # q, k, v, o
    mlp = 3 * h * inter  # gate, up, down
    layer = attn + mlp + 2 * h  # two RMSNorms
    counts = {
        "embedding": vocab * h,
        "layers": config["num_hidden_layers"] * layer,
        "final_norm": h,
        "lm_head": 0 if config.get("tie_word_embeddings") else vocab * h,
    }
    counts["total"] = sum(counts.values())
    return counts


def token_name(i: int, vocab_size: int) -> str:
    names = {v: k for k, v in special_ids(vocab_size).items()}
    special = {
        "bos": "<|begin_of_text|>",
        "eos": "<|end_of_text|>",
        "eot": "<|eot_id|>",
    }
    return special[names[i]] if i in names else f"t{i}"


def write_tokenizer(path: str | Path, vocab_size: int):
    """A word-level tokenizer with `vocab_size` entries, saved to `path` (save_pretrained)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = special_ids(vocab_size)
    vocab = {token_name(i, vocab_size): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: the tokenizers library then joins the tokens with spaces.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=token_name(ids["bos"], vocab_size),
        eos_token=token_name(ids["eos"], vocab_size),
        pad_token=token_name(ids["eos"], vocab_size),
        additional_special_tokens=[token_name(ids["eot"], vocab_size)],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def write_model_folder(path: str | Path, shape: str = "llama-3.1-8b") -> Path:
    """Write `config.json`, `generation_config.json` and the tokenizer of `shape` to `path`.

    No weights: load the folder with `load_format="dummy"` (random weights), or build a
    transformers model with `AutoModelForCausalLM.from_config`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model_config(shape)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    ids = special_ids(config["vocab_size"])
    generation = {"bos_token_id": ids["bos"], "eos_token_id": [ids["eos"], ids["eot"]]}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer(path, config["vocab_size"])
    return path


def check_tokenizer(path: str | Path, vocab_size: int) -> None:
    """Raise AssertionError unless AutoTokenizer loads `path` and round-trips the vocabulary's
    edges (first ids, the specials, the last id)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    assert len(tok) == vocab_size, f"tokenizer has {len(tok)} entries, expected {vocab_size}"
    probe = [0, 1, 2, 12345 % vocab_size, vocab_size - NUM_SPECIAL - 1, vocab_size - 1]
    for i in (*probe, *special_ids(vocab_size).values()):
        text = tok.decode([i])
        assert text == token_name(i, vocab_size), f"id {i} decodes to {text!r}"
    ids = [5, 17, vocab_size - 300]
    text = tok.decode(ids)
    assert tok.encode(text, add_special_tokens=False) == ids, f"{text!r} does not round-trip"
    assert tok.eos_token_id == special_ids(vocab_size)["eos"]
    tok.apply_chat_template([{"role": "user", "content": "t1 t2"}], tokenize=False)
