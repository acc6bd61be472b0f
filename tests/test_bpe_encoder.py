"""The tiktoken prompt encoder against Hugging Face's: the same ids on random text for the
demo model's tokenizer, a GPT-2-style and a Llama-3-style one; other shapes are not taken."""

from __future__ import annotations

import importlib.util
import os
import random

import pytest
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from tandem.engine import model_source
from tandem.engine.testing import make_tokenizer
from tandem.frontend.bpe_encoder import bpe_encoder
from tandem.frontend.preprocess import Preprocessor

#: Llama 3's pre-tokenizer regex.
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
          r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
ALPHABET = ("abcdefghijklmnopqrstuvwxyz ABCXYZ 0123456789 \n\t  .,;:'\"!?-_()[]{}<>/\\@#$%^&*+=~`|"
            "éèàüößçñ 漢字かなカナ 한국어 Привет 😀🚀\u00a0\u2003\r\x04\U00050000")  # fmt: skip
CORPUS = [
    "The quick brown fox jumps over the lazy dog; it's 12:30 and they'll say 1234567.",
    "def main():\n    return {'key': [1, 2, 3]}  # a comment\n\n",
    "Straße, naïve café, 漢字かなカナ, 한국어, Привет мир! 😀🚀",
] * 20


def texts(tokenizer, n: int = 600, seed: int = 0) -> list[str]:
    """Random characters, and runs of the vocabulary's own pieces (words it merges whole)."""
    rng = random.Random(seed)
    pieces = [tokenizer.decode([i]) for i in range(0, len(tokenizer), 3)]
    out = []
    for k in range(n):
        source = ALPHABET if k % 2 else pieces
        out.append("".join(rng.choice(source) for _ in range(rng.randint(1, 120))))
    return out


def assert_same_ids(tokenizer) -> None:
    encode = bpe_encoder(tokenizer)
    assert encode is not None, "the tokenizer should convert"
    for text in texts(tokenizer):
        for special in (False, True):
            want = tokenizer.encode(text, add_special_tokens=special)
            assert encode(text, special) == want, repr(text)


def trained(pre, *, ignore_merges: bool = False, normalizer=None, post=None, byte_fallback=False):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges, byte_fallback=byte_fallback))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "<|eot|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    if post is not None:
        tok.post_processor = post
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|eot|>")


def llama3_pre():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip


def test_the_test_models_tokenizer_converts(tmp_path) -> None:
    assert_same_ids(make_tokenizer(tmp_path))


def test_a_llama3_style_tokenizer_with_bos_converts() -> None:
    bos = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = trained(llama3_pre(), ignore_merges=True, post=bos)
    assert tokenizer.encode("hi")[0] == 0
    assert_same_ids(tokenizer)


@pytest.mark.skipif(
    importlib.util.find_spec(model_source.DEMO_MODULE) is None and os.environ.get("CI") != "true",
    reason=f"demo model not installed ({model_source.DEMO_INSTALL})",
)
def test_the_demo_models_tokenizer_converts() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_source.resolve_model(None, need_weights=False))
    assert_same_ids(tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there!"}],
                                           tokenize=False, add_generation_prompt=True)
    assert Preprocessor(tokenizer, 2048).encode(prompt, False) == tokenizer.encode(
        prompt, add_special_tokens=False
    )


@pytest.mark.parametrize("shape", ["normalizer", "byte_fallback", "metaspace", "lstrip"])
def test_other_shapes_keep_hugging_faces_encoder(shape: str) -> None:
    """Preprocessor then encodes with the tokenizer itself, ids as before."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if shape == "normalizer":
        tokenizer = trained(byte_level, normalizer=normalizers.NFC())
    elif shape == "byte_fallback":
        tokenizer = trained(byte_level, byte_fallback=True)
    elif shape == "metaspace":
        tokenizer = trained(pre_tokenizers.Metaspace())
    else:
        from tokenizers import AddedToken

        tokenizer = trained(byte_level)
        tokenizer.add_tokens([AddedToken("<mask>", lstrip=True)])
    assert bpe_encoder(tokenizer) is None
    text = "Hello <mask> world 123"
    assert Preprocessor(tokenizer, 2048).encode(text) == tokenizer.encode(text)
