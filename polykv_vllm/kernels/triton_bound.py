"""The Triton kernels bound to one model's paged caches: the connector's per-transfer launcher.

:func:`.triton_plan.plan_decompress_layers` / :func:`~.triton_plan.plan_compress_layers` check
every argument and rebuild every table on each call: for the 32 layers of Llama-3-8B that is a
few milliseconds of host time per transfer (``benchmarks/profile_hit.py`` found ~9 ms of host
time in the connector's store and load hooks per request on an H200, most of it this and the
per-layer views of the store). A connector moves blocks of the *same* caches on every step, so
:class:`BoundPagedKernels` validates the caches and builds what does not change once: the
grouping of layers, the caches' address tables, the codec's tables, the launch metadata. A
transfer then only says where its compressed tensors are (:class:`PackedAddresses`, plain
integers the store computes by arithmetic) and which blocks: one small host-to-device copy of
the address table and two launches per group of layers.

The addresses may point into device memory or into pinned host memory: with CUDA's unified
addressing a pinned host allocation has the same address on the device, so a kernel reads a
pinned store directly over PCIe (no staging copy, no per-tensor copies). The caller keeps the
memory alive and unchanged until the launches have run (a store's rows are, by construction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton

from polykv_vllm.core import LayerSpec
from polykv_vllm.kernels.addresses import PackedAddresses
from polykv_vllm.kernels.layout import check_cache_pair
from polykv_vllm.kernels.triton_decode import decode_kernel
from polykv_vllm.kernels.triton_encode import encode_kernel
from polykv_vllm.kernels.triton_plan import (
    DEFAULT_DECODE_CONFIG,
    DEFAULT_ENCODE_CONFIG,
    KernelConfig,
    _grid,
    _kernel,
    stream_constants,
)
from polykv_vllm.kernels.triton_tables import spec_key

__all__ = ["BoundPagedKernels"]


@dataclass(frozen=True)
class _Stream:
    """What one launch of one stream (keys or values) of one group of layers keeps."""

    cache_table: torch.Tensor  # int64 [layers] on the device
    cache_aligned: bool
    luts_decode: tuple[torch.Tensor, ...]
    luts_encode: tuple[torch.Tensor, ...]
    meta_decode: dict[str, Any]
    meta_encode: dict[str, Any]
    row_bytes: int


@dataclass(frozen=True)
class _Group:
    layers: tuple[int, ...]
    k: _Stream
    v: _Stream
    unit_scales: torch.Tensor  # fp32 ones [layers] (float caches)
    strides: tuple[tuple[int, ...], tuple[int, ...]]  # key / value cache strides


class BoundPagedKernels:
    """Decode into / encode from one model's paged caches (``key_caches[i]`` /
    ``value_caches[i]``, views from :func:`~.layout.split_kv_cache`, layer ``i`` encoded with
    ``specs[i]``), validated once (module docstring)."""

    def __init__(
        self,
        specs: Sequence[LayerSpec],
        key_caches: Sequence[torch.Tensor],
        value_caches: Sequence[torch.Tensor],
        *,
        decode_config: KernelConfig = DEFAULT_DECODE_CONFIG,
        encode_config: KernelConfig = DEFAULT_ENCODE_CONFIG,
    ) -> None:
        assert len(specs) == len(key_caches) == len(value_caches) > 0
        self.device = key_caches[0].device
        self.num_layers = len(specs)
        self.decode_config = decode_config
        self.encode_config = encode_config
        shapes = set()
        for s, kc, vc in zip(specs, key_caches, value_caches, strict=True):
            shapes.add(check_cache_pair(kc, vc, s)[1:])
            if kc.device != self.device:
                raise ValueError(f"all caches must be on {self.device}; got one on {kc.device}")
        if len(shapes) != 1:
            raise ValueError(f"caches of different block sizes / heads: {sorted(shapes)}")
        ((self.block_size, self.kv_heads),) = shapes
        self.head_dim = specs[0].head_dim
        self._dummy = torch.zeros(1, dtype=torch.int64, device=self.device)
        groups: dict[tuple[object, ...], list[int]] = {}
        for i, (s, kc, vc) in enumerate(zip(specs, key_caches, value_caches, strict=True)):
            key = (spec_key(s), kc.dtype, kc.shape, kc.stride(), vc.stride())
            groups.setdefault(key, []).append(i)
        self._groups = [
            self._group(tuple(idx), specs[idx[0]], key_caches, value_caches)
            for idx in groups.values()
        ]

    def _group(
        self,
        layers: tuple[int, ...],
        spec: LayerSpec,
        key_caches: Sequence[torch.Tensor],
        value_caches: Sequence[torch.Tensor],
    ) -> _Group:
        streams = []
        for name, caches in (("k", key_caches), ("v", value_caches)):
            group = [caches[i] for i in layers]
            st = spec.stream("k" if name == "k" else "v")
            addr = [c.data_ptr() for c in group]
            luts_dec, meta_dec = stream_constants(
                spec, name, group[0].dtype, self.device, False, self._dummy
            )
            luts_enc, meta_enc = stream_constants(
                spec, name, group[0].dtype, self.device, True, self._dummy
            )
            table = torch.tensor(addr, dtype=torch.int64).to(self.device)
            streams.append(
                _Stream(
                    cache_table=table,
                    cache_aligned=all(a % 16 == 0 for a in addr),
                    luts_decode=luts_dec,
                    luts_encode=luts_enc,
                    meta_decode=meta_dec,
                    meta_encode=meta_enc,
                    row_bytes=st.row_bytes,
                )
            )
        ones = torch.ones(len(layers), dtype=torch.float32, device=self.device)
        strides = (key_caches[layers[0]].stride(), value_caches[layers[0]].stride())
        return _Group(layers, streams[0], streams[1], ones, strides)

    # --- transfers -------------------------------------------------------------------------

    def decompress(
        self,
        src: PackedAddresses,
        block_ids: torch.Tensor,
        k_scales: Sequence[float] | None = None,
        v_scales: Sequence[float] | None = None,
    ) -> None:
        """Decode ``src`` (every bound layer, ``src.tokens`` tokens) into the blocks
        ``block_ids`` (int64 on the caches' device, one id per kernel block)."""
        self._run(src, block_ids, k_scales, v_scales, encode=False)

    def compress(
        self,
        dst: PackedAddresses,
        block_ids: torch.Tensor,
        k_scales: Sequence[float] | None = None,
        v_scales: Sequence[float] | None = None,
    ) -> None:
        """Encode the first ``dst.tokens`` tokens held in ``block_ids`` into ``dst``."""
        self._run(dst, block_ids, k_scales, v_scales, encode=True)

    def _run(
        self,
        at: PackedAddresses,
        block_ids: torch.Tensor,
        k_scales: Sequence[float] | None,
        v_scales: Sequence[float] | None,
        encode: bool,
    ) -> None:
        if at.tokens == 0:
            return
        n = self.num_layers
        assert len(at.k_codes) == len(at.k_scale) == len(at.v_codes) == len(at.v_norm) == n
        assert block_ids.numel() >= -(-at.tokens // self.block_size), "too few block ids"
        # one host-to-device copy for every group's address tables: [codes | scales] per stream
        flat: list[int] = []
        for g in self._groups:
            for codes, norms in ((at.k_codes, at.k_scale), (at.v_codes, at.v_norm)):
                flat.extend(codes[i] for i in g.layers)
                flat.extend(norms[i] for i in g.layers)
        aligned = all(a % 16 == 0 for a in flat)
        table = torch.tensor(flat, dtype=torch.int64)
        if self.device.type == "cuda":
            table = table.to(self.device, non_blocking=True)
        kernel = _kernel(encode_kernel if encode else decode_kernel, self.device)
        config = self.encode_config if encode else self.decode_config
        num_rows = at.tokens * self.kv_heads
        tiles = triton.cdiv(num_rows, config.rows)
        off = 0
        for g in self._groups:
            m = len(g.layers)
            for stream, cache_scales, strides in (
                (g.k, k_scales, g.strides[0]),
                (g.v, v_scales, g.strides[1]),
            ):
                codes_tab, scale_tab = table[off : off + m], table[off + m : off + 2 * m]
                off += 2 * m
                if cache_scales is None:
                    cscale = g.unit_scales
                else:
                    cscale = torch.tensor([cache_scales[i] for i in g.layers], dtype=torch.float32)
                    if self.device.type == "cuda":
                        cscale = cscale.to(self.device, non_blocking=True)
                total = tiles * m
                meta = stream.meta_encode if encode else stream.meta_decode
                extra = {
                    "ALIGNED": aligned and stream.cache_aligned,
                    "ROWS": config.rows,
                    "num_warps": config.num_warps,
                    "num_stages": config.num_stages,
                }
                if encode:
                    head: tuple[Any, ...] = (stream.cache_table, codes_tab, scale_tab, block_ids)
                    luts = stream.luts_encode
                else:
                    head = (codes_tab, scale_tab, stream.cache_table, block_ids)
                    luts = stream.luts_decode
                kernel[(_grid(total, self.device, config),)](
                    *head,
                    *luts,
                    cscale,
                    num_rows,
                    tiles,
                    total,
                    self.kv_heads,
                    self.head_dim,
                    self.block_size,
                    stream.row_bytes,
                    *strides,
                    **meta,
                    **extra,
                )
