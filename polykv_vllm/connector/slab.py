"""The worker's compressed store: preallocated per-layer slabs with one row per stored block.

A row holds one block (``block_size`` tokens, this rank's kv heads) of one layer in the codec's
own tensors (``docs/FORMAT.md``): ``k_codes [rows, bs, H, kw]``, ``k_scale [rows, bs, H]``,
``v_codes [rows, bs, H, vw]``, ``v_norm [rows, bs, H]``. Storing or loading a request's blocks
is one ``index_copy_`` / ``index_select`` per tensor and layer, whatever the number of blocks
(vLLM's CUDA blocks are 16 tokens: a 4K-token document is 256 blocks, so per-block tensors
would mean thousands of tiny copies and allocations). Rows are recycled through a free list;
the scheduler's budget guarantees a free row for every store it plans.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from polykv_vllm.core import KVCodec, PackedKV

__all__ = ["BlockSlab"]


@dataclass(frozen=True, eq=False)
class _LayerSlab:
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    v_codes: torch.Tensor
    v_norm: torch.Tensor
    key_bits: int
    value_bits: int

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
        self.layers: list[_LayerSlab] = []
        zero = torch.zeros(1, kv_heads, head_dim)
        for layer in layers:
            probe = codec.encode(zero, zero, layer)  # the widths and dtypes of this layer

            def alloc(t: torch.Tensor) -> torch.Tensor:
                shape = (capacity, block_size, *t.shape[1:])
                return torch.zeros(
                    shape, dtype=t.dtype, device=device, pin_memory=pin and device.type == "cpu"
                )

            self.layers.append(
                _LayerSlab(
                    k_codes=alloc(probe.k_codes),
                    k_scale=alloc(probe.k_scale),
                    v_codes=alloc(probe.v_codes),
                    v_norm=alloc(probe.v_norm),
                    key_bits=probe.key_bits,
                    value_bits=probe.value_bits,
                )
            )
        self.row_bytes = sum(
            t[0].numel() * t.element_size() for s in self.layers for t in s.tensors()
        )
        self._rows: dict[int, int] = {}
        self._free = list(range(capacity - 1, -1, -1))

    def __contains__(self, slot: int) -> bool:
        return slot in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the rows in use (measured row size times rows)."""
        return len(self._rows) * self.row_bytes

    def slots(self) -> list[int]:
        return list(self._rows)

    def row(self, slot: int) -> int:
        return self._rows[slot]

    def put(self, slots: Sequence[int], per_layer: Sequence[PackedKV]) -> None:
        """Store ``per_layer[i]`` (``len(slots) * block_size`` tokens, blocks in ``slots``
        order) into fresh rows."""
        assert len(per_layer) == len(self.layers)
        assert len(self._free) >= len(slots), "the scheduler planned more blocks than fit"
        rows = [self._free.pop() for _ in slots]
        for slot, row in zip(slots, rows, strict=True):
            self._rows[slot] = row
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        n = len(rows)
        for slab, packed in zip(self.layers, per_layer, strict=True):
            for dst, src in zip(slab.tensors(), packed.tensors(), strict=True):
                src = src.reshape(n, self.block_size, *src.shape[1:]).to(self.device)
                dst.index_copy_(0, index, src)

    def get(self, slots: Sequence[int]) -> list[PackedKV]:
        """The blocks of ``slots`` (all present), per layer, tokens in ``slots`` order."""
        index = torch.tensor([self._rows[s] for s in slots], dtype=torch.int64)
        index = index.to(self.device)
        tokens = len(slots) * self.block_size
        out = []
        for slab in self.layers:
            k_codes, k_scale, v_codes, v_norm = (
                t.index_select(0, index).reshape(tokens, *t.shape[2:]) for t in slab.tensors()
            )
            out.append(
                PackedKV(
                    k_codes=k_codes,
                    k_scale=k_scale,
                    v_codes=v_codes,
                    v_norm=v_norm,
                    tokens=tokens,
                    kv_heads=self.kv_heads,
                    head_dim=self.head_dim,
                    key_bits=slab.key_bits,
                    value_bits=slab.value_bits,
                )
            )
        return out

    def first_invalid(self, slots: Sequence[int], per_layer: Sequence[PackedKV]) -> int | None:
        """Index in ``slots`` of the first block whose scales/norms are not finite in some
        layer (one device sync for the whole request), or None."""
        bad = torch.zeros(len(slots), dtype=torch.bool, device=per_layer[0].device)
        for p in per_layer:
            for t in (p.k_scale, p.v_norm):
                rows = t.reshape(len(slots), -1)
                bad |= ~torch.isfinite(rows).all(dim=1)
        flags = bad.tolist()
        return flags.index(True) if True in flags else None

    def drop(self, slot: int) -> None:
        row = self._rows.pop(slot, None)
        if row is not None:
            self._free.append(row)

    def clear(self) -> None:
        for slot in list(self._rows):
            self.drop(slot)
