"""Turn a `.gguf` checkpoint into a Hugging Face folder (config, safetensors, tokenizer).

The engine loads only Hugging Face folders, so a GGUF file is converted once, up front:
`transformers` reads the GGUF metadata into a config and a tokenizer, and the `gguf`
package dequantises the weights to float32. The result is an ordinary checkpoint that
both our engine and `transformers` load, which is also what lets tests compare the two.
Converting costs a few seconds per hundred million parameters; `model_source` caches it.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

GGUF_MAGIC = b"GGUF"


class GgufConversionError(RuntimeError):
    """The file is not a GGUF checkpoint that transformers can turn into a dense model."""


def is_gguf_file(path: Path) -> bool:
    """True if the file starts with the GGUF magic: its name alone could lie."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Dequantise `gguf_path` into the Hugging Face folder `out_dir` and return it.

    `out_dir` receives config.json, generation_config.json, model.safetensors (sharded by
    transformers when large) and the tokenizer files with the GGUF's chat template.
    Writing happens in place: callers that need atomicity (`model_source`) pass a temp dir.
    With `progress`, stage lines and transformers' tensor bar go to stderr.
    """
    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if not is_gguf_file(gguf_path):
        raise GgufConversionError(f"{gguf_path} is not a GGUF file (no GGUF magic bytes)")

    say = _reporter(progress)
    start = time.monotonic()
    say(f"converting {gguf_path.name} → Hugging Face folder (one time)...")
    # transformers prints its own tqdm bar while dequantising; hide it when asked to be quiet.
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        say("[1/3] reading and dequantising weights")
        model = _load_dense_model(gguf_path)
        say("[2/3] writing config and safetensors")
        _save_model(model, out_dir)
        say("[3/3] writing tokenizer and chat template")
        _save_tokenizer(gguf_path, out_dir, model)
    say(f"converted in {time.monotonic() - start:.1f} s")
    return out_dir


def _reporter(progress: bool) -> Callable[[str], None]:
    def say(line: str) -> None:
        if progress:
            print(line, file=sys.stderr, flush=True)

    return say


def _load_dense_model(gguf_path: Path) -> torch.nn.Module:
    """Load the GGUF into a float32 transformers model with every weight unpacked.

    `dequantize=True` matters for architectures that transformers can keep in GGUF blocks
    (it would otherwise do so whenever the `kernels` package is installed); the Llama family
    always takes the dequantising path, and the check below holds either way.
    """
    from transformers import AutoModelForCausalLM, GgufConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent),
            gguf_file=gguf_path.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise GgufConversionError(f"transformers cannot load {gguf_path.name}: {exc}") from exc
    packed = [
        name for name, tensor in model.state_dict().items() if not torch.is_floating_point(tensor)
    ]
    if packed:
        raise GgufConversionError(
            f"{gguf_path.name}: weights still quantised after loading ({', '.join(packed[:3])}...)"
        )
    return model


def _save_model(model: torch.nn.Module, out_dir: Path) -> None:
    """Save as a plain float32 checkpoint: without the GGUF quantization config, which would
    make every later `from_pretrained` look for the .gguf file again.

    transformers 5 always writes safetensors, so there is no `safe_serialization` flag.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.config.dtype = torch.float32
    model.save_pretrained(str(out_dir))


def _save_tokenizer(gguf_path: Path, out_dir: Path, model: torch.nn.Module) -> None:
    """Save the tokenizer rebuilt from the GGUF metadata, keeping the chat template and
    making the stop tokens agree with the model's generation config."""
    from transformers import AutoTokenizer, GenerationConfig

    # transformers carries `tokenizer.chat_template` over; save_pretrained writes it to
    # chat_template.jinja, where AutoTokenizer and our frontend find it.
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))

    # Loading from GGUF skips generation_config.json, so derive it: stop on the model's eos
    # and on the tokenizer's (chat models end turns with it; the two can differ).
    eos: list[int] = []
    for token_id in (model.config.eos_token_id, tokenizer.eos_token_id):
        for t in token_id if isinstance(token_id, list) else [token_id]:
            if t is not None and t not in eos:
                eos.append(t)
    generation = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=(eos[0] if len(eos) == 1 else eos) if eos else None,
        pad_token_id=getattr(model.config, "pad_token_id", None),
    )
    generation.save_pretrained(str(out_dir))
