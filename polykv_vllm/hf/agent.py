"""Agents that answer questions about a shared compressed document: :func:`create_agents`.

An :class:`Agent` holds no KV of the document: each :meth:`Agent.generate` builds a fresh
:class:`~polykv_vllm.hf.cache.SharedPrefixCache` over the pool, so the document's K/V is decoded
layer by layer on demand and only the agent's suffix is kept. Agents of one pool can run
concurrently in threads (the pool is read-only; each generation has its own cache).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from polykv_vllm.hf.cache import DEFAULT_CHUNK_TOKENS, SharedPrefixCache
from polykv_vllm.hf.layout import ModelLayout, same_weights, weight_sample
from polykv_vllm.hf.pool import SharedPool

__all__ = [
    "Agent",
    "create_agents",
    "generate_uncompressed",
    "generate_uncompressed_ids",
    "prompt_ids",
]

logger = logging.getLogger(__name__)


class Agent:
    """One reader of a :class:`SharedPool`.

    ``last_cache`` is the cache of the latest generation (suffix K/V only), kept for inspection;
    ``peak_bytes`` is the largest working memory measured over this agent's generations.
    """

    def __init__(
        self,
        pool: SharedPool,
        model: Any,
        tokenizer: Any,
        name: str = "agent",
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        _check_model_matches(pool, model)
        self.pool = pool
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.chunk_tokens = chunk_tokens
        self.last_cache: SharedPrefixCache | None = None
        self.peak_bytes = 0

    def __repr__(self) -> str:
        return f"Agent(name={self.name!r}, pool_tokens={self.pool.num_tokens})"

    def prompt_ids(self, query: str) -> torch.Tensor:
        """The full input ids, int64 ``[1, prefix + suffix]``: the pool's ids then the query's."""
        return prompt_ids(self.pool, self.tokenizer, query)

    def generate(self, query: str, max_new_tokens: int = 128, **generate_kwargs: Any) -> str:
        """Answer ``query`` about the pool's document; returns the new text (special tokens
        skipped).

        When the pool was built with the tokenizer's chat template, the query is appended to the
        document inside the same user turn and the assistant turn is opened (see
        :mod:`polykv_vllm.hf.prompt`). Decoding is greedy (``do_sample=False``) unless
        ``generate_kwargs`` say otherwise; they are passed to ``model.generate``. Raises
        ``ValueError`` if prefix + query + ``max_new_tokens`` exceed ``max_position_embeddings``.
        """
        new_ids = self.generate_ids(query, max_new_tokens, **generate_kwargs)
        return str(self.tokenizer.decode(new_ids, skip_special_tokens=True))

    def generate_ids(
        self, query: str, max_new_tokens: int = 128, **generate_kwargs: Any
    ) -> list[int]:
        """Like :meth:`generate` but returns the new token ids (stop tokens included)."""
        input_ids = self.prompt_ids(query)
        _check_max_new_tokens(self.pool, input_ids, max_new_tokens)
        self.last_cache = None  # free the previous suffix before the new generation
        cache = SharedPrefixCache(self.pool, chunk_tokens=self.chunk_tokens)
        new_ids = _run_generate(
            self.model, self.tokenizer, input_ids, max_new_tokens, generate_kwargs, cache
        )
        self.last_cache = cache
        peak = cache.meter.peak_bytes
        self.peak_bytes = max(self.peak_bytes, peak)
        self.pool.record_agent_peak(peak, self.pool.layout.dtype)
        logger.debug(
            "%s: %s new tokens, peak working memory %s bytes", self.name, len(new_ids), peak
        )
        return new_ids


def create_agents(
    pool: SharedPool,
    model: Any,
    tokenizer: Any,
    n: int,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> list[Agent]:
    """``n`` agents named ``agent-0`` .. ``agent-{n-1}`` reading ``pool`` with ``model``.

    ``model`` must be the model (same layout and device) the pool was compressed with.
    """
    if not isinstance(pool, SharedPool):
        raise TypeError(f"pool must be a SharedPool from compress(), got {type(pool).__name__}.")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n={n!r} agents is invalid: use an integer >= 1.")
    return [Agent(pool, model, tokenizer, f"agent-{i}", chunk_tokens) for i in range(n)]


def prompt_ids(pool: SharedPool, tokenizer: Any, query: str) -> torch.Tensor:
    """int64 ``[1, prefix + suffix]`` on the pool's device: ``pool.token_ids`` + the query's."""
    suffix = pool.prompt.suffix_ids(tokenizer, query)
    ids = torch.cat([pool.token_ids, torch.tensor(suffix, dtype=torch.int64)])
    return ids.unsqueeze(0).to(pool.layout.device)


def generate_uncompressed(
    pool: SharedPool, model: Any, tokenizer: Any, query: str, max_new_tokens: int = 128, **kw: Any
) -> str:
    """The baseline: the same ids as :meth:`Agent.generate`, with the plain model and its own
    full-precision cache of the document (prefilled from ``pool.token_ids``)."""
    new_ids = generate_uncompressed_ids(pool, model, tokenizer, query, max_new_tokens, **kw)
    return str(tokenizer.decode(new_ids, skip_special_tokens=True))


def generate_uncompressed_ids(
    pool: SharedPool, model: Any, tokenizer: Any, query: str, max_new_tokens: int = 128, **kw: Any
) -> list[int]:
    """Like :func:`generate_uncompressed` but returns the new token ids."""
    input_ids = prompt_ids(pool, tokenizer, query)
    _check_max_new_tokens(pool, input_ids, max_new_tokens)
    return _run_generate(model, tokenizer, input_ids, max_new_tokens, kw, cache=None)


def _run_generate(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    generate_kwargs: dict[str, Any],
    cache: SharedPrefixCache | None,
) -> list[int]:
    kwargs: dict[str, Any] = {"do_sample": False}
    if getattr(tokenizer, "pad_token_id", None) is None:
        kwargs["pad_token_id"] = getattr(tokenizer, "eos_token_id", None)
    kwargs.update(generate_kwargs)
    if cache is not None:
        kwargs["past_key_values"] = cache
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            **kwargs,
        )
    return [int(i) for i in out[0, input_ids.shape[1] :]]


def _check_max_new_tokens(pool: SharedPool, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: use an integer >= 1.")
    prompt = int(input_ids.shape[1])
    pool.layout.check_positions(
        prompt + max_new_tokens,
        f"the document ({pool.num_tokens} tokens) + query ({prompt - pool.num_tokens} tokens) + "
        f"max_new_tokens={max_new_tokens}",
        "lower max_new_tokens or shorten the query or document.",
    )


def _check_model_matches(pool: SharedPool, model: Any) -> None:
    if not isinstance(pool, SharedPool):
        raise TypeError(f"pool must be a SharedPool from compress(), got {type(pool).__name__}.")
    layout = ModelLayout.from_model(model)
    want = pool.layout
    fields = ("num_layers", "kv_heads", "head_dim", "device")
    for name in fields:
        if getattr(layout, name) != getattr(want, name):
            raise ValueError(
                f"model {name}={getattr(layout, name)} but the pool was compressed with {name}="
                f"{getattr(want, name)}: use the same model (and device) as compress()."
            )
    sample = weight_sample(model) if pool.weights is not None else None
    if sample is not None and pool.weights is not None and not same_weights(pool.weights, sample):
        raise ValueError(
            f"model {type(model).__name__} (model_type={layout.model_type!r}) has the pool's "
            "shape but other weights (its input embeddings differ from those compress() saw): "
            "use the model the pool was compressed with (a dtype cast of it is allowed)."
        )
