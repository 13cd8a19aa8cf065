"""Device tables of the Triton kernels, built from the codec's :class:`~polykv_vllm.core.LayerSpec`.

Nothing here re-derives the codec: centroids, boundaries and signs are the spec's own tables,
and the ±1 Hadamard matrix is obtained by applying the codec's ``fwht`` to the identity, so
kernel and codec cannot drift apart. Tables are cached per (spec contents, stream, device).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from polykv_vllm.core import LayerSpec, lloyd_max
from polykv_vllm.core.hadamard import fwht

__all__ = ["StreamTables", "pow2", "spec_key", "stream_tables"]


@dataclass(frozen=True)
class StreamTables:
    """Device tables of one rotated stream (keys or values) of one spec."""

    centroids: torch.Tensor  # fp32 [2**bits]
    boundaries: torch.Tensor  # fp32 [2**bits - 1]
    signs: torch.Tensor  # fp32 [DP], 0 beyond D
    dec_colscale: torch.Tensor  # fp32 [DP]: sign / sqrt(m * D)
    enc_colscale: torch.Tensor  # fp32 [DP]: sqrt(D / m)
    hadamard: torch.Tensor  # fp16 [DP, DP]: ±1 block diagonal


def pow2(n: int) -> int:
    """``n`` rounded up to a power of two, at least 16 (``tl.dot`` needs K >= 16)."""
    return max(16, 1 << (n - 1).bit_length())


_SPEC_KEYS: dict[int, tuple[LayerSpec, int]] = {}
_SPEC_IDS: dict[tuple[object, ...], int] = {}


def spec_key(spec: LayerSpec) -> int:
    """A small integer naming everything in ``spec`` that the kernels read: equal tables give
    equal keys. Memoized per spec object (specs are frozen; the codec hands out one object per
    setting), so the per-call cost is one dict lookup."""
    hit = _SPEC_KEYS.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    key = _SPEC_IDS.setdefault(_compute_spec_key(spec), len(_SPEC_IDS))
    _SPEC_KEYS[id(spec)] = (spec, key)
    return key


def _compute_spec_key(spec: LayerSpec) -> tuple[object, ...]:

    def tab(t: torch.Tensor | None) -> tuple[float, ...] | None:
        return None if t is None else tuple(t.detach().cpu().double().tolist())

    return (
        spec.head_dim,
        spec.key_bits,
        spec.value_bits,
        spec.key_mode,
        tab(spec.key_centroids),
        tab(spec.key_signs),
        tab(spec.value_centroids),
        tab(spec.value_signs),
        spec.blocks,
        spec.norm_correction,
    )


@functools.cache
def _hadamard_pm1(blocks: tuple[int, ...]) -> torch.Tensor:
    """The codec's block-diagonal Hadamard as a ±1 matrix ``M`` (fp64 ``[D, D]``, exact), with
    ``fwht(x) == (x @ M.T) * (1/sqrt(m) per output column)``."""
    d = sum(blocks)
    basis = fwht(torch.eye(d, dtype=torch.float64))  # row i = fwht(e_i) = column i of H
    scale = torch.cat([torch.full((m,), math.sqrt(m), dtype=torch.float64) for m in blocks])
    pm1 = torch.round(basis * scale[:, None])
    if not torch.equal(pm1.abs(), (basis != 0).double()):
        raise AssertionError("fwht of the identity is not a scaled ±1 block-diagonal matrix")
    return pm1.T.contiguous()


_TABLES: dict[tuple[int, str, str], StreamTables] = {}


def stream_tables(spec: LayerSpec, stream: str, device: torch.device) -> StreamTables:
    """The tables of a rotated ``stream`` (``"k"`` or ``"v"``) of ``spec`` on ``device``."""
    key = (spec_key(spec), stream, str(device))
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    d = spec.head_dim
    dp = pow2(d)
    st = spec.stream("k" if stream == "k" else "v")
    assert st.centroids is not None and st.signs is not None, "int8 streams have no tables"
    bits, cent, signs = st.bits, st.centroids, st.signs
    m = torch.cat([torch.full((b,), float(b), dtype=torch.float64) for b in spec.blocks])
    s = signs.to(torch.float64)
    pad = dp - d
    had = torch.zeros(dp, dp, dtype=torch.float64)
    had[:d, :d] = _hadamard_pm1(tuple(spec.blocks))
    tables = StreamTables(
        centroids=cent.to(torch.float32).to(device),
        boundaries=lloyd_max.boundaries(bits).to(torch.float32).to(device),
        signs=torch.nn.functional.pad(s, (0, pad)).to(torch.float32).to(device),
        dec_colscale=torch.nn.functional.pad(s / torch.sqrt(m * d), (0, pad))
        .to(torch.float32)
        .to(device),
        enc_colscale=torch.nn.functional.pad(torch.sqrt(d / m), (0, pad))
        .to(torch.float32)
        .to(device),
        hadamard=had.to(torch.float16).to(device),
    )
    _TABLES[key] = tables
    return tables
