"""Static-shape decoding steps for :class:`~polykv_vllm.hf.batch.BatchedDecoder`, and their
capture in a CUDA graph (``pool.generate(cuda_graph=...)``).

On CUDA a decoding step of N agents is bound by the host launching its ~100 aten ops per layer
(plus the Triton decode of the pool's layer), not by the GPU: a step takes about as long for 1
agent as for 64. Capturing one step in a CUDA graph and replaying it removes that overhead. A
graph replays fixed kernels on fixed addresses, so everything that changes from step to step
must live in device buffers that the captured kernels read:

- :class:`StaticSuffixCache`: each layer's suffix K/V is one zero-filled buffer ``[N, Hkv, W,
  D]`` for the run's whole width ``W`` (prefill width + new tokens). A forward pass writes its
  slots with ``index_copy_`` at a device index tensor, and the attention reads all ``W`` slots
  under a mask (zeros, not uninitialised memory: a masked slot is still multiplied by 0, and
  NaN * 0 is NaN).
- :class:`StaticRun`: the input ids ``[N, 1]``, the slot being written ``[1]`` and each agent's
  left padding ``[N]`` are device buffers. Positions (``P + slot - pad``) and the suffix mask
  (``pad <= s <= slot``) are computed from them on the device, inside the step. What
  transformers' Llama forward derives from Python ints never reaches our attention: position ids
  are passed in (so no ``get_seq_length``), and ``create_causal_mask`` returns None without
  reading the cache for an attention implementation that has no mask function (ours,
  transformers 5.x). Everything else a step computes from Python values is fixed for the run
  (prefix length, scale, ``logits_to_keep``, shapes).
- Agents that finish (EOS) stay in the batch: their rows keep decoding and their tokens are
  ignored. One graph per call: recapturing for every smaller batch would cost a warm-up step and
  a capture each time, while a launch-bound step costs about the same for fewer rows.
- :class:`StepRunner`: the first step runs eagerly on a side stream (the warm-up the
  ``torch.cuda.graphs`` rules ask for; its result is that step's result), then the step is
  captured (not executed: a capture only records) and later steps copy their inputs into the
  buffers and replay. A capture that fails logs one warning and the call goes on eagerly with
  the same static step: writing the same slot again from the same inputs gives the same result.

The static step also runs eagerly on any device (``cuda_graph="static"``): what the CPU tests
compare with the dynamic path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from polykv_vllm.hf.cache import MemoryMeter

__all__ = [
    "CUDA_GRAPH_VALUES",
    "StaticRun",
    "StaticSuffixCache",
    "StepRunner",
    "resolve_cuda_graph",
]

logger = logging.getLogger(__name__)

#: What ``cuda_graph=`` takes: True, False, ``"auto"`` (on for CUDA) or ``"static"`` (the
#: static-shape step without a graph, any device; for tests).
CUDA_GRAPH_VALUES = (True, False, "auto", "static")

#: ``(ids [N, M], positions [N, M], mask bool [N, M, W]) -> logits [N, vocab]``.
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_cuda_graph(value: object, device: torch.device) -> str:
    """``"graph"``, ``"static"`` or ``"eager"`` (the dynamic path) for ``cuda_graph=value`` and a
    pool on ``device``. ``auto``: ``graph`` on CUDA, ``eager`` elsewhere; True off CUDA raises."""
    if value is False:
        return "eager"
    if value is True:
        if device.type != "cuda":
            raise ValueError(
                f"cuda_graph=True needs a CUDA model, but the pool is on device={device}: use "
                "cuda_graph=False or 'auto'."
            )
        return "graph"
    if isinstance(value, str) and value == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if isinstance(value, str) and value == "static":
        return "static"
    raise ValueError(
        f"cuda_graph={value!r} is invalid: use True, False or 'auto' (or 'static': the graph's "
        "static-shape step run eagerly)."
    )


class StaticSuffixLayer(DynamicLayer):
    """One layer's suffix K/V for the whole run: ``[N, Hkv, width, D]``, zero-filled at the
    first update (prefill); every update writes slots ``slots`` (int64 device ``[M]``, set by the
    cache) and returns the whole buffers. Counted by ``meter``."""

    def __init__(self, meter: MemoryMeter) -> None:
        super().__init__()
        self.meter = meter
        self.width = 0
        self.slots: torch.Tensor | None = None
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._kbuf is None or self._vbuf is None:
            n, heads, _, dim = key_states.shape
            shape_v = (n, heads, self.width, value_states.shape[-1])
            self._kbuf = self.meter.track(key_states.new_zeros((n, heads, self.width, dim)))
            self._vbuf = self.meter.track(value_states.new_zeros(shape_v))
            self.keys, self.values = self._kbuf, self._vbuf
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True
        if self.slots is None:
            raise RuntimeError("StaticSuffixLayer.update() before the cache's set_slots().")
        self._kbuf.index_copy_(2, self.slots, key_states)
        self._vbuf.index_copy_(2, self.slots, value_states)
        return self._kbuf, self._vbuf


class StaticSuffixCache(Cache):
    """The agents' suffixes in :class:`StaticSuffixLayer` buffers of one width for the run."""

    def __init__(self, prefix_tokens: int, num_layers: int, meter: MemoryMeter) -> None:
        self.prefix_tokens = prefix_tokens
        self.static_layers = [StaticSuffixLayer(meter) for _ in range(num_layers)]
        super().__init__(layers=list(self.static_layers))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The prefix plus the buffers' width (the model is given positions, it never asks)."""
        return self.prefix_tokens + self.static_layers[layer_idx].width

    def reserve(self, width: int) -> None:
        for layer in self.static_layers:
            layer.width = width

    def set_slots(self, slots: torch.Tensor) -> None:
        """The slots (int64 device ``[M]``) the next forward pass writes, in every layer."""
        for layer in self.static_layers:
            layer.slots = slots


