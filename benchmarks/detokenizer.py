"""CPU per streamed token of the frontend's incremental detokenizer, on the demo tokenizer.

Streams 200 64-token continuations of mixed-script text (ASCII, accents, CJK, emoji) through
`IncrementalDetokenizer` one token at a time, as the frontend does, and prints microseconds a
token (setup per request included), best of 5. Writes results/detokenizer.json.

    python benchmarks/detokenizer.py [--model DIR]

For scale: the Python windowed decoder it replaced (vLLM's algorithm, Tandem before #13) ran
the same streams at 5.4-8.1 us a token against 1.05-1.09 for `DecodeStream`, in one run on
this 2-core machine, with the same text for every stream.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from transformers import AutoTokenizer

from tandem.engine.model_source import resolve_model
from tandem.frontend.detokenizer import IncrementalDetokenizer

TEXT = "Here is a story about café, naïve 日本語, emoji 🎉🚀 and plain ascii words. " * 40


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="folder with tokenizer files (default: the demo model)")
    p.add_argument("--output", type=Path, default=Path("results/detokenizer.json"))
    args = p.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model or resolve_model(None, need_weights=False))
    ids = tokenizer(TEXT)["input_ids"]
    streams = [(ids[i - 20 : i], ids[i : i + 64]) for i in range(20, len(ids) - 64, 7)][:200]
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for prompt, tokens in streams:
            detok = IncrementalDetokenizer(tokenizer, prompt)
            for token in tokens:
                detok.push([token])
            detok.flush()
        best = min(best, time.perf_counter() - start)
    n = sum(len(tokens) for _, tokens in streams)
    result = {"streams": len(streams), "tokens": n, "us_per_token": best / n * 1e6}
    print(f"{len(streams)} streams, {n} tokens: {result['us_per_token']:.2f} us a token")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
