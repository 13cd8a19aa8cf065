"""Quantizer accuracy: int8 keys within half a step, rotated Lloyd-Max at its theoretical MSE."""

from __future__ import annotations

import pytest
import torch

from polykv_vllm.core import CodecConfig, KVCodec, lloyd_max
from polykv_vllm.core.hadamard import random_signs
from polykv_vllm.core.quantizers import int8_decode, int8_encode, rotated_decode, rotated_encode

DIMS = [64, 80, 96, 112, 128]


def _keys(tokens: int, heads: int, dim: int, seed: int) -> torch.Tensor:
    """Gaussian keys with a few large outlier channels, as real keys have."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(tokens, heads, dim, generator=gen)
    k[..., :: max(dim // 4, 1)] *= 12.0
    return k


@pytest.mark.parametrize("dim", [8, 59, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_error_within_half_step(dim: int, dtype: torch.dtype) -> None:
    k = _keys(257, 3, dim, seed=dim).to(dtype)
    codes, scale = int8_encode(k)
    assert codes.dtype == torch.int8 and codes.shape == k.shape
    assert scale.dtype == torch.float16 and scale.shape == k.shape[:2]
    assert int(codes.abs().max()) <= 127
    kf = k.float()
    # The stored (fp16) scale is within fp16 rounding of max|k|/127.
    exact = kf.abs().amax(-1) / 127
    assert torch.allclose(scale.float(), exact, rtol=2**-11, atol=0)
    err = (int8_decode(codes, scale) - kf).abs()
    step = scale.float().unsqueeze(-1)
    # Half a step of the stored scale; if fp16 rounded the scale down the clamp at 127 adds
    # at most 127 * 2**-11 steps (< 0.07), still inside half a step. 1e-6 covers fp32 math.
    assert torch.all(err <= step / 2 + 1e-6 * kf.abs())


def test_int8_zero_rows_and_tiny_rows() -> None:
    k = torch.zeros(2, 2, 16)
    k[1, 0] = 1e-12  # max/127 underflows fp16: stored as scale 0, codes 0
    codes, scale = int8_encode(k)
    assert torch.equal(scale, torch.zeros(2, 2, dtype=torch.float16))
    assert torch.equal(codes, torch.zeros_like(codes))
    assert torch.equal(int8_decode(codes, scale), torch.zeros(2, 2, 16))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dim", DIMS)
def test_rotated_distortion_matches_lloyd_max_theory(bits: int, dim: int) -> None:
    """Compare E||u - u'||^2 of unit vectors u = v/||v|| with the Lloyd-Max MSE per coordinate.

    After rotation, z = sqrt(D) * R u has ~N(0, 1) coordinates, and
    ||u - u'||^2 = ||R u - R u'||^2 = (1/D) * sum_i (z_i - Q(z_i))^2, i.e. D * (MSE per unit-vector
    coordinate) = mean over coordinates of the scalar error, whose theory is distortion(bits).
    Measured on Gaussian v (20k vectors); must be within 10% of theory.
    """
    gen = torch.Generator().manual_seed(100 * bits + dim)
    v = torch.randn(5000, 4, dim, generator=gen) * 3.0
    signs = random_signs(dim, seed=0)
    packed, norm = rotated_encode(v, bits, signs, lloyd_max.boundaries(bits))
    assert packed.dtype == torch.uint8 and packed.shape == (5000, 4, -(-dim // 8) * bits)
    v2 = rotated_decode(packed, norm, bits, signs, lloyd_max.centroids(bits), False)
    n = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    unit_err = ((v / n - v2 / norm.float().unsqueeze(-1)) ** 2).sum(-1).mean()
    theory = lloyd_max.distortion(bits)
    assert float(unit_err) == pytest.approx(theory, rel=0.10)
    # The whole codec (fp16 norm included) gives the same relative error.
    rel = float((((v - v2) ** 2).sum(-1) / (n.squeeze(-1) ** 2)).mean())
    assert rel == pytest.approx(theory, rel=0.10)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_norm_correction_restores_norm(bits: int) -> None:
    v = torch.randn(300, 2, 128)
    signs = random_signs(128, seed=5)
    packed, norm = rotated_encode(v, bits, signs, lloyd_max.boundaries(bits))
    v2 = rotated_decode(packed, norm, bits, signs, lloyd_max.centroids(bits), True)
    assert torch.allclose(torch.linalg.vector_norm(v2, dim=-1), norm.float(), rtol=1e-5)
    # Norm correction changes the error only a little (it trades a bias for a variance).
    plain = rotated_decode(packed, norm, bits, signs, lloyd_max.centroids(bits), False)
    err_c = float(((v - v2) ** 2).sum() / (v**2).sum())
    err_p = float(((v - plain) ** 2).sum() / (v**2).sum())
    assert err_c < 1.25 * err_p


@pytest.mark.parametrize("key_bits", [2, 3, 4])
def test_rotated_keys_distortion(key_bits: int) -> None:
    cfg = CodecConfig(key_bits=key_bits, key_mode="rotated", value_bits=2)
    codec = KVCodec(config=cfg)
    k = torch.randn(2000, 2, 128)
    k2, _ = codec.decode(codec.encode(k, k), dtype=torch.float32)
    rel = float((((k - k2) ** 2).sum(-1) / (k**2).sum(-1)).mean())
    assert rel == pytest.approx(lloyd_max.distortion(key_bits), rel=0.10)


def test_zero_vectors_decode_to_zero() -> None:
    v = torch.zeros(3, 2, 64)
    signs = random_signs(64, seed=0)
    packed, norm = rotated_encode(v, 3, signs, lloyd_max.boundaries(3))
    for corr in (False, True):
        out = rotated_decode(packed, norm, 3, signs, lloyd_max.centroids(3), corr)
        assert torch.equal(out, torch.zeros_like(v))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codes_equal_bucketize_including_values_on_a_threshold(bits: int) -> None:
    from polykv_vllm.core.quantizers import _bucket

    bounds = lloyd_max.boundaries(bits).to(torch.float32)
    z = torch.cat([torch.randn(4096) * 1.5, bounds, bounds.nextafter(torch.tensor(9.0))])
    assert torch.equal(_bucket(z, bounds).to(torch.int64), torch.bucketize(z, bounds))