class StaticRun:
    """The device buffers of one static run and its forward passes (see the module docstring).

    ``forward`` runs the model with the decoder's attention; ``new_tokens`` is how many
    :meth:`step` calls the buffers hold after the prefill; ``graph`` captures the step in a
    CUDA graph at its first call (:class:`StepRunner`).
    """

    def __init__(
        self,
        forward: Forward,
        cache: StaticSuffixCache,
        prefix_tokens: int,
        new_tokens: int,
        graph: bool,
    ) -> None:
        self._forward = forward
        self._cache = cache
        self._prefix = prefix_tokens
        self._new_tokens = new_tokens
        self.runner = StepRunner(self._step_fn, graph)
        self.rows = 0
        self._next = 0
        self._total = 0
        self._pad: torch.Tensor | None = None  # int64 [N]: left padding of each agent
        self._keys: torch.Tensor | None = None  # int64 [W]: every slot
        self._ids: torch.Tensor | None = None  # int64 [N, 1]: this step's tokens
        self._slot: torch.Tensor | None = None  # int64 [1]: the slot this step writes

    def prefill(self, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """``ids`` int64 ``[N, width]`` left-padded by ``pad`` (int64 ``[N]``), on the device."""
        n, width = ids.shape
        device = ids.device
        self.rows, self._next, self._total = n, width, width + self._new_tokens
        self._cache.reserve(self._total)
        self._pad = pad.to(device=device, dtype=torch.int64)
        self._keys = torch.arange(self._total, device=device)
        self._ids = torch.zeros((n, 1), dtype=torch.int64, device=device)
        self._slot = torch.full((1,), width, dtype=torch.int64, device=device)
        return self._at(ids, torch.arange(width, device=device))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per agent (int64 ``[N]``, every agent, finished ones included)."""
        if self._ids is None or self._slot is None:
            raise RuntimeError("step() before prefill(): call prefill first.")
        if self._next >= self._total:
            raise RuntimeError(
                f"step {self._next - self._total + self._new_tokens + 1}: the static suffix "
                f"buffers hold {self._total} slots (prefill width + new_tokens="
                f"{self._new_tokens}); pass a larger new_tokens to the decoder."
            )
        self._ids.copy_(tokens.view(self.rows, 1))
        self._slot.fill_(self._next)
        self._next += 1
        return self.runner()

    def close(self) -> None:
        self.runner.close()

    def _step_fn(self) -> torch.Tensor:
        assert self._ids is not None and self._slot is not None
        return self._at(self._ids, self._slot)

    def _at(self, ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The forward pass of tokens ``ids [N, M]`` written at ``slots`` (int64 device ``[M]``)."""
        assert self._keys is not None and self._pad is not None
        keys = self._keys.view(1, 1, -1)
        mask = (keys <= slots.view(1, -1, 1)) & (keys >= self._pad.view(-1, 1, 1))  # [N, M, W]
        positions = (slots.view(1, -1) - self._pad.view(-1, 1)).clamp(min=0) + self._prefix
        self._cache.set_slots(slots)
        return self._forward(ids, positions, mask)


def _warm_up(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()`` on a side stream (the warm-up before a capture); the caller's stream waits."""
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        out = fn()
    current.wait_stream(side)
    out.record_stream(current)
    return out


def _capture(fn: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """``(graph, output)``: ``fn`` captured (recorded, not run) in a new CUDA graph."""
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except BaseException:
        # torch.cuda.graph's __exit__ leaves its capture stream current when capture_end raises
        torch.cuda.set_stream(current)
        torch.cuda.synchronize()
        raise
    return graph, out


class StepRunner:
    """Runs ``fn`` (one decoding step from the static buffers; returns the logits) per call.

    With ``graph``, the first call warms up on a side stream (that call's result) and captures
    ``fn``; later calls replay the graph and return a copy of its output. A warm-up or capture
    that raises logs one warning and the call and every later one run ``fn`` eagerly.
    ``captured`` says whether a graph was captured (it stays True after :meth:`close`);
    ``problem`` why not when one was asked for.
    """

    def __init__(self, fn: Callable[[], torch.Tensor], graph: bool) -> None:
        self._fn = fn
        self._pending = graph
        self._graph: Any = None
        self._out: torch.Tensor | None = None
        self.problem: str | None = None
        self.captured = False

    def __call__(self) -> torch.Tensor:
        if self._graph is not None and self._out is not None:
            self._graph.replay()
            return self._out.clone()
        if self._pending:
            self._pending = False
            out: torch.Tensor | None = None
            try:
                out = _warm_up(self._fn)
                self._graph, self._out = _capture(self._fn)
                self.captured = True
            except Exception as exc:  # a capture refusing an op raises RuntimeError
                self._graph = self._out = None
                text = str(exc).strip()
                self.problem = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
                logger.warning(
                    "CUDA graph capture of the decoding step failed (%.300s): decoding eagerly",
                    self.problem,
                )
            if out is not None:
                return out
        return self._fn()

    def close(self) -> None:
        """Drop the graph and its memory pool."""
        self._graph = self._out = None
