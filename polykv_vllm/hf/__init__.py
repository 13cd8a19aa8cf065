"""The HuggingFace fallback: the PolyKV prototype's API on transformers 5's public cache classes.

.. code-block:: python

    from polykv_vllm.hf import compress, create_agents

    pool = compress(model, tokenizer, document, preset="polykv")
    agents = create_agents(pool, model, tokenizer, n=4)
    print(agents[0].generate("What is this about?", max_new_tokens=64))
    print(pool.memory_summary(n_agents=4))

The pool holds the document's K/V compressed once (``polykv_vllm.core.KVCodec``); agents decode
it one layer at a time on demand and keep only their own suffix. Works on CPU, CUDA and MPS (the
device of the model). Importing this package imports torch and transformers.
"""

from polykv_vllm.hf.agent import (
    Agent,
    create_agents,
    generate_uncompressed,
    generate_uncompressed_ids,
    prompt_ids,
)
from polykv_vllm.hf.cache import MemoryMeter, SharedPrefixCache, SharedPrefixLayer
from polykv_vllm.hf.layout import ModelLayout, UnsupportedModelError
from polykv_vllm.hf.pool import MemorySummary, SharedPool, compress

__all__ = [
    "Agent",
    "MemoryMeter",
    "MemorySummary",
    "ModelLayout",
    "SharedPool",
    "SharedPrefixCache",
    "SharedPrefixLayer",
    "UnsupportedModelError",
    "compress",
    "create_agents",
    "generate_uncompressed",
    "generate_uncompressed_ids",
    "prompt_ids",
]
