"""How the batched decoder turns a pool layer back into keys and values: the torch codec or the
project's Triton decode kernel (:mod:`polykv_vllm.kernels`).

Both return one layer ``[P, kv_heads, head_dim]`` keys and values in the model's dtype, shared by
all agents. Two backends:

- ``"torch"``: the codec's math (:meth:`LayerSpec.decode`, what :meth:`SharedPool.decode_layer`
  runs, in float32 then cast), in chunks of ``chunk_tokens`` tokens copied into a new buffer (or
  straight from the codec when the prefix fits one chunk). Any device; dozens of small ops per
  layer. Each layer's tables (centroids, signs) are copied to the pool's device once per
  decoder, so a decode does no host-to-device copy (and can be captured in a CUDA graph).
- ``"triton"``: the paged decode kernel (:func:`polykv_vllm.kernels.triton_plan.
  plan_decompress_layers`, two launches per layer, keys and values) writing into one working
  buffer ``[1, P, kv_heads, head_dim]`` seen as a single paged block (``block_size = P``,
  ``block_ids = [0]``). The buffer is allocated once per decoder and reused by every layer and
  step, and each layer's launch plan is built once (at its first decode), so a step does no
  Python planning. CUDA with Triton (or Triton's CPU interpreter, ``TRITON_INTERPRET=1``, for
  tests); bf16 / fp16 / fp32 models (``auto``: bf16 / fp16 only, see
  :data:`AUTO_TRITON_DTYPES`). ``chunk_tokens`` does not apply: the kernel holds no
  temporaries beyond the buffer.

:func:`resolve_decode_backend` picks one; ``SharedPool.memory_summary(n).batched_decode_backend``
records which one ran.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

from polykv_vllm.core.layer_spec import LayerSpec
from polykv_vllm.hf.cache import MemoryMeter
from polykv_vllm.hf.pool import SharedPool

__all__ = ["DECODE_BACKENDS", "PrefixDecoder", "resolve_decode_backend"]

logger = logging.getLogger(__name__)

DECODE_BACKENDS = ("auto", "torch", "triton")

#: Model dtypes the Triton kernel writes (its float cache dtypes).
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

#: Model dtypes ``auto`` decodes with the kernel. Its centroid tables are fp16 (about 2^-12 of a
#: vector's scale, below half a bf16 / fp16 ulp); a float32 model keeps the float32 codec.
AUTO_TRITON_DTYPES = (torch.bfloat16, torch.float16)


def _interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_decode_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """``"torch"`` or ``"triton"`` for ``name`` in :data:`DECODE_BACKENDS`, a model on
    ``device`` in ``dtype``.

    ``auto`` picks Triton on CUDA when it imports and the model is bf16 or fp16, the torch codec
    otherwise (one log line on CUDA, at debug level for a float32 model): a float32 model keeps
    the float32 codec, the kernel's fp16 centroid tables being coarser than float32
    (``triton`` runs it anyway). ``triton``
    raises ``ValueError`` when it cannot run: off CUDA (unless Triton's interpreter is on,
    ``TRITON_INTERPRET=1``), without the triton package, or for a dtype other than bf16, fp16,
    fp32.
    """
    if name not in DECODE_BACKENDS:
        raise ValueError(f"decode_backend={name!r} is unknown: use one of {list(DECODE_BACKENDS)}.")
    if name == "torch":
        return "torch"
    from polykv_vllm.kernels import triton_available

    problem = None
    if device.type != "cuda" and not (name == "triton" and _interpreter()):
        problem = f"the model is on {device}, the Triton decode kernel runs on CUDA"
    elif not triton_available():
        problem = "triton does not import"
    elif dtype not in TRITON_DTYPES:
        problem = f"the model's dtype {dtype} is not one the kernel writes ({TRITON_DTYPES})"
    elif name == "auto" and dtype not in AUTO_TRITON_DTYPES:
        problem = f"the model is {dtype}, auto decodes with the kernel only for bf16 / fp16"
    if problem is None:
        return "triton"
    if name == "triton":
        raise ValueError(f"decode_backend='triton' cannot run: {problem}; use 'torch' or 'auto'.")
    if device.type == "cuda":
        log = logger.debug if dtype not in AUTO_TRITON_DTYPES else logger.info
        log("%s: the shared prefix is decoded by the torch codec", problem)
    return "torch"


class PrefixDecoder:
    """Decodes pool layers for one :class:`~polykv_vllm.hf.batch.BatchedDecoder` (its lifetime).

    ``decode(layer, dtype, device, keep)`` returns ``(keys, values)`` ``[P, kv_heads,
    head_dim]``. With ``keep=False`` the result may be overwritten by the next call (the Triton
    backend reuses one buffer; the torch backend returns new tensors), so use it before decoding
    the next layer. ``keep=True`` returns tensors of their own (for ``keep_decoded``). Every
    buffer is counted by both meters (``total`` and ``document``).
    """

    def __init__(
        self,
        pool: SharedPool,
        backend: str,
        chunk_tokens: int,
        total: MemoryMeter,
        document: MemoryMeter,
    ) -> None:
        if backend not in ("torch", "triton"):
            raise ValueError(f"PrefixDecoder backend={backend!r}: use 'torch' or 'triton'.")
        self.pool = pool
        self.backend = backend
        self.chunk_tokens = chunk_tokens
        self.total = total
        self.document = document
        self._buffer: tuple[torch.Tensor, torch.Tensor] | None = None  # [1, P, Hkv, D] each
        self._plans: dict[int, Any] = {}  # layer -> PagedPlan into self._buffer
        self._block_ids: torch.Tensor | None = None
        self._specs: dict[int, LayerSpec] = {}  # layer -> its spec with tables on the device

    def decode(
        self, layer: int, dtype: torch.dtype, device: torch.device, keep: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend == "triton":
            return self._triton(layer, dtype, device, keep)
        return self._torch(layer, dtype, device)

    # --- triton -------------------------------------------------------------------------------

    def _triton(
        self, layer: int, dtype: torch.dtype, device: torch.device, keep: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if keep:  # a buffer of its own, planned once (the layer is decoded once)
            kbuf, vbuf = self._new_buffer(dtype, device)
            self._plan(layer, kbuf, vbuf, device)()
            return kbuf[0], vbuf[0]
        if self._buffer is None or self._buffer[0].dtype != dtype:
            self._buffer = self._new_buffer(dtype, device)
            self._plans.clear()
        kbuf, vbuf = self._buffer
        plan = self._plans.get(layer)
        if plan is None:
            plan = self._plans[layer] = self._plan(layer, kbuf, vbuf, device)
        plan()
        return kbuf[0], vbuf[0]

    def _new_buffer(
        self, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layout = self.pool.layout
        shape = (1, self.pool.num_tokens, layout.kv_heads, layout.head_dim)
        kbuf = self._track(torch.empty(shape, dtype=dtype, device=device))
        vbuf = self._track(torch.empty(shape, dtype=dtype, device=device))
        return kbuf, vbuf

    def _plan(
        self, layer: int, kbuf: torch.Tensor, vbuf: torch.Tensor, device: torch.device
    ) -> Any:
        """The launch plan decoding ``layer`` into the single block ``kbuf`` / ``vbuf``."""
        from polykv_vllm.kernels.triton_plan import plan_decompress_layers

        if self._block_ids is None:
            self._block_ids = torch.zeros(1, dtype=torch.int32, device=device)
        spec = self.pool.codec.layer_spec(layer, self.pool.layout.head_dim)
        packed = self.pool.layers[layer]
        return plan_decompress_layers([packed], [spec], [kbuf], [vbuf], self._block_ids)

    # --- torch --------------------------------------------------------------------------------

    def _torch(
        self, layer: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p, layout = self.pool.num_tokens, self.pool.layout
        if p <= self.chunk_tokens:  # one codec call, its output is the buffer (no copy)
            k, v = self._decode_range(layer, 0, p, dtype, device)
            return self._track(k.contiguous()), self._track(v.contiguous())
        shape = (p, layout.kv_heads, layout.head_dim)
        keys = self._track(torch.empty(shape, dtype=dtype, device=device))
        values = self._track(torch.empty(shape, dtype=dtype, device=device))
        for start in range(0, p, self.chunk_tokens):
            end = min(start + self.chunk_tokens, p)
            k, v = self._decode_range(layer, start, end, dtype, device)
            keys[start:end].copy_(self._track(k))
            values[start:end].copy_(self._track(v))
            del k, v
        return keys, values

    def _decode_range(
        self, layer: int, start: int, end: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`SharedPool.decode_layer` with the layer's tables already on ``device``."""
        spec = self._specs.get(layer)
        if spec is None or spec.value_centroids.device != device:
            spec = self._specs[layer] = _spec_on(
                self.pool.codec.layer_spec(layer, self.pool.layout.head_dim), device
            )
        k, v = spec.decode(self.pool.layers[layer].slice(start, end).to(device))
        return k.to(dtype), v.to(dtype)

    def _track(self, t: torch.Tensor) -> torch.Tensor:
        self.document.track(t)
        return self.total.track(t)


def _spec_on(spec: LayerSpec, device: torch.device) -> LayerSpec:
    """``spec`` with its tables on ``device`` (the codec's are cached on the CPU, and its decode
    copies them to the data's device at every call)."""

    def on(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return dataclasses.replace(
        spec,
        key_centroids=on(spec.key_centroids),
        key_signs=on(spec.key_signs),
        value_centroids=spec.value_centroids.to(device),
        value_signs=spec.value_signs.to(device),
    )
