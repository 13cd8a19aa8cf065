"""Pieces of the worker's transfers that hold no store: timing spans, started async loads.

:class:`Span` times a piece of work on the device's stream (CUDA events, no host sync) or in
wall time; :class:`AsyncLoad` is an asynchronous load the worker started (:class:`Fetched`:
what its tier fetch read)
(:meth:`~.worker.PolyKVWorker.get_finished` polls it); :func:`finite_blocks` is the scale check
a side-stream load runs without a host sync; :class:`DoneFence` is the fence of work that is
already done (a synchronous copy).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import Future

import torch

from polykv_vllm.connector.metadata import LoadJob
from polykv_vllm.core import PackedKV

__all__ = ["AsyncLoad", "DoneFence", "Fetched", "Span", "finite_blocks"]


class DoneFence:
    """The fence of work already done (a synchronous copy)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return


def finite_blocks(blocks: int, per_layer: Sequence[PackedKV]) -> torch.Tensor:
    """bool ``[blocks]`` on the tensors' device: whether every scale and norm of each block is
    finite in every layer (no host sync; :func:`~.slab.first_invalid_block` reads it back)."""
    scales = [t.reshape(blocks, -1) for p in per_layer for t in (p.k_scale, p.v_norm)]
    return torch.isfinite(torch.cat(scales, dim=1)).all(dim=1)


@dataclasses.dataclass
class Fetched:
    """What a tier fetch's thread read (``docs/TIERS.md``): ``rows`` (the first of the fetched
    rows, in order) hold their blocks (written into a host slab, or in ``payloads`` for the
    step's thread to write into a device slab); ``missing`` rows no tier gave; ``first``: the
    index in the load's rows of the first fetched row."""

    rows: tuple[int, ...]
    missing: tuple[int, ...]
    payloads: list[memoryview] = dataclasses.field(default_factory=list)
    first: int = 0


@dataclasses.dataclass(eq=False)
class AsyncLoad:
    """A started async load: ``good`` blocks (from the first) were readable when it started
    (``reason`` says why not the rest). Done when its CUDA ``event`` completed (``flags``: each
    block's scales were finite) or its ``future`` (the CPU thread's result) is done; at once
    when it had nothing to load. With ``fetch`` its tier blocks are still being read: done
    once they are (the worker then concludes the fetch and, on CUDA, starts the load)."""

    job: LoadJob
    good: int
    reason: str
    event: torch.cuda.Event | None = None
    flags: torch.Tensor | None = None
    future: Future[tuple[int, str, float]] | None = None
    span: Span | None = None
    fetch_failed: set[int] = dataclasses.field(default_factory=set)  # rows no tier could give
    fetch: Future[Fetched] | None = None

    def done(self) -> bool:
        if self.fetch is not None:
            return self.fetch.done()
        if self.event is not None:
            return bool(self.event.query())
        return self.future is None or self.future.done()

    def result(self) -> tuple[int, str, float]:
        """``(blocks loaded, why not the rest, seconds)`` of a done load."""
        if self.future is not None:
            return self.future.result()
        good, reason = self.good, self.reason
        if self.flags is not None:
            ok = self.flags.tolist()  # pinned host memory the finished event wrote: no sync
            if False in ok:
                good, reason = ok.index(False), "invalid"
        return good, reason, 0.0


class Span:
    """Time of a piece of work on the device's current stream (CUDA events: no host sync), or
    wall time on the CPU. :meth:`seconds` waits for the end event."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._t0 = time.perf_counter()
        self._t1: float | None = None
        if self._cuda:
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
            self._events = (begin, torch.cuda.Event(enable_timing=True))

    @classmethod
    def start(cls, device: torch.device) -> Span:
        return cls(device)

    @classmethod
    def of(cls, seconds: float) -> Span:
        """A finished wall-clock span of ``seconds`` (measured elsewhere)."""
        span = cls(torch.device("cpu"))
        span._t1 = span._t0 + seconds
        return span

    def stop(self) -> Span:
        if self._events is not None:
            self._events[1].record()
        else:
            self._t1 = time.perf_counter()
        return self

    def done(self) -> bool:
        return self._events is None or self._events[1].query()

    def seconds(self) -> float:
        if self._events is not None:
            self._events[1].synchronize()
            return self._events[0].elapsed_time(self._events[1]) / 1000
        assert self._t1 is not None
        return self._t1 - self._t0
