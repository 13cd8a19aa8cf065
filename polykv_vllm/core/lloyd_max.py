"""Lloyd-Max scalar quantizers for the standard normal N(0, 1).

The codebooks are derived in code by the Lloyd algorithm (float64, exact Gaussian integrals via
``torch.special``), not copied from a table, and cached per bit width. They are the tables the
value quantizer (and the rotated key quantizer) map each rotated coordinate to.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["MAX_BITS", "MIN_BITS", "boundaries", "centroids", "distortion"]

MIN_BITS = 1
MAX_BITS = 4

_TOL = 1e-13
_MAX_ITERS = 100_000
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _pdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _cdf(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(x)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"Lloyd-Max bits={bits!r} is not supported: allowed integers are "
            f"{MIN_BITS}..{MAX_BITS}; pass one of those."
        )


def _cell_stats(
    edges: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probability, first and second moment of N(0,1) on each cell between ``edges``.

    ``edges``: float64 ``[L + 1]`` including -inf and +inf. Returns float64 ``[L]`` each.
    """
    pdf = _pdf(edges)
    pdf = torch.where(torch.isinf(edges), torch.zeros_like(pdf), pdf)
    cdf = _cdf(edges)
    xpdf = torch.where(torch.isinf(edges), torch.zeros_like(pdf), edges * pdf)
    prob = cdf[1:] - cdf[:-1]
    mean_mass = pdf[:-1] - pdf[1:]  # integral of x * pdf over the cell
    second = prob + xpdf[:-1] - xpdf[1:]  # integral of x^2 * pdf over the cell
    return prob, mean_mass, second


@functools.cache
def _solve(bits: int) -> tuple[tuple[float, ...], float]:
    levels = 2**bits
    # Start from the Gaussian quantiles of equal-probability cells: close to the optimum, so
    # the (linearly converging) Lloyd iteration needs few hundred steps even at 4 bits.
    p = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    c = torch.special.ndtri(p)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    for _ in range(_MAX_ITERS):
        edges = torch.cat([-inf, 0.5 * (c[1:] + c[:-1]), inf])
        prob, mean_mass, _ = _cell_stats(edges)
        new_c = mean_mass / prob
        # Keep the codebook exactly symmetric (the optimum is): removes round-off drift.
        new_c = 0.5 * (new_c - new_c.flip(0))
        delta = float((new_c - c).abs().max())
        c = new_c
        if delta < _TOL:
            break
    else:  # pragma: no cover - the iteration converges in well under the limit
        raise RuntimeError(f"Lloyd-Max iteration did not converge for bits={bits}")
    edges = torch.cat([-inf, 0.5 * (c[1:] + c[:-1]), inf])
    prob, mean_mass, second = _cell_stats(edges)
    # E[(X - c_i)^2] summed over the cells.
    mse = float((second - 2 * c * mean_mass + c * c * prob).sum())
    return tuple(float(x) for x in c), mse


def centroids(bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Lloyd-Max reconstruction levels for N(0, 1) at ``bits`` bits.

    Returns a new ``[2**bits]`` tensor of ``dtype`` in ascending order (code 0 = most negative).
    """
    _check_bits(bits)
    return torch.tensor(_solve(bits)[0], dtype=torch.float64).to(dtype)


def boundaries(bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decision thresholds between consecutive centroids: ``[2**bits - 1]`` ascending midpoints.

    A value equal to a threshold maps to the lower code (as ``argmin`` over distances would).
    """
    c = centroids(bits, torch.float64)
    return (0.5 * (c[1:] + c[:-1])).to(dtype)


def distortion(bits: int) -> float:
    """Theoretical MSE ``E[(X - Q(X))^2]`` of the ``bits``-bit Lloyd-Max quantizer, X ~ N(0, 1)."""
    _check_bits(bits)
    return _solve(bits)[1]
