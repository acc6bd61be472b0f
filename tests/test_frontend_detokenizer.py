"""Incremental detokenisation and stop strings, with a real byte-level BPE tokenizer.

The tokenizer (from `tandem.engine.testing`) has only a few hundred tokens, so CJK characters
and emoji are split into single bytes or merged across character boundaries: exactly the
cases where decoding token by token goes wrong.
"""

from __future__ import annotations

import random

import pytest

from tandem.engine.testing import make_tokenizer
from tandem.frontend.detokenizer import REPLACEMENT, IncrementalDetokenizer, StopStringMatcher

MULTIBYTE = [
    "héllo wörld ñandú café",
    "東京 大阪 日本語 😀 🚀",
    "naïve façade; 東京",
    "a😀b🚀c",
    "日本語日本語 東京😀😀🚀 — done",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def stream(tokenizer, ids, prompt=(), chunk=1):
    d = IncrementalDetokenizer(tokenizer, list(prompt))
    deltas = [d.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(d.flush())
    return deltas


@pytest.mark.parametrize("text", MULTIBYTE)
def test_multibyte_characters_are_never_split(tokenizer, text):
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.encode()) // 4  # really split into byte-ish pieces
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == text
    assert not any(REPLACEMENT in d for d in deltas), deltas


def test_characters_split_over_tokens_wait_for_their_last_byte(tokenizer):
    # 😀 is 4 bytes; with this tokenizer it takes several tokens.
    ids = tokenizer.encode("a😀")
    assert len(ids) >= 3
    d = IncrementalDetokenizer(tokenizer, [])
    first = d.push(ids[:1])
    middle = [d.push([t]) for t in ids[1:-1]]
    last = d.push(ids[-1:])
    assert first == "a"
    assert middle == [""] * len(middle)
    assert last == "😀"


def test_prompt_context_does_not_leak_into_output(tokenizer):
    prompt = tokenizer.encode("Paris is the capital of")
    ids = tokenizer.encode(" France. Berlin")
    assert "".join(stream(tokenizer, ids, prompt)) == " France. Berlin"


def test_random_tokens_match_a_full_decode(tokenizer):
    """Invalid byte sequences (a random model's output) still reproduce decode() exactly."""
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(300):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 8))]
        ids = [rng.randrange(0, vocab) for _ in range(rng.randrange(1, 25))]
        context = prompt[-5:]
        full = tokenizer.decode(context + ids, skip_special_tokens=True)
        head = tokenizer.decode(context, skip_special_tokens=True)
        if not full.startswith(head):
            continue  # the prompt itself ends inside a character
        deltas = stream(tokenizer, ids, prompt, chunk=rng.randrange(1, 3))
        assert "".join(deltas) == full[len(head) :]


def test_special_tokens_are_skipped(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*tokenizer.encode("Hello"), eos]
    assert "".join(stream(tokenizer, ids)) == "Hello"


def released_prefixes(matcher, pieces):
    out, seen = "", []
    for p in pieces:
        out += matcher.push(p)
        seen.append(out)
    return out, seen


def test_stop_string_spread_over_many_pieces_never_leaks():
    m = StopStringMatcher(["capital of"])
    pieces = ["Paris is the ", "ca", "p", "ital", " o", "f France"]
    out, seen = released_prefixes(m, pieces)
    assert m.stopped and m.matched == "capital of"
    assert out == "Paris is the "
    assert all("Paris is the ".startswith(s) for s in seen)
    assert m.push("more") == "" and m.flush() == ""


def test_held_text_is_released_when_the_stop_string_does_not_complete():
    m = StopStringMatcher(["capital of Germany"])
    out, seen = released_prefixes(m, ["Paris is the capit", "al of Fr", "ance."])
    assert seen[0] == "Paris is the "  # "capit" could start the stop string
    assert seen[1] == "Paris is the capital of Fr"
    assert not m.stopped
    assert out + m.flush() == "Paris is the capital of France."


def test_earliest_of_several_stop_strings_wins():
    m = StopStringMatcher(["France", "capital", "xyz"])
    out, _ = released_prefixes(m, ["Paris is the capital of France"])
    assert out == "Paris is the " and m.matched == "capital"


def test_flush_releases_a_partial_match_at_the_end():
    m = StopStringMatcher(["</answer>"])
    out, _ = released_prefixes(m, ["42 </ans"])
    assert out == "42 "
    assert m.flush() == "</ans"


def test_no_stop_strings_passes_text_through():
    m = StopStringMatcher(["", ""])
    assert not m.active
    assert m.push("abc") == "abc"


def test_stop_string_made_of_byte_tokens(tokenizer):
    """A multi-byte stop string across byte tokens: text before it, nothing of it."""
    text = "naïve 東京 café"
    ids = tokenizer.encode(text)
    d = IncrementalDetokenizer(tokenizer, [])
    m = StopStringMatcher(["東京"])
    released = []
    for t in ids:
        released.append(m.push(d.push([t])))
        if m.stopped:
            break
    assert m.stopped
    assert "".join(released) == "naïve "
    assert not any(REPLACEMENT in r or "東" in r for r in released)
