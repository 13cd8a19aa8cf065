"""Seeded random-sign, block-diagonal, normalized Walsh-Hadamard rotation.

``R = H_blockdiag · diag(s)`` acts on the last dim ``D`` of a tensor. ``D`` is split greedily into
descending powers of two (``80 = 64 + 16``, ``96 = 64 + 32``, ``112 = 64 + 32 + 16``) and each
block gets its own normalized Hadamard transform (scaled by ``1/sqrt(m)``), so ``R`` is orthonormal
for any even ``D``: ``R^T R = I``. ``s`` is a ±1 sign vector drawn from a seeded
``torch.Generator`` (see :func:`random_signs`).
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "block_sizes",
    "fwht",
    "fwht_butterfly",
    "hadamard_matrix",
    "random_signs",
    "rotate",
    "unrotate",
]


@functools.cache
def block_sizes(dim: int) -> tuple[int, ...]:
    """Greedy split of ``dim`` into descending powers of two, e.g. ``112 -> (64, 32, 16)``."""
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"Hadamard dim={dim!r} is invalid: a positive integer is required.")
    blocks = []
    rest = dim
    while rest:
        m = 1 << (rest.bit_length() - 1)
        blocks.append(m)
        rest -= m
    return tuple(blocks)


def random_signs(dim: int, seed: int) -> torch.Tensor:
    """The ±1 sign vector ``s``: fp32 ``[dim]``.

    Defined exactly as ``torch.randint(0, 2, (dim,), generator=torch.Generator().manual_seed(seed))
    * 2 - 1`` (CPU generator), so every implementation that takes this table agrees.
    """
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int64)
    return (bits * 2 - 1).to(torch.float32)


def _fwht_pow2(x: torch.Tensor) -> torch.Tensor:
    """Normalized FWHT over the last dim (a power of two ``m``) of ``x``: ``[..., m]``."""
    m = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < m:
        y = x.reshape(*lead, m // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, m)
        h *= 2
    return x * (1.0 / math.sqrt(m))


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Block-diagonal normalized Walsh-Hadamard transform over the last dim of ``x``.

    ``x``: float ``[..., D]``; returns a new tensor of the same shape and dtype. The transform is
    symmetric and its own inverse (``fwht(fwht(x)) == x`` up to round-off).

    On the CPU it is one matrix product with the transform's matrix (built once per ``D`` from
    the butterfly below; faster there than the butterfly's log2(D) passes, see
    ``benchmarks/codec_cpu_speed.py``), in float32 (or float64 for float64 input); on other
    devices the butterfly itself, in the input's dtype.
    Both agree to float round-off.
    """
    if x.device.type == "cpu":
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (x.to(compute) @ hadamard_matrix(x.shape[-1], compute)).to(x.dtype)
    return fwht_butterfly(x)


def fwht_butterfly(x: torch.Tensor) -> torch.Tensor:
    """:func:`fwht` by butterflies (the definition; any device and dtype)."""
    blocks = block_sizes(x.shape[-1])
    if len(blocks) == 1:
        return _fwht_pow2(x)
    parts = torch.split(x, list(blocks), dim=-1)
    return torch.cat([_fwht_pow2(p) for p in parts], dim=-1)


@functools.cache
def hadamard_matrix(dim: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The symmetric ``[dim, dim]`` matrix ``H`` of :func:`fwht` (``fwht(x) == x @ H``), on the
    CPU: the butterfly applied to the identity in float64, so entries are exactly
    ``±1/sqrt(m)`` inside each block and 0 outside, then cast to ``dtype``."""
    eye = torch.eye(dim, dtype=torch.float64)
    return fwht_butterfly(eye).to(dtype)


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``y = R x`` over the last dim: ``x`` float ``[..., D]``, ``signs`` ±1 ``[D]``."""
    return fwht(x * signs.to(device=x.device, dtype=x.dtype))


def unrotate(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``x = R^T y`` over the last dim (the exact inverse of :func:`rotate`)."""
    return fwht(y) * signs.to(device=y.device, dtype=y.dtype)
