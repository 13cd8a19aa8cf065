"""KVCodec: byte counts, layer specs against an independent reference, PackedKV operations,
dtype/device handling and input validation."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from polykv_vllm.core import PRESETS, CodecConfig, KVCodec, LayerSpec, PackedKV
from polykv_vllm.core.bitpack import unpack

DIMS = [64, 80, 96, 112, 128]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _kv(tokens: int, heads: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(tokens, heads, dim, generator=gen)
    k[..., 3] *= 20.0  # an outlier channel
    v = torch.randn(tokens, heads, dim, generator=gen) * 0.5
    return k, v


# --- bytes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dim", "expected"), [(128, 180), (64, 92), (80, 114), (96, 136), (112, 158)]
)
@pytest.mark.parametrize("tokens", [1, 17])
def test_default_bytes_per_token_head(dim: int, expected: int, tokens: int) -> None:
    """Default preset: keys D + 2 bytes, values 3D/8 + 2 bytes, from the tensors themselves."""
    heads = 3
    packed = KVCodec().encode(*_kv(tokens, heads, dim))
    assert packed.nbytes == expected * tokens * heads
    assert packed.k_codes.dtype == torch.int8 and packed.k_codes.shape == (tokens, heads, dim)
    assert packed.v_codes.dtype == torch.uint8
    assert packed.v_codes.shape == (tokens, heads, math.ceil(dim / 8) * 3)
    assert packed.k_scale.dtype == packed.v_norm.dtype == torch.float16
    assert packed.k_scale.shape == packed.v_norm.shape == (tokens, heads)


@pytest.mark.parametrize(("key_bits", "value_bits"), [(2, 2), (3, 3), (4, 2), (4, 4), (8, 4)])
@pytest.mark.parametrize("dim", [64, 128])
def test_bytes_for_every_bit_width(key_bits: int, value_bits: int, dim: int) -> None:
    cfg = CodecConfig(
        key_bits=key_bits, key_mode="int8" if key_bits == 8 else "rotated", value_bits=value_bits
    )
    codec = KVCodec(config=cfg)
    packed = codec.encode(*_kv(5, 2, dim))
    key_bytes = dim + 2 if key_bits == 8 else dim * key_bits // 8 + 2
    assert packed.nbytes == 5 * 2 * (key_bytes + dim * value_bits // 8 + 2)


@pytest.mark.parametrize("dim", [64, 128])
def test_aggressive_preset_ratio_over_30_layers(dim: int) -> None:
    """polykv-lite must give >= 4.5x fewer bytes than bf16 over a 30-layer model."""
    codec = KVCodec("polykv-lite", num_layers=30)
    k, v = _kv(4, 3, dim)
    total = sum(codec.encode(k, v, layer).nbytes for layer in range(30))
    bf16 = 30 * 2 * k.numel() * 2
    assert bf16 / total >= 4.5
    # the kept layers (0, 1 and the last) are at the default's bytes
    for kept in (0, 1, 29):
        assert codec.encode(k, v, kept).nbytes == KVCodec().encode(k, v).nbytes
    assert codec.encode(k, v, 2).nbytes < codec.encode(k, v, 0).nbytes


# --- accuracy / round trip ------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("dim", DIMS)
def test_round_trip_error_is_sane(preset: str, dim: int) -> None:
    codec = KVCodec(preset, num_layers=4)
    k, v = _kv(200, 2, dim, seed=dim)
    for layer in range(4):
        kb, vb = codec.layer_bits(layer)
        k2, v2 = codec.decode(codec.encode(k, v, layer), dtype=torch.float32)
        rel_k = float(((k - k2) ** 2).sum() / (k**2).sum())
        rel_v = float(((v - v2) ** 2).sum() / (v**2).sum())
        assert rel_k < (1e-3 if kb == 8 else 0.15)
        assert rel_v < {2: 0.13, 3: 0.04, 4: 0.011}[vb]


def _hadamard(m: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(m)


def _rotation(spec: LayerSpec, signs: torch.Tensor) -> torch.Tensor:
    """Dense R = blockdiag(H_m ...) @ diag(signs), built from the spec's tables only."""
    assert sum(spec.blocks) == spec.head_dim
    h = torch.block_diag(*[_hadamard(m) for m in spec.blocks])
    return h @ torch.diag(signs.to(torch.float64))


