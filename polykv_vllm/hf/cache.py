"""A transformers ``Cache`` whose layers read a shared compressed prefix (``SharedPrefixCache``).

Each :class:`SharedPrefixLayer` keeps only the agent's own suffix (the query and the generated
tokens). On every ``update`` it decodes the shared prefix of its layer from the pool into a fresh
working buffer ``[batch, kv_heads, prefix + suffix, head_dim]``, copies the suffix behind it and
returns that buffer to the attention. Nothing keeps a reference to the buffer, so it is freed as
soon as the layer's attention returns: an agent's own memory is its suffix plus one layer's buffer,
never a full-precision copy of the document.

:class:`MemoryMeter` measures that memory: every tensor the cache allocates is registered with its
``numel * element_size`` and released by ``weakref.finalize`` when torch frees it; the peak of the
live sum is what ``MemorySummary`` reports. The codec's own float32 temporaries inside ``decode``
(at most one decode chunk) are not counted.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

if TYPE_CHECKING:
    from polykv_vllm.hf.pool import SharedPool

__all__ = ["DEFAULT_CHUNK_TOKENS", "MemoryMeter", "SharedPrefixCache", "SharedPrefixLayer"]

#: Prefix tokens decoded per codec call: bounds the transient decode output (and the codec's
#: float32 temporaries) to this many tokens of one layer.
DEFAULT_CHUNK_TOKENS = 256


class MemoryMeter:
    """Live and peak bytes of the tensors registered with :meth:`track` (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.live_bytes = 0
        self.peak_bytes = 0

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        """Count ``tensor``'s bytes until torch frees it; returns ``tensor``."""
        nbytes = tensor.numel() * tensor.element_size()
        with self._lock:
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(tensor, self._release, nbytes)
        return tensor

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self.live_bytes -= nbytes


class SharedPrefixLayer(DynamicLayer):
    """One attention layer: the pool's compressed prefix (shared) + this agent's suffix (owned).

    ``keys`` / ``values`` hold only the suffix, ``[batch, kv_heads, suffix, head_dim]`` in the
    model's dtype. ``get_seq_length()`` is ``prefix + suffix``, so positions continue after the
    document. Cropping is not supported (the prefix is immutable); reordering and batch
    repetition act on the suffix only, the prefix being the same for every row.
    """

    is_croppable = False

    def __init__(
        self,
        pool: SharedPool,
        layer_idx: int,
        meter: MemoryMeter,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.layer_idx = layer_idx
        self.meter = meter
        self.chunk_tokens = chunk_tokens

    @property
    def suffix_length(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[-2])

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        layout = self.pool.layout
        _, heads, _, dim = key_states.shape
        if (heads, dim) != (layout.kv_heads, layout.head_dim) or value_states.shape[-1] != dim:
            raise ValueError(
                f"layer {self.layer_idx} got keys {tuple(key_states.shape)} / values "
                f"{tuple(value_states.shape)} but the pool holds kv_heads={layout.kv_heads}, "
                f"head_dim={layout.head_dim}: use the model the pool was compressed with."
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((key_states.shape[0], heads, 0, dim))
        self.values = value_states.new_empty((value_states.shape[0], heads, 0, dim))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states`` / ``value_states`` (``[batch, kv_heads, new, head_dim]``) to the
        suffix and return ``prefix + suffix`` keys and values, ``[batch, kv_heads, P + S, D]``,
        freshly decoded (a transient working buffer, not kept by the cache)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        self.keys = self.meter.track(torch.cat([self.keys, key_states], dim=-2))
        self.values = self.meter.track(torch.cat([self.values, value_states], dim=-2))
        return self._with_prefix(self.keys, self.values)

    def _with_prefix(
        self, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, length, dim = keys.shape
        prefix_len = self.pool.num_tokens
        shape = (batch, heads, prefix_len + length, dim)
        track = self.meter.track
        out_k = track(torch.empty(shape, dtype=keys.dtype, device=keys.device))
        out_v = track(torch.empty(shape, dtype=values.dtype, device=values.device))
        for start in range(0, prefix_len, self.chunk_tokens):
            end = min(start + self.chunk_tokens, prefix_len)
            k, v = self.pool.decode_layer(self.layer_idx, start, end, keys.dtype, keys.device)
            # [chunk, H, D] -> [H, chunk, D], broadcast over the batch.
            out_k[:, :, start:end].copy_(track(k).transpose(0, 1))
            out_v[:, :, start:end].copy_(track(v).transpose(0, 1))
            del k, v
        out_k[:, :, prefix_len:].copy_(keys)
        out_v[:, :, prefix_len:].copy_(values)
        return out_k, out_v

    def get_seq_length(self) -> int:
        """Prefix tokens plus suffix tokens (the position of the next token)."""
        return self.pool.num_tokens + self.suffix_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "SharedPrefixLayer cannot be cropped (the shared prefix is immutable); assisted "
            "decoding and other rollbacks are not supported with a compressed pool."
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.suffix_length:
            super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.suffix_length:
            super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.suffix_length:
            super().batch_select_indices(indices)


class SharedPrefixCache(Cache):
    """One agent's cache over a :class:`~polykv_vllm.hf.pool.SharedPool`: one
    :class:`SharedPrefixLayer` per model layer and one :class:`MemoryMeter` for all of them.

    Pass it as ``past_key_values`` with input ids that start with ``pool.token_ids``; the model
    then only computes the tokens after the prefix. Use one cache per generation and thread.
    """

    def __init__(self, pool: SharedPool, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens!r} is invalid: use an integer >= 1.")
        self.pool = pool
        self.meter = MemoryMeter()
        self.prefix_layers = [
            SharedPrefixLayer(pool, i, self.meter, chunk_tokens) for i in range(pool.num_layers)
        ]
        super().__init__(layers=list(self.prefix_layers))

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache keeps between steps (the suffix keys and values)."""
        held = []
        for layer in self.prefix_layers:
            for t in (layer.keys, layer.values):
                if isinstance(t, torch.Tensor):
                    held.append(t)
        return held
