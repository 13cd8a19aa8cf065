"""polykv_vllm: a shared compressed prefix cache for vLLM, with a HuggingFace fallback.

Layers, each importing only what it needs:

- :mod:`polykv_vllm.core` — the codec (torch only).
- :mod:`polykv_vllm.hf` — the transformers ``Cache`` fallback (``compress``, ``create_agents``).
- :mod:`polykv_vllm.connector` — the vLLM KV connector and the ``--kv-cache-plugin`` flag.

Importing this package imports nothing heavy; the names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["KVCodec", "compress", "create_agents"]

_LAZY = {
    "KVCodec": "polykv_vllm.core",
    "compress": "polykv_vllm.hf",
    "create_agents": "polykv_vllm.hf",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'polykv_vllm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