def _reference_rotated_decode(
    codes: torch.Tensor,
    norm: torch.Tensor,
    bits: int,
    spec: LayerSpec,
    signs: torch.Tensor,
    centroids: torch.Tensor,
) -> torch.Tensor:
    d = spec.head_dim
    idx = unpack(codes, bits, d).long()
    y = centroids.to(torch.float64)[idx] / math.sqrt(d)
    u = y @ _rotation(spec, signs)  # R^T y, row vectors
    if spec.norm_correction:
        u = u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    return u * norm.to(torch.float64).unsqueeze(-1)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("dim", [64, 112])
@pytest.mark.parametrize("norm_correction", [False, True])
def test_layer_spec_tables_are_what_the_codec_uses(
    preset: str, dim: int, norm_correction: bool
) -> None:
    """Decode independently from layer_spec's tables (dense matrices, float64) and compare."""
    cfg = PRESETS[preset].replace(norm_correction=norm_correction)
    codec = KVCodec(config=cfg, num_layers=3, head_dim=dim)
    k, v = _kv(40, 2, dim)
    for layer in range(3):
        spec = codec.layer_spec(layer)
        assert (spec.key_bits, spec.value_bits) == codec.layer_bits(layer)
        assert spec.value_centroids.shape == (2**spec.value_bits,)
        assert spec.value_signs.shape == (dim,) and spec.value_signs.dtype == torch.float32
        packed = codec.encode(k, v, layer)
        k2, v2 = codec.decode(packed, dtype=torch.float32)
        v_ref = _reference_rotated_decode(
            packed.v_codes,
            packed.v_norm,
            spec.value_bits,
            spec,
            spec.value_signs,
            spec.value_centroids,
        )
        assert torch.allclose(v2.double(), v_ref, atol=1e-5)
        # encode picks the nearest centroid of z = sqrt(D) R v / ||v||
        z = (
            (v.double() / torch.linalg.vector_norm(v.double(), dim=-1, keepdim=True))
            @ _rotation(spec, spec.value_signs).T
            * math.sqrt(dim)
        )
        nearest = (z[..., None] - spec.value_centroids.double()).abs().argmin(-1)
        got = unpack(packed.v_codes, spec.value_bits, dim).long()
        assert (nearest == got).float().mean() > 0.999  # float32 vs float64 ties at boundaries
        if spec.key_mode == "int8":
            assert spec.key_signs is None and spec.key_centroids is None
            assert packed.k_codes.dtype == torch.int8
        else:
            assert spec.key_signs is not None and spec.key_centroids is not None
            assert not torch.equal(spec.key_signs, spec.value_signs)
            k_ref = _reference_rotated_decode(
                packed.k_codes,
                packed.k_scale,
                spec.key_bits,
                spec,
                spec.key_signs,
                spec.key_centroids,
            )
            assert torch.allclose(k2.double(), k_ref, atol=1e-4)


def test_keys_use_seed_plus_one() -> None:
    rot = CodecConfig(key_bits=4, key_mode="rotated", seed=7)
    a = KVCodec(config=rot).layer_spec(0, 128)
    b = KVCodec(config=CodecConfig(seed=8)).layer_spec(0, 128)
    assert a.key_signs is not None
    assert torch.equal(a.key_signs, b.value_signs)


