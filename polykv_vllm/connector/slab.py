"""The worker's compressed store: preallocated per-layer slabs with one row per stored block.

A row holds one block (``block_size`` tokens, this rank's kv heads) of one layer in the layout
its :class:`~polykv_vllm.core.LayerSpec` allocates (``docs/FORMAT.md``): ``k_codes [rows, bs, H,
kw]``, ``k_scale [rows, bs, H]``, ``v_codes [rows, bs, H, vw]``, ``v_norm [rows, bs, H]``.
The slab does not place anything: the scheduler side decides which row holds which block
(:mod:`~.scheduler.rows`) and every plan names rows. :func:`runs` splits a plan's rows into runs
of consecutive rows. On CUDA the kernels reach a run by address (:meth:`BlockSlab.addresses`,
arithmetic, no views): they decode straight from a GPU-resident run or from a pinned host run
(read over PCIe: no staging copy) and encode straight into a GPU run; elsewhere a run is one
zero-copy view per layer (:meth:`BlockSlab.view`). vLLM's CUDA blocks are 16 tokens: a 4K-token
document is 256 blocks, so per-block tensors would mean thousands of tiny copies.
The slab only remembers which rows hold a written block (:meth:`BlockSlab.mark_filled`,
:meth:`BlockSlab.mark_empty`), so a load of an empty row is caught and its bytes are measured.

Pinned host slabs are written from the GPU on a side stream, so the device-to-host copy of a
stored document overlaps the next steps' compute: the worker stages the store and confirms its
rows only once the copies landed (:mod:`~.staging`, :meth:`BlockSlab.write_rows`), so no reader
waits; :meth:`BlockSlab.write` (tests)
orders later readers after its copies instead (:meth:`BlockSlab.ready_for_device` on the GPU,
:meth:`BlockSlab.ready_for_host` on the CPU).
Rows of several runs from a source on the slab's device are written with one ``index_copy_``
per tensor and layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from polykv_vllm.core import KVCodec, LayerSpec, PackedKV
from polykv_vllm.kernels.addresses import PackedAddresses

__all__ = ["BlockSlab", "Run", "first_invalid_block", "runs"]


@dataclass(frozen=True)
class Run:
    """``length`` blocks at ``offset`` in a job's row list that sit in the consecutive slab rows
    ``row .. row + length - 1``."""

    offset: int
    row: int
    length: int


@dataclass(frozen=True, eq=False)
class _LayerSlab:
    """One layer's rows: ``packed`` holds every row's tokens (``rows * block_size``, row after
    row, contiguous, in the layer spec's layout), and ``k_codes`` .. ``v_norm`` are the same
    memory viewed per row, ``[rows, block_size, ...]``."""

    packed: PackedKV
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    v_codes: torch.Tensor
    v_norm: torch.Tensor

    @classmethod
    def allocate(
        cls,
        spec: LayerSpec,
        rows: int,
        block_size: int,
        kv_heads: int,
        device: torch.device,
        pin: bool,
    ) -> _LayerSlab:
        packed = spec.zeros(rows * block_size, kv_heads, device, pin_memory=pin)
        per_row = (t.view(rows, block_size, *t.shape[1:]) for t in packed.tensors())
        return cls(packed, *per_row)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.k_codes, self.k_scale, self.v_codes, self.v_norm)


class BlockSlab:
    """``capacity`` rows of compressed blocks for ``layers`` (codec layer indices), on
    ``device`` (pinned host memory when ``pin`` and the device is the CPU)."""

    def __init__(
        self,
        codec: KVCodec,
        layers: Sequence[int],
        capacity: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        device: torch.device,
        pin: bool,
    ) -> None:
        assert capacity >= 1
        self.block_size = block_size
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.device = device
        self.layers = [
            _LayerSlab.allocate(
                codec.layer_spec(layer, head_dim), capacity, block_size, kv_heads, device, pin
            )
            for layer in layers
        ]
        self.row_bytes = sum(
            t[0].numel() * t.element_size() for s in self.layers for t in s.tensors()
        )
        self.capacity = capacity
        # (address of row 0, bytes per row) of each layer's four tensors: transfer addresses by
        # arithmetic (:meth:`addresses`), no per-layer views on the hot path
        self._bases = [
            [(t.data_ptr(), t[0].numel() * t.element_size()) for t in s.tensors()]
            for s in self.layers
        ]
        self._pinned = device.type == "cpu" and self.layers[0].k_codes.is_pinned()
        self._filled: set[int] = set()  # rows holding a written block
        self._pending: torch.cuda.Event | None = None  # last side-stream write to a host slab
        self._side: torch.cuda.Stream | None = None
        self._inflight: list[tuple[torch.cuda.Event, object]] = []  # sources of pending writes

    @property
    def is_pinned(self) -> bool:
        """Whether the rows are in pinned host memory (the GPU reads and writes them over
        PCIe, by address)."""
        return self._pinned

    def __contains__(self, row: int) -> bool:
        """Whether ``row`` holds a written block."""
        return row in self._filled

    def __len__(self) -> int:
        return len(self._filled)

    @property
    def nbytes(self) -> int:
        """Bytes of the rows holding a block (measured row size times rows)."""
        return len(self._filled) * self.row_bytes

    def check_rows(self, rows: Sequence[int]) -> None:
        """Every row is one of this slab's (the scheduler side and this slab both size the store
        with :func:`~.scheduler.geometry.store_rows`)."""
        bad = [r for r in rows if not 0 <= r < self.capacity]
        assert not bad, f"plan names rows {bad[:4]} of a {self.capacity}-row slab"

    def mark_filled(self, rows: Sequence[int]) -> None:
        self._filled.update(rows)

    def mark_empty(self, rows: Sequence[int]) -> None:
        self._filled.difference_update(rows)

    def view(self, row: int, length: int) -> list[PackedKV]:
        """Rows ``row .. row + length - 1`` per layer, as zero-copy :class:`PackedKV` views
        (``length * block_size`` tokens, in row order). Host views written from the GPU are
        valid on the host only after :meth:`ready_for_host`, on the GPU's current stream after
        :meth:`ready_for_device`."""
        assert row >= 0 and row + length <= self.capacity, (row, length, self.capacity)
        bs = self.block_size
        return [slab.packed.slice(row * bs, (row + length) * bs) for slab in self.layers]

    def addresses(self, row: int, length: int) -> PackedAddresses:
        """Where rows ``row .. row + length - 1`` are, per layer (what :meth:`view` would
        return, as addresses: device memory, or pinned host memory the GPU reads directly)."""
        assert row >= 0 and row + length <= self.capacity, (row, length, self.capacity)
        k_codes, k_scale, v_codes, v_norm = (
            [b[c][0] + row * b[c][1] for b in self._bases] for c in range(4)
        )
        return PackedAddresses(length * self.block_size, k_codes, k_scale, v_codes, v_norm)

    def first_invalid_row(self, row: int, length: int) -> int | None:
        """Index (from ``row``) of the first of rows ``row .. row + length - 1`` whose scales or
        norms are not finite in some layer, or None: one reduction on the slab's device (one
        sync on a GPU slab; a host slab is read after :meth:`ready_for_host`)."""
        if self.device.type == "cpu":
            self.ready_for_host()
        parts = [
            t.narrow(0, row, length).reshape(length, -1)
            for s in self.layers
            for t in (s.k_scale, s.v_norm)
        ]
        good = torch.isfinite(torch.cat(parts, dim=1)).all(dim=1).tolist()
        return good.index(False) if False in good else None

    def write(self, run: Run, per_layer: Sequence[PackedKV], offset: int = 0) -> None:
        """Copy tokens ``offset ..`` of ``per_layer`` (one entry per layer) into ``run``'s rows.

        GPU sources into a pinned host slab are copied on a side stream that first waits for the
        current stream (the source is complete, and earlier readers of these rows are done);
        later readers wait for it through :meth:`ready_for_device` / :meth:`ready_for_host`.
        """
        assert len(per_layer) == len(self.layers)
        begin, tokens = offset, run.length * self.block_size
        dsts = [t for p in self.view(run.row, run.length) for t in p.tensors()]
        srcs = [t.narrow(0, begin, tokens) for p in per_layer for t in p.tensors()]
        async_d2h = self.device.type == "cpu" and srcs[0].is_cuda
        if not async_d2h:
            torch._foreach_copy_(dsts, srcs, non_blocking=True)
            return
        main = torch.cuda.current_stream(srcs[0].device)
        if self._side is None:
            self._side = torch.cuda.Stream(srcs[0].device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            torch._foreach_copy_(dsts, srcs, non_blocking=True)  # one call, not one per tensor
        self._pending = self._side.record_event()
        # the sources stay referenced until their copies are done (instead of record_stream on
        # every tensor): pruned here, on each write
        self._inflight = [(e, p) for e, p in self._inflight if not e.query()]
        self._inflight.append((self._pending, per_layer))

    def write_rows(self, rows: Sequence[int], per_layer: Sequence[PackedKV]) -> None:
        """Copy ``per_layer`` (``len(rows) * block_size`` tokens, blocks in ``rows`` order)
        into ``rows`` on the current stream, ``non_blocking``: one copy per tensor and layer for
        one run or a source on the slab's device (``index_copy_``), else one per run (the caller
        orders it against readers: :mod:`~.staging`)."""
        assert len(per_layer) == len(self.layers)
        row_runs = runs(rows)
        srcs = [t for p in per_layer for t in p.tensors()]
        if len(row_runs) > 1 and srcs[0].device == self.device:
            index = torch.tensor(list(rows), dtype=torch.int64, device=self.device)
            dsts = [t for s in self.layers for t in s.tensors()]
            for dst, src in zip(dsts, srcs, strict=True):
                dst.index_copy_(0, index, src.reshape(len(rows), *dst.shape[1:]))
            return
        for run in row_runs:
            begin, tokens = run.offset * self.block_size, run.length * self.block_size
            dsts = [t for p in self.view(run.row, run.length) for t in p.tensors()]
            for dst, src in zip(dsts, srcs, strict=True):
                dst.copy_(src.narrow(0, begin, tokens), non_blocking=True)

    def staging(self, tokens: int, device: torch.device) -> list[PackedKV]:
        """Fresh contiguous per-layer buffers of ``tokens`` tokens in this slab's widths and
        dtypes on ``device`` (:mod:`~.staging`)."""
        out = []
        for slab in self.layers:
            k_codes, k_scale, v_codes, v_norm = (
                torch.empty((tokens, *t.shape[2:]), dtype=t.dtype, device=device)
                for t in slab.tensors()
            )
            out.append(
                dataclasses.replace(
                    slab.packed,
                    k_codes=k_codes,
                    k_scale=k_scale,
                    v_codes=v_codes,
                    v_norm=v_norm,
                    tokens=tokens,
                )
            )
        return out

    def ready_for_device(self) -> None:
        """Make the current CUDA stream wait for pending writes into a host slab."""
        if self._pending is not None:
            torch.cuda.current_stream().wait_event(self._pending)

    def ready_for_host(self) -> None:
        """Block until pending writes into a host slab are done (before reading it on the CPU)."""
        if self._pending is not None:
            self._pending.synchronize()
            self._pending = None
            self._inflight.clear()

    def clear(self) -> None:
        self._filled.clear()


def runs(rows: Sequence[int]) -> list[Run]:
    """``rows`` split into runs of consecutive rows, in order."""
    out: list[Run] = []
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            out.append(Run(start, rows[start], i - start))
            start = i
    return out


def first_invalid_block(blocks: int, per_layer: Sequence[PackedKV]) -> int | None:
    """Index of the first of ``blocks`` equal-sized blocks whose scales or norms are not finite
    in some layer of ``per_layer``, or None (one concatenation, one reduction, one sync)."""
    if blocks == 0:
        return None
    scales = [t.reshape(blocks, -1) for p in per_layer for t in (p.k_scale, p.v_norm)]
    good = torch.isfinite(torch.cat(scales, dim=1)).all(dim=1)
    flags = good.tolist()
    return flags.index(False) if False in flags else None
