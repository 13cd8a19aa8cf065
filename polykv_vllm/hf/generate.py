"""Answer many queries about one pool together: :func:`generate_batch` (``SharedPool.generate``).

The agents run in lockstep through :class:`~polykv_vllm.hf.batch.BatchedDecoder`: one prefill
of all queries, then one forward pass per new token for all agents that have not finished. An
agent finishes at its first stop token (kept in its answer, like ``Agent.generate_ids``) or at
``max_new_tokens``; finished agents leave the batch (with a CUDA graph they stay in it, their
tokens ignored: :mod:`polykv_vllm.hf.graph`). Greedy at ``temperature=0``, otherwise
sampling from ``softmax(logits / temperature)`` with a seeded generator.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from polykv_vllm.hf.agent import _check_model_matches
from polykv_vllm.hf.batch import BatchedDecoder
from polykv_vllm.hf.cache import DEFAULT_CHUNK_TOKENS
from polykv_vllm.hf.graph import resolve_cuda_graph
from polykv_vllm.hf.hydragen import resolve_backend
from polykv_vllm.hf.pool import SharedPool
from polykv_vllm.hf.prefix_decode import resolve_decode_backend

__all__ = ["CUDA_CHUNK_TOKENS", "DEFAULT_EOS", "generate_batch", "generate_batch_ids"]

logger = logging.getLogger(__name__)

#: ``eos_token_id`` default: the model's ``generation_config.eos_token_id`` (what
#: ``model.generate`` stops at), else the tokenizer's.
DEFAULT_EOS = "model"

#: ``chunk_tokens`` default on CUDA: prefixes up to this many tokens are decoded in one call.
CUDA_CHUNK_TOKENS = 8192

#: Runs of at least this many new tokens show a progress bar when ``progress=None``.
PROGRESS_MIN_TOKENS = 64


def generate_batch(
    pool: SharedPool, model: Any, tokenizer: Any, queries: Sequence[str], **kwargs: Any
) -> list[str]:
    """One answer per query (new text, special tokens skipped); see :func:`generate_batch_ids`."""
    ids = generate_batch_ids(pool, model, tokenizer, queries, **kwargs)
    return [str(tokenizer.decode(i, skip_special_tokens=True)) for i in ids]


def generate_batch_ids(
    pool: SharedPool,
    model: Any,
    tokenizer: Any,
    queries: Sequence[str],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    eos_token_id: int | Sequence[int] | str | None = DEFAULT_EOS,
    seed: int = 0,
    backend: str = "auto",
    chunk_tokens: int | None = None,
    progress: bool | None = None,
    keep_decoded: bool = False,
    decode_backend: str = "auto",
    cuda_graph: bool | str = "auto",
) -> list[list[int]]:
    """Decode all ``queries`` together over ``pool``; the new token ids of each, in order.

    ``model`` must be the model the pool was compressed with (same layout, same device).
    ``eos_token_id=None`` never stops early. ``backend`` is ``auto`` / ``torch`` / ``xformers``
    (:func:`~polykv_vllm.hf.hydragen.resolve_backend`). ``progress=None`` shows a bar (tqdm when
    installed, else log lines) for runs of at least ``PROGRESS_MIN_TOKENS`` new tokens. The
    measured peak is recorded in the pool (``pool.memory_summary(n).batched_peak_bytes``).
    ``chunk_tokens`` bounds the prefix tokens per codec call (None: ``DEFAULT_CHUNK_TOKENS``
    on CPU and MPS, ``CUDA_CHUNK_TOKENS`` on CUDA, where fewer, larger decodes launch fewer
    kernels; a prefix within one chunk is decoded straight into the working buffer).
    ``keep_decoded=True`` decodes each pool layer once for the whole run and keeps them all
    (faster when the codec's decode dominates, e.g. few agents on CPU; the document then costs
    every layer decoded, see :class:`~polykv_vllm.hf.batch.BatchedDecoder`); the default decodes
    one layer at a time at every step, the working buffer being one decoded layer.
    ``decode_backend`` is ``auto`` / ``torch`` / ``triton``: how that layer is decoded
    (:func:`~polykv_vllm.hf.prefix_decode.resolve_decode_backend`; ``auto`` is the Triton
    decode kernel for a bf16 / fp16 model on CUDA, two launches per layer into one buffer
    reused by every layer and step, and the torch codec elsewhere);
    ``memory_summary(n).batched_decode_backend`` records which one ran.
    ``cuda_graph`` is True / False / ``auto`` (True on CUDA, False elsewhere): capture one
    decoding step of all agents (every layer: prefix decode, attention, the model's own ops) in
    a CUDA graph after a warm-up step and replay it for every later step, removing the host's
    launch overhead (:mod:`polykv_vllm.hf.graph`). Finished agents then stay in the batch and
    their tokens are ignored (with sampling, their draws still use the generator, so sampled
    tokens differ from ``cuda_graph=False`` once an agent has finished). A capture that fails
    logs one warning and the call decodes eagerly;
    ``memory_summary(n).batched_cuda_graph`` records whether a graph ran. True off CUDA is an
    error; ``"static"`` runs the graph's static-shape step eagerly (any device; for tests).
    Raises ``ValueError`` for an empty query list, ``max_new_tokens < 1``, a negative
    temperature, a query that does not fit the context with the document, or another model.
    """
    if not isinstance(pool, SharedPool):
        raise TypeError(f"pool must be a SharedPool from compress(), got {type(pool).__name__}.")
    if isinstance(queries, str) or not isinstance(queries, Sequence):
        raise TypeError(
            f"queries must be a list of str, got {type(queries).__name__}: wrap a single query "
            "in a list."
        )
    if len(queries) == 0:
        raise ValueError("queries=[] is empty: pass at least one query string.")
    _check_int(max_new_tokens, "max_new_tokens")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(
            f"temperature={temperature!r} is invalid: use 0 (greedy) or a positive float."
        )
    if chunk_tokens is None:
        cuda = pool.layout.device.type == "cuda"
        chunk_tokens = CUDA_CHUNK_TOKENS if cuda else DEFAULT_CHUNK_TOKENS
    _check_int(chunk_tokens, "chunk_tokens")
    if not isinstance(keep_decoded, bool):
        raise ValueError(f"keep_decoded={keep_decoded!r} is invalid: use True or False.")
    mode = resolve_cuda_graph(cuda_graph, pool.layout.device)
    _check_model_matches(pool, model)
    suffixes = [pool.prompt.suffix_ids(tokenizer, q) for q in queries]
    for i, suffix in enumerate(suffixes):
        pool.layout.check_positions(
            pool.num_tokens + len(suffix) + max_new_tokens,
            f"queries[{i}] ({len(suffix)} tokens) with the document ({pool.num_tokens} tokens) "
            f"and max_new_tokens={max_new_tokens}",
            "lower max_new_tokens or shorten the query or document.",
        )
    stops = _stop_ids(model, tokenizer, eos_token_id)
    name = resolve_backend(backend, pool.layout.device)
    decode_name = resolve_decode_backend(decode_backend, pool.layout.device, _dtype(model))
    generator = torch.Generator(device=pool.layout.device).manual_seed(seed)
    outputs: list[list[int]] = [[] for _ in queries]
    rows = list(range(len(queries)))  # query index of each row of the decoder's batch
    done = [False] * len(queries)
    static = mode != "eager"  # the static batch keeps finished agents
    show = max_new_tokens >= PROGRESS_MIN_TOKENS if progress is None else progress
    with (
        BatchedDecoder(
            pool,
            model,
            name,
            chunk_tokens,
            keep_decoded,
            new_tokens=max_new_tokens - 1,
            decode_backend=decode_name,
            static=static,
            cuda_graph=mode == "graph",
        ) as decoder,
        _progress(max_new_tokens, len(queries), show) as tick,
    ):
        logits = decoder.prefill(suffixes)
        for step in range(max_new_tokens):
            tokens = _pick(logits, temperature, generator)
            for q, t in zip(rows, tokens.tolist(), strict=True):
                if not done[q]:
                    outputs[q].append(t)
                    done[q] = t in stops
            keep = [row for row, q in enumerate(rows) if not done[q]]
            tick(len(keep))
            if not keep or step == max_new_tokens - 1:
                break
            if not static and len(keep) < len(rows):
                index = torch.tensor(keep, dtype=torch.int64)
                decoder.keep(index)
                tokens = tokens.index_select(0, index.to(tokens.device))
                rows = [rows[r] for r in keep]
            logits = decoder.step(tokens)
    pool.record_batched_peak(
        len(queries),
        decoder.total_meter.peak_bytes,
        decoder.document_meter.peak_bytes,
        name,
        decode_name,
        decoder.cuda_graph_ran,
    )
    logger.debug(
        "%s agents, backend %s, decode %s, CUDA graph %s: %s new tokens, peak %s bytes "
        "(document %s)",
        len(queries),
        name,
        decode_name,
        decoder.cuda_graph_ran,
        sum(len(o) for o in outputs),
        decoder.total_meter.peak_bytes,
        decoder.document_meter.peak_bytes,
    )
    return outputs


def _dtype(model: Any) -> torch.dtype:
    """The dtype the model computes attention in (its parameters')."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(model.parameters()).dtype


def _check_int(value: object, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: use an integer >= 1.")


def _stop_ids(model: Any, tokenizer: Any, eos: int | Sequence[int] | str | None) -> set[int]:
    if eos is None:
        return set()
    if isinstance(eos, str):
        if eos != DEFAULT_EOS:
            raise ValueError(
                f"eos_token_id={eos!r} is invalid: use an int, a list of ints, None, or "
                f"{DEFAULT_EOS!r} (the model's generation config)."
            )
        config = getattr(model, "generation_config", None)
        found = getattr(config, "eos_token_id", None)
        if found is None:
            found = getattr(tokenizer, "eos_token_id", None)
        if found is None:
            return set()
        eos = found
    if isinstance(eos, int):
        return {eos}
    return {int(i) for i in eos}


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """int64 ``[N]``: argmax at temperature 0, else a sample of ``softmax(logits / T)``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@contextmanager
def _progress(steps: int, agents: int, show: bool) -> Iterator[Any]:
    """Yields ``tick(live_agents)``, called once per decoding step."""
    if not show:
        yield lambda live: None
        return
    if importlib.util.find_spec("tqdm") is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"polykv {agents} agents", unit="step")

        def tick_bar(live: int) -> None:
            bar.update(1)
            bar.set_postfix(live=live, refresh=False)

        try:
            yield tick_bar
        finally:
            bar.close()
        return
    every = max(1, steps // 10)
    count = [0]

    def tick_log(live: int) -> None:
        count[0] += 1
        if count[0] % every == 0 or count[0] == steps:
            logger.info("step %s/%s, %s of %s agents still decoding", count[0], steps, live, agents)

    yield tick_log