# --- PackedKV -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_slice_cat_pickle(preset: str) -> None:
    codec = KVCodec(preset, num_layers=2)
    k, v = _kv(37, 3, 80)
    whole = codec.encode(k, v, layer=1)
    parts = [whole.slice(0, 16), whole.slice(16, 32), whole.slice(32, 37)]
    assert [p.tokens for p in parts] == [16, 16, 5]
    joined = PackedKV.cat(parts)
    assert joined.tokens == 37 and joined.nbytes == whole.nbytes
    for a, b in zip(joined.tensors(), whole.tensors(), strict=True):
        assert torch.equal(a, b)
    # encoding is per token: encoding pieces gives the same bytes as slicing the whole
    piece = codec.encode(k[16:32], v[16:32], layer=1)
    for a, b in zip(piece.tensors(), parts[1].tensors(), strict=True):
        assert torch.equal(a, b)
    back = pickle.loads(pickle.dumps(whole))
    assert isinstance(back, PackedKV) and back.tokens == 37
    for a, b in zip(back.tensors(), whole.tensors(), strict=True):
        assert torch.equal(a, b)
    assert whole.slice(30, 100).tokens == 7 and whole.slice(-5, None).tokens == 5


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_zero_tokens(preset: str) -> None:
    codec = KVCodec(preset, num_layers=3)
    packed = codec.encode(torch.zeros(0, 2, 64), torch.zeros(0, 2, 64), layer=1)
    assert packed.tokens == 0 and packed.nbytes == 0
    k2, v2 = codec.decode(packed)
    assert k2.shape == v2.shape == (0, 2, 64)
    k, v = _kv(3, 2, 64)
    joined = PackedKV.cat([packed, codec.encode(k, v, layer=1)])
    assert joined.tokens == 3


def test_cat_rejects_mismatched_parts() -> None:
    k, v = _kv(4, 2, 64)
    a = KVCodec().encode(k, v)
    b = KVCodec("polykv-lite", num_layers=8).encode(k, v, layer=2)
    with pytest.raises(ValueError, match="key_bits=4 but part 0 has 8"):
        PackedKV.cat([a, b])
    with pytest.raises(ValueError, match="at least one part"):
        PackedKV.cat([])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_decode_honours_dtype_and_device(dtype: torch.dtype, device: str) -> None:
    codec = KVCodec()
    k, v = _kv(9, 2, 64)
    packed = codec.encode(k.to(torch.bfloat16), v.to(torch.bfloat16))
    k2, v2 = codec.decode(packed, dtype=dtype, device=device)
    for t in (k2, v2):
        assert t.dtype == dtype and t.device.type == device and t.shape == k.shape
    moved = packed.to(device)
    assert moved.device.type == device and moved.nbytes == packed.nbytes
    k3, _ = codec.decode(moved, dtype=torch.float32)
    assert k3.device.type == device
    assert torch.allclose(k3.cpu(), codec.decode(packed, dtype=torch.float32)[0])


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "v", "match"),
    [
        (torch.zeros(4, 64), torch.zeros(4, 64), "expected 3 dims"),
        (torch.zeros(4, 2, 64, dtype=torch.int32), torch.zeros(4, 2, 64), "floating dtype"),
        (torch.zeros(4, 2, 59), torch.zeros(4, 2, 59), "head_dim=59 is not supported"),
        (torch.zeros(4, 2, 6), torch.zeros(4, 2, 6), "even integers >= 8"),
        (torch.zeros(4, 2, 64), torch.zeros(4, 3, 64), "must have the same"),
    ],
)
def test_bad_inputs_raise(k: torch.Tensor, v: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KVCodec().encode(k, v)


def test_bad_codec_arguments_raise() -> None:
    with pytest.raises(ValueError, match=r"unknown codec preset 'nope'.*polykv-lite"):
        KVCodec("nope")
    with pytest.raises(ValueError, match="pass num_layers="):
        KVCodec("polykv-lite")
    codec = KVCodec("polykv-lite", num_layers=30)
    with pytest.raises(ValueError, match=r"num_layers=30 \(allowed 0..29\)"):
        codec.encode(*_kv(1, 1, 64), layer=30)
    with pytest.raises(ValueError, match="needs the head dim"):
        codec.layer_spec(0)
    with pytest.raises(ValueError, match="floating dtype"):
        codec.decode(codec.encode(*_kv(1, 1, 64)), dtype=torch.int8)
    with pytest.raises(ValueError, match="pass only one"):
        KVCodec("polykv", config=CodecConfig())
