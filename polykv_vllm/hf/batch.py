"""N agents decoded in lockstep over one pool: :class:`BatchedDecoder`.

Per forward pass and per layer, the pool's layer is decoded once into one working buffer
``[P, kv_heads, head_dim]`` shared by all agents; every agent's queries attend to it in one
batched call (:mod:`polykv_vllm.hf.hydragen`), each agent's own suffix is attended separately, and
the two are merged by log-sum-exp. The buffer is dropped before the next layer, so the document
costs one decoded layer whatever the number of agents; an agent owns only its suffix K/V.

How it plugs into transformers: the attention function is registered with
``transformers.AttentionInterface`` under :data:`ATTENTION_NAME`, and the model is switched to it
for the lifetime of the decoder (``with BatchedDecoder(...) as dec``; the previous implementation
is restored on exit). The cache passed to the model holds only suffixes, so the model never sees
the prefix; positions are given explicitly (``P + i``). Do not run other generations on the same
model object while a decoder is open.
"""

from __future__ import annotations

import contextvars
import inspect
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from polykv_vllm.hf.cache import DEFAULT_CHUNK_TOKENS, MemoryMeter
from polykv_vllm.hf.graph import StaticRun, StaticSuffixCache
from polykv_vllm.hf.hydragen import (
    PrefixAttention,
    prefix_backend,
    suffix_attention_merged,
    suffix_bias,
)
from polykv_vllm.hf.pool import SharedPool
from polykv_vllm.hf.prefix_decode import PrefixDecoder

__all__ = ["ATTENTION_NAME", "BatchedDecoder"]

#: The name the shared-prefix attention is registered under in ``AttentionInterface``.
ATTENTION_NAME = "polykv_hydragen"


