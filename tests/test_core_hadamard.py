"""Block-diagonal random-sign Hadamard rotation: orthonormal, exact inverse, documented blocks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from polykv_vllm.core.hadamard import block_sizes, fwht, random_signs, rotate, unrotate

DIMS = [8, 16, 64, 80, 96, 112, 128, 256]


def _matrix(fn: Callable[[torch.Tensor], torch.Tensor], dim: int) -> torch.Tensor:
    """The matrix M with fn(x) = M x, by applying fn to the identity rows."""
    return fn(torch.eye(dim, dtype=torch.float64)).T


@pytest.mark.parametrize(
    ("dim", "blocks"),
    [(64, (64,)), (128, (128,)), (80, (64, 16)), (96, (64, 32)), (112, (64, 32, 16)), (6, (4, 2))],
)
def test_greedy_blocks(dim: int, blocks: tuple[int, ...]) -> None:
    assert block_sizes(dim) == blocks


@pytest.mark.parametrize("dim", DIMS)
def test_rotation_is_orthonormal_and_inverse_is_exact(dim: int) -> None:
    s = random_signs(dim, seed=3).to(torch.float64)
    r = _matrix(lambda x: rotate(x, s), dim)
    eye = torch.eye(dim, dtype=torch.float64)
    assert torch.allclose(r @ r.T, eye, atol=1e-12)
    x = torch.randn(5, 7, dim, dtype=torch.float64)
    assert torch.allclose(unrotate(rotate(x, s), s), x, atol=1e-12)
    assert torch.allclose(rotate(x, s), x @ r.T, atol=1e-12)


@pytest.mark.parametrize("dim", DIMS)
def test_plain_hadamard_is_symmetric_self_inverse(dim: int) -> None:
    h = _matrix(fwht, dim)
    assert torch.allclose(h, h.T, atol=1e-12)
    assert torch.allclose(h @ h, torch.eye(dim, dtype=torch.float64), atol=1e-12)
    # Each block is a normalized Sylvester Hadamard matrix: entries +-1/sqrt(m).
    start = 0
    for m in block_sizes(dim):
        blk = h[start : start + m, start : start + m]
        assert torch.allclose(blk.abs(), torch.full_like(blk, m**-0.5))
        start += m


def test_signs_are_seeded_pm1() -> None:
    a, b, c = random_signs(128, 0), random_signs(128, 0), random_signs(128, 1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert set(a.tolist()) == {-1.0, 1.0}
    assert a.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_keeps_dtype_and_norm(dtype: torch.dtype) -> None:
    x = torch.randn(3, 2, 96).to(dtype)
    y = rotate(x, random_signs(96, 0))
    assert y.dtype == dtype and y.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(
        torch.linalg.vector_norm(y.float(), dim=-1),
        torch.linalg.vector_norm(x.float(), dim=-1),
        rtol=tol,
    )


@pytest.mark.parametrize("dim", DIMS)
def test_cpu_matrix_product_equals_the_butterfly(dim: int) -> None:
    """On the CPU fwht is a product with hadamard_matrix; it must be the butterfly's transform."""
    from polykv_vllm.core.hadamard import fwht_butterfly, hadamard_matrix

    x = torch.randn(6, 3, dim, dtype=torch.float64)
    assert torch.allclose(fwht(x), fwht_butterfly(x), atol=1e-12)
    x32 = x.float()
    assert torch.allclose(fwht(x32), fwht_butterfly(x32), atol=1e-5)
    xb = x32.bfloat16()
    got = fwht(xb)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), fwht_butterfly(xb.float()), atol=2e-2)
    assert torch.equal(hadamard_matrix(dim), fwht_butterfly(torch.eye(dim, dtype=torch.float64)))
