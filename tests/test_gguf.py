"""GGUF → Hugging Face folder conversion, and the cache that `tandem serve x.gguf` uses.

The tiny GGUF files here are written with the `gguf` package the way llama.cpp's
convert_hf_to_gguf.py writes a Llama (permuted q/k rows, byte-level BPE vocabulary and
merges, control tokens, chat template), so the tests need no download and run in seconds.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from tandem.engine import model_source
from tandem.engine.gguf import GgufConversionError, convert_gguf
from tandem.engine.model_source import ModelSourceError, cache_folder_for, resolve_model
from tandem.engine.testing import make_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld 東京 😀",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary halves interleaved); transformers undoes it on load."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(src: Path, out: Path, quant: gguf.GGMLQuantizationType) -> None:
    """Write the transformers Llama in `src` (with tokenizer) as a GGUF file.

    Matrices are stored as `quant`, norms as F32, as llama.cpp does.
    """
    model = AutoModelForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    cfg = model.config
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)

    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    control = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types(
        [gguf.TokenType.CONTROL if i in control else gguf.TokenType.NORMAL for _, i in vocab]
    )
    merges = json.loads((src / "tokenizer.json").read_text())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        a = tensor.numpy()
        if name.endswith("q_proj.weight"):
            a = _permute(a, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        if a.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name, gguf.quants.quantize(a, quant), raw_dtype=quant)
        else:
            w.add_tensor(gguf_name, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Llama with default RoPE (GGUF has no field for llama3 scaling)."""
    src = tmp_path_factory.mktemp("tiny-src")
    tok = make_tokenizer(src)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(src)
    return src


@pytest.fixture(scope="module")
def tiny_gguf(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf"
    write_tiny_gguf(tiny_source, path, gguf.GGMLQuantizationType.Q8_0)
    return path


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_conversion_round_trips_weights(tiny_source: Path, tmp_path: Path, quant: str) -> None:
    gguf_path = tmp_path / f"tiny.{quant}.gguf"
    write_tiny_gguf(tiny_source, gguf_path, gguf.GGMLQuantizationType[quant])
    out = convert_gguf(gguf_path, tmp_path / "out", progress=False)

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    converted = AutoModelForCausalLM.from_pretrained(out).state_dict()
    via_transformers = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=gguf_path.name, dtype=torch.float32
    ).state_dict()
    original = AutoModelForCausalLM.from_pretrained(tiny_source).state_dict()
    assert converted.keys() == original.keys()
    for name, tensor in converted.items():
        assert torch.equal(tensor, via_transformers[name]), name
        if quant == "F32":
            assert torch.equal(tensor, original[name]), name
        else:  # Q8_0 keeps 8 bits per weight: error below half a step of the block scale
            torch.testing.assert_close(tensor, original[name], atol=0.01, rtol=0, msg=name)


def test_conversion_keeps_tokenizer_chat_template_and_eos(
    tiny_source: Path, tiny_gguf: Path, tmp_path: Path
) -> None:
    out = convert_gguf(tiny_gguf, tmp_path / "out", progress=False)
    original = AutoTokenizer.from_pretrained(tiny_source)
    converted = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert converted(text).input_ids == original(text).input_ids, text
        assert converted.decode(converted(text).input_ids) == text
    messages = [{"role": "user", "content": "hi"}]
    assert converted.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == original.eos_token_id
    assert converted.eos_token == "<|im_end|>"


def test_conversion_reports_progress(tiny_gguf: Path, tmp_path: Path, capsys) -> None:
    convert_gguf(tiny_gguf, tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "converting tiny.Q8_0.gguf" in err and "(one time)" in err
    assert "converted in" in err


def test_not_a_gguf_file_is_rejected(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(GgufConversionError, match="not a GGUF file"):
        convert_gguf(fake, tmp_path / "out", progress=False)
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        resolve_model(str(fake), cache_dir=tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache").iterdir())


def test_gguf_is_converted_once_then_reused(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    first = resolve_model(str(tiny_gguf), cache_dir=cache, progress=False)
    assert first.parent == cache and first.name.startswith("tiny.Q8_0-")
    assert (first / "config.json").is_file()

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr("tandem.engine.gguf.convert_gguf", no_second_conversion)
    assert resolve_model(str(tiny_gguf), cache_dir=cache, progress=False) == first
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temp folders left


def test_cache_env_variable(tiny_gguf: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "env-cache"))
    assert cache_folder_for(tiny_gguf).parent == tmp_path / "env-cache"


def test_interrupted_conversion_leaves_no_cache(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"

    def killed_halfway(gguf_path: Path, out_dir: Path, progress: bool = True) -> Path:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr("tandem.engine.gguf.convert_gguf", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(tiny_gguf), cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []


def test_temp_folder_of_a_dead_conversion_is_swept(tiny_gguf: Path, tmp_path: Path) -> None:
    """A SIGKILLed conversion cannot clean up; the next run removes its leftovers."""
    cache = tmp_path / "cache"
    target = cache_folder_for(tiny_gguf, cache)
    dead_pid = 2**22 + 1  # above Linux's pid_max default range: no such process
    leftover = cache / f".{target.name}{model_source._TMP_MARK}{dead_pid}-x"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    assert resolve_model(str(tiny_gguf), cache_dir=cache, progress=False) == target
    assert sorted(p.name for p in cache.iterdir()) == [target.name]


DEMO = importlib.util.find_spec(model_source.DEMO_MODULE)


@pytest.mark.skipif(DEMO is None, reason=f"demo model not installed ({model_source.DEMO_INSTALL})")
def test_demo_model_converts_and_answers(tmp_path: Path) -> None:
    """The real SmolLM2-135M-Instruct GGUF (Q4_1, 98 MB): about 25 s on 2 CPU cores."""
    out = resolve_model(None, cache_dir=tmp_path, progress=False)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