@dataclass
class _StepState:
    """What the attention function needs during one forward pass (set by the decoder)."""

    decoder: PrefixDecoder
    prefix_fn: PrefixAttention
    mask: torch.Tensor  # bool [N, M, S]: query i of agent n may read suffix slot s
    # float32 [N * Hkv, G * M, S] from the mask (suffix_bias), built by the first layer
    bias: torch.Tensor | None = None
    # keep_decoded=True: every decoded layer, kept for the decoder's lifetime (else None).
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def decode_prefix(
        self, layer: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer`` of the pool as ``[P, kv_heads, head_dim]`` keys and values."""
        if self.kept is None:
            return self.decoder.decode(layer, dtype, device)
        if layer not in self.kept:
            self.kept[layer] = self.decoder.decode(layer, dtype, device, keep=True)
        return self.kept[layer]


_ACTIVE: contextvars.ContextVar[_StepState | None] = contextvars.ContextVar(
    "polykv_hydragen_state", default=None
)


def _hydragen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention hook: ``query [N, H, M, D]``, ``key`` / ``value`` (the suffix cache
    after the update) ``[N, Hkv, S, D]``; returns ``[N, M, H, D]`` in the query's dtype. Outside
    a decoder (no active state) it is plain SDPA."""
    state = _ACTIVE.get()
    if state is None:
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return out, None
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    layer: int = module.layer_idx  # type: ignore[assignment]
    k_pre, v_pre = state.decode_prefix(layer, query.dtype, query.device)
    out_p, lse_p = state.prefix_fn(query, k_pre, v_pre, scale)
    del k_pre, v_pre  # the shared working buffer lives for one layer only
    if state.bias is None:  # once per forward pass, shared by every layer
        kv_heads = key.shape[1]
        state.bias = suffix_bias(state.mask, kv_heads, query.shape[1] // kv_heads)
    out = suffix_attention_merged(query, key, value, state.bias, scale, out_p, lse_p)
    # [N, H, M, D] -> [N, M, H, D] in the query's dtype, one copy (none for fp32 and M = 1)
    return out.transpose(1, 2).to(query.dtype, memory_format=torch.contiguous_format), None


AttentionInterface.register(ATTENTION_NAME, _hydragen_attention)


class _SuffixLayer(DynamicLayer):
    """Suffix K/V ``[N, Hkv, S, D]`` in one preallocated buffer per tensor, written in place.

    ``keys`` / ``values`` are views of the first ``S`` slots. The buffer holds ``reserve`` slots
    (the prefill's width + the run's new tokens, set by the decoder) and doubles if that is
    exceeded; unlike ``DynamicLayer``'s per-step ``torch.cat`` no second copy of the suffix is
    ever live, so the metered peak is the suffix itself. Buffers are counted by a meter.
    """

    def __init__(self, meter: MemoryMeter) -> None:
        super().__init__()
        self.meter = meter
        self.reserve = 0
        self.length = 0
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        new = int(key_states.shape[-2])
        if self._kbuf is None or self.length + new > self._kbuf.shape[2]:
            self._grow(key_states, value_states, self.length + new)
        assert self._kbuf is not None and self._vbuf is not None
        self._kbuf[:, :, self.length : self.length + new].copy_(key_states)
        self._vbuf[:, :, self.length : self.length + new].copy_(value_states)
        self.length += new
        self._views()
        return self.keys, self.values  # type: ignore[return-value]

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        old = 0 if self._kbuf is None else int(self._kbuf.shape[2])
        slots = max(needed, self.reserve, 2 * old)
        n, heads, _, dim = key_states.shape
        kbuf = self.meter.track(key_states.new_empty((n, heads, slots, dim)))
        vbuf = self.meter.track(value_states.new_empty((n, heads, slots, value_states.shape[-1])))
        if self._kbuf is not None and self._vbuf is not None and self.length:
            kbuf[:, :, : self.length].copy_(self._kbuf[:, :, : self.length])
            vbuf[:, :, : self.length].copy_(self._vbuf[:, :, : self.length])
        self._kbuf, self._vbuf = kbuf, vbuf
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _views(self) -> None:
        assert self._kbuf is not None and self._vbuf is not None
        self.keys = self._kbuf[:, :, : self.length]
        self.values = self._vbuf[:, :, : self.length]

    def select(self, rows: torch.Tensor) -> None:
        if self._kbuf is not None and self._vbuf is not None:
            self._kbuf = self.meter.track(self._kbuf.index_select(0, rows))
            self._vbuf = self.meter.track(self._vbuf.index_select(0, rows))
            self._views()


class _SuffixCache(Cache):
    """The agents' suffixes only; ``get_seq_length`` counts the prefix so positions line up."""

    def __init__(self, prefix_tokens: int, num_layers: int, meter: MemoryMeter) -> None:
        self.prefix_tokens = prefix_tokens
        self.suffix_layers = [_SuffixLayer(meter) for _ in range(num_layers)]
        super().__init__(layers=list(self.suffix_layers))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefix_tokens + self.suffix_layers[layer_idx].length

    def reserve(self, slots: int) -> None:
        for layer in self.suffix_layers:
            layer.reserve = slots

    def select(self, rows: torch.Tensor) -> None:
        for layer in self.suffix_layers:
            layer.select(rows)


class BatchedDecoder:
    """Decode ``N`` agents together over ``pool`` with ``model`` (a context manager).

    ``prefill(suffixes)`` feeds every agent's query (left-padded to the longest) and returns the
    next-token logits ``[N, vocab]``; ``step(tokens)`` feeds one token per live agent
    (int64 ``[N_live]``) and returns ``[N_live, vocab]``; ``keep(rows)`` drops the agents not in
    ``rows`` (indices into the live batch, e.g. those that did not finish). Logits are in the
    model's dtype, on its device.

    ``total_meter.peak_bytes`` is the measured peak of every K/V tensor the decoder allocated
    (all suffixes + the shared decoded layer); ``document_meter.peak_bytes`` the document's share
    alone (one decoded layer, independent of ``N``). Attention scores are not counted.

    ``keep_decoded=True`` keeps every decoded layer for the decoder's lifetime instead (decoded
    once at the prefill, not once per step): the document then costs all layers decoded in the
    model's dtype (twice one bf16 copy for a float32 model), still independent of ``N``. Off by
    default: the issue bounds the working buffer to one decoded layer.

    ``new_tokens``: how many tokens :meth:`step` will be called for (the suffix buffers are
    allocated for the prefill's width plus that many at once; more grow them by doubling).

    ``static=True`` runs the static-shape path of :mod:`polykv_vllm.hf.graph` (fixed-width
    suffix buffers, step inputs in device buffers; exactly ``new_tokens`` steps fit), and
    ``cuda_graph=True`` (which implies it) captures its step in a CUDA graph at the first
    :meth:`step` and replays it after; ``cuda_graph_ran`` says whether a graph was captured.
    In both, :meth:`step` takes a token for every agent of the prefill and :meth:`keep` is
    refused: finished agents stay in the batch (their outputs are the caller's to ignore).
    """

    def __init__(
        self,
        pool: SharedPool,
        model: Any,
        backend: str = "torch",
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        keep_decoded: bool = False,
        new_tokens: int = 0,
        decode_backend: str = "torch",
        static: bool = False,
        cuda_graph: bool = False,
    ) -> None:
        self.pool = pool
        self._new_tokens = new_tokens
        self.model = model
        self.backend = backend
        self.total_meter = MemoryMeter()
        self.document_meter = MemoryMeter()
        self._prefix_fn = prefix_backend(backend)
        self.decode_backend = decode_backend
        self._prefix = PrefixDecoder(
            pool, decode_backend, chunk_tokens, self.total_meter, self.document_meter
        )
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = (
            {} if keep_decoded else None
        )
        self._cache: _SuffixCache | StaticSuffixCache
        self._static: StaticRun | None = None
        if static or cuda_graph:
            self._cache = StaticSuffixCache(pool.num_tokens, pool.num_layers, self.total_meter)
            self._static = StaticRun(
                self._run, self._cache, pool.num_tokens, new_tokens, graph=cuda_graph
            )
        else:
            self._cache = _SuffixCache(pool.num_tokens, pool.num_layers, self.total_meter)
        self._valid: torch.Tensor | None = None  # bool [N, S]: real (not padding) slots
        self._next_pos: torch.Tensor | None = None  # int64 [N]: position of the next token
        self._previous_attn: str | None = None
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters

    def __enter__(self) -> BatchedDecoder:
        self._previous_attn = self.model.config._attn_implementation
        self.model.set_attn_implementation(ATTENTION_NAME)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._static is not None:
            self._static.close()
        if self._previous_attn is not None:
            self.model.set_attn_implementation(self._previous_attn)
            self._previous_attn = None

    @property
    def live(self) -> int:
        if self._static is not None:
            return self._static.rows
        return 0 if self._valid is None else int(self._valid.shape[0])

    @property
    def cuda_graph_ran(self) -> bool:
        """Whether the decoding step was captured in a CUDA graph (and replayed)."""
        return self._static is not None and self._static.runner.captured

    def prefill(self, suffixes: list[list[int]]) -> torch.Tensor:
        """Feed each agent's query ids (every list non-empty); logits ``[N, vocab]``."""
        device = self.pool.layout.device
        lens = torch.tensor([len(s) for s in suffixes], dtype=torch.int64)
        width = int(lens.max())
        pad = (width - lens).tolist()
        ids = torch.tensor(
            [[0] * p + list(s) for p, s in zip(pad, suffixes, strict=True)], dtype=torch.int64
        )
        slots = torch.arange(width).unsqueeze(0)
        offset = torch.tensor(pad).unsqueeze(1)
        valid = slots >= offset  # [N, width]
        if self._static is not None:
            with torch.inference_mode():
                return self._static.prefill(ids.to(device), offset.squeeze(1).to(device))
        positions = self.pool.num_tokens + (slots - offset).clamp(min=0)
        self._valid = valid.to(device)
        self._next_pos = (self.pool.num_tokens + lens).to(device)
        self._cache.reserve(width + self._new_tokens)
        return self._forward(ids.to(device), positions.to(device), new=width)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per live agent (int64 ``[N_live]``); logits ``[N_live, vocab]``."""
        if self._static is not None:
            with torch.inference_mode():
                return self._static.step(tokens)
        if self._valid is None or self._next_pos is None:
            raise RuntimeError("BatchedDecoder.step() before prefill(): call prefill first.")
        n = self.live
        self._valid = torch.cat([self._valid, self._valid.new_ones((n, 1))], dim=1)
        positions = self._next_pos.unsqueeze(1)
        self._next_pos = self._next_pos + 1
        return self._forward(tokens.view(n, 1), positions, new=1)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the live agents at ``rows`` (int64 indices into the live batch)."""
        if self._static is not None:
            raise RuntimeError(
                "BatchedDecoder.keep() with static=True / cuda_graph=True: the static batch keeps "
                "every agent; ignore the finished agents' outputs instead."
            )
        if self._valid is None or self._next_pos is None:
            raise RuntimeError("BatchedDecoder.keep() before prefill(): call prefill first.")
        rows = rows.to(self._valid.device)
        with torch.inference_mode():
            self._valid = self._valid.index_select(0, rows)
            self._next_pos = self._next_pos.index_select(0, rows)
            assert isinstance(self._cache, _SuffixCache)
            self._cache.select(rows)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, new: int) -> torch.Tensor:
        assert self._valid is not None
        total = self._valid.shape[1]
        key_slots = torch.arange(total, device=ids.device)
        query_slots = torch.arange(total - new, total, device=ids.device)
        causal = key_slots.unsqueeze(0) <= query_slots.unsqueeze(1)  # [M, S]
        mask = causal.unsqueeze(0) & self._valid.unsqueeze(1)  # [N, M, S]
        return self._run(ids, positions, mask)

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The model's forward pass on ``ids`` at ``positions`` with the suffix ``mask``
        ``[N, M, S]``; the last position's logits ``[N, vocab]``."""
        state = _StepState(
            decoder=self._prefix,
            prefix_fn=self._prefix_fn,
            mask=mask,
            kept=self._kept,
        )
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._keep_arg else {}
        token = _ACTIVE.set(state)
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=ids,
                    position_ids=positions,
                    past_key_values=self._cache,
                    use_cache=True,
                    **kwargs,
                )
        finally:
            _ACTIVE.reset(token)
        return out.logits[:, -1]
