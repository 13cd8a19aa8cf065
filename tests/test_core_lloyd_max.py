"""Lloyd-Max codebooks derived in code match the published N(0,1) quantizers."""

from __future__ import annotations

import pytest
import torch

from polykv_vllm.core import lloyd_max

# Max (1960) / Lloyd (1982) optimal quantizers for N(0, 1): positive half of the codebook.
PUBLISHED = {
    1: [0.7979],
    2: [0.4528, 1.510],
    3: [0.245, 0.756, 1.344, 2.152],
    4: [0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733],
}
# Published MSE distortion of the same quantizers.
PUBLISHED_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_centroids_match_published(bits: int) -> None:
    c = lloyd_max.centroids(bits, torch.float64)
    assert c.shape == (2**bits,)
    assert torch.all(c[1:] > c[:-1]), "centroids must be ascending"
    assert torch.allclose(c, -c.flip(0)), "codebook of a symmetric pdf is symmetric"
    expected = torch.tensor(PUBLISHED[bits], dtype=torch.float64)
    assert torch.allclose(c[2 ** (bits - 1) :], expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_distortion_matches_published_and_monte_carlo(bits: int) -> None:
    assert lloyd_max.distortion(bits) == pytest.approx(PUBLISHED_MSE[bits], rel=2e-3)
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(400_000, generator=gen, dtype=torch.float64)
    c = lloyd_max.centroids(bits, torch.float64)
    q = c[torch.bucketize(x, lloyd_max.boundaries(bits, torch.float64))]
    mc = float(((x - q) ** 2).mean())
    assert mc == pytest.approx(lloyd_max.distortion(bits), rel=0.02)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_boundaries_are_nearest_centroid_rule(bits: int) -> None:
    x = torch.linspace(-4, 4, 10_001, dtype=torch.float64)
    c = lloyd_max.centroids(bits, torch.float64)
    by_argmin = (x[:, None] - c[None, :]).abs().argmin(dim=1)
    by_bucket = torch.bucketize(x, lloyd_max.boundaries(bits, torch.float64))
    assert torch.equal(by_argmin, by_bucket)


@pytest.mark.parametrize("bits", [0, 5, 2.0, None])
def test_bad_bits_raise(bits: object) -> None:
    with pytest.raises(ValueError, match="allowed integers are 1..4"):
        lloyd_max.centroids(bits)  # type: ignore[arg-type]
