"""LayerSpec owns the byte layout: what it allocates is exactly what it encodes, and its byte
count is the encoded tensors' bytes, for every bit width and odd head dims and lengths."""

from __future__ import annotations

import pytest
import torch

from polykv_vllm.core import CodecConfig, KVCodec, LayerSpec, PackedKV

SETTINGS = [(8, 3), (8, 4), (4, 2), (3, 3), (2, 4), (4, 4)]


def _spec(key_bits: int, value_bits: int, dim: int, norm_correction: bool = False) -> LayerSpec:
    return KVCodec(config=_config(key_bits, value_bits, norm_correction)).layer_spec(0, dim)


def _config(key_bits: int, value_bits: int, norm_correction: bool = False) -> CodecConfig:
    return CodecConfig(
        key_bits=key_bits,
        key_mode="int8" if key_bits == 8 else "rotated",
        value_bits=value_bits,
        norm_correction=norm_correction,
    )


def _layout(packed: PackedKV) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape), t.dtype) for t in packed.tensors()]


@pytest.mark.parametrize(("key_bits", "value_bits"), SETTINGS)
@pytest.mark.parametrize("dim", [64, 80, 90, 128])
@pytest.mark.parametrize(("tokens", "heads"), [(0, 2), (1, 1), (17, 3)])
def test_encode_returns_the_layout_the_spec_allocates(
    key_bits: int, value_bits: int, dim: int, tokens: int, heads: int
) -> None:
    spec = _spec(key_bits, value_bits, dim)
    gen = torch.Generator().manual_seed(dim + tokens)
    k, v = (torch.randn(tokens, heads, dim, generator=gen) for _ in range(2))
    packed = spec.encode(k, v)
    assert _layout(packed) == [(tuple(s), d) for s, d in spec.packed_shapes(tokens, heads)]
    assert _layout(spec.empty(tokens, heads, "cpu")) == _layout(packed)
    zeros = spec.zeros(tokens, heads, "cpu")
    assert _layout(zeros) == _layout(packed)
    assert all(not t.any() for t in zeros.tensors())
    assert packed.nbytes == spec.bytes_per_token_head * tokens * heads
    assert (packed.key_bits, packed.value_bits, packed.head_dim) == (key_bits, value_bits, dim)


@pytest.mark.parametrize(("key_bits", "value_bits"), SETTINGS)
def test_bytes_per_token_head_formula(key_bits: int, value_bits: int) -> None:
    """The documented sizes (docs/FORMAT.md): keys D + 2 (int8) or ceil(D/8)*b + 2, values
    ceil(D/8)*b + 2; at D = 90, ceil(90/8) = 12 groups."""
    spec = _spec(key_bits, value_bits, 90)
    keys = 90 + 2 if key_bits == 8 else 12 * key_bits + 2
    assert spec.bytes_per_token_head == keys + 12 * value_bits + 2
    assert KVCodec(config=CodecConfig()).bytes_per_token_head(128) == 180


@pytest.mark.parametrize(("key_bits", "value_bits"), SETTINGS)
@pytest.mark.parametrize("norm_correction", [False, True])
def test_spec_math_is_the_codec_math(key_bits: int, value_bits: int, norm_correction: bool) -> None:
    spec = _spec(key_bits, value_bits, 96, norm_correction)
    codec = KVCodec(config=_config(key_bits, value_bits, norm_correction))
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(9, 2, 96, generator=gen), torch.randn(9, 2, 96, generator=gen)
    ours, theirs = spec.encode(k, v), codec.encode(k, v)
    for a, b in zip(ours.tensors(), theirs.tensors(), strict=True):
        assert torch.equal(a, b)
    k2, v2 = spec.decode(ours)
    k3, v3 = codec.decode(theirs, dtype=torch.float32)
    assert k2.dtype == torch.float32 and torch.equal(k2, k3) and torch.equal(v2, v3)
    assert spec.keys.rotated == (key_bits != 8) and spec.values.rotated
    assert spec.stream("k") is spec.keys and spec.stream("v") is spec.values


def test_spec_refuses_mismatched_inputs() -> None:
    spec = _spec(8, 3, 64)
    x = torch.zeros(2, 1, 32)
    with pytest.raises(ValueError, match=r"\[tokens, kv_heads, 64\]"):
        spec.encode(x, x)
    other = _spec(4, 2, 64).encode(torch.zeros(2, 1, 64), torch.zeros(2, 1, 64))
    with pytest.raises(ValueError, match="does not match this spec"):
        spec.decode(other)
