"""Paged kernels: torch reference vs the codec (exact), Triton vs the reference.

- The torch reference must equal ``KVCodec.decode`` scattered into blocks, and ``KVCodec.encode``
  of the gathered tokens, bit for bit.
- Triton decode: the flash-attention rule — the kernel's max error against the float32 codec
  decode is at most 2x that of the same decode done by torch in the cache dtype.
- Triton encode: int8 key codes and scales bit-exact; rotated codes exact except where a rotated
  coordinate lies within 1e-4 of a decision boundary (float summation order), norms within one
  fp16 ulp.
- Every run poisons the cache (NaN) and checks that exactly the document's slots were written.

Triton runs on CUDA when there is a GPU; on a CPU-only machine ``test_triton_interpreter`` reruns
the Triton tests of this file in a child process under Triton's interpreter
(``TRITON_INTERPRET=1`` must be set before triton is imported, so it cannot run in-process).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from polykv_vllm.core import CodecConfig, KVCodec, LayerSpec, PackedKV, get_preset, lloyd_max
from polykv_vllm.core.bitpack import unpack
from polykv_vllm.core.hadamard import fwht, rotate
from polykv_vllm.kernels import (
    compress_from_paged,
    compress_layers_from_paged,
    decompress_into_paged,
    decompress_layers_into_paged,
    resolve_backend,
    split_kv_cache,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
CHILD = os.environ.get("POLYKV_TRITON_CHILD") == "1"
if torch.cuda.is_available():
    TRITON_DEVICE: str | None = "cuda"
elif CHILD and os.environ.get("TRITON_INTERPRET") == "1":
    TRITON_DEVICE = "cpu"
else:
    TRITON_DEVICE = None
NO_TRITON_DEVICE = (
    "no CUDA GPU in this process: on CPU these run in test_triton_interpreter's child process"
)


# Codec settings under test, independent of how the named presets evolve: the default preset,
# rotated 4-bit keys / 2-bit values with norm correction (layers 0 and -1 kept at K8/V3, as the
# aggressive preset does), and rotated 3-bit keys / 4-bit values without norm correction.
CONFIGS = {
    "polykv": get_preset("polykv"),
    "k4v2nc": CodecConfig(
        key_bits=4, key_mode="rotated", value_bits=2, norm_correction=True, keep_layers=(0, -1)
    ),
    "k3v4": CodecConfig(key_bits=3, key_mode="rotated", value_bits=4),
}


def _codec(name: str, num_layers: int) -> KVCodec:
    return KVCodec(config=CONFIGS[name], num_layers=num_layers)


def _layer_case(
    setting: str, head_dim: int, tokens: int, heads: int, layer: int, device: str
) -> tuple[KVCodec, LayerSpec, PackedKV, torch.Tensor, torch.Tensor]:
    codec = _codec(setting, 4)
    spec = codec.layer_spec(layer, head_dim)
    g = torch.Generator().manual_seed(tokens * 131 + head_dim)
    k = torch.randn(tokens, heads, head_dim, generator=g) * (
        1 + torch.rand(1, 1, head_dim, generator=g)
    )
    v = torch.randn(tokens, heads, head_dim, generator=g)
    k[0, 0] = 0.0  # a zero row: scale 0 / norm 0 must decode to zeros
    packed = codec.encode(k.to(device), v.to(device), layer)
    return codec, spec, packed, k, v


def _paged_cache(
    num_blocks: int,
    heads: int,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    layout: str,
    device: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A NaN-poisoned vLLM FlashAttention cache (logical [B, H, N, 2D]) and its K/V views."""
    if layout == "NHD":
        kv = torch.empty(num_blocks, block_size, heads, 2 * head_dim, dtype=dtype, device=device)
        kv = kv.transpose(1, 2)
    else:
        kv = torch.empty(num_blocks, heads, block_size, 2 * head_dim, dtype=dtype, device=device)
    kv.fill_(float("nan"))
    k, v = split_kv_cache(kv, head_dim)
    return kv, k, v


def _block_ids(
    tokens: int, block_size: int, num_blocks: int, seed: int, device: str
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    needed = -(-tokens // block_size)
    return torch.randperm(num_blocks, generator=g)[:needed].to(device)


def _written_mask(
    num_blocks: int, block_size: int, block_ids: torch.Tensor, tokens: int
) -> torch.Tensor:
    mask = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    t = torch.arange(tokens)
    mask[block_ids.cpu()[t // block_size], t % block_size] = True
    return mask


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, tokens: int) -> torch.Tensor:
    bs = cache.shape[1]
    t = torch.arange(tokens, device=cache.device)
    return cache[block_ids.long()[t // bs], t % bs]


def _check_poison(cache: torch.Tensor, written: torch.Tensor) -> None:
    """Slots of the document are all finite; every other slot is still NaN."""
    nan = cache.isnan().cpu()
    assert not nan[written].any(), "a slot of the document was not written"
    assert nan[~written].all(), "a slot outside the document was written"


def _decode_in_dtype(
    packed: PackedKV, spec: LayerSpec, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode done by plain torch in ``dtype`` arithmetic (the 2x rule's yardstick)."""

    def rotated(
        codes: torch.Tensor, norm: torch.Tensor, bits: int, cent: torch.Tensor, signs: torch.Tensor
    ) -> torch.Tensor:
        d = spec.head_dim
        c = unpack(codes, bits, d).long()
        y = cent.to(codes.device, dtype)[c] * (1.0 / math.sqrt(d))
        n = norm.to(dtype).unsqueeze(-1)
        if spec.norm_correction:
            n = n / torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        return fwht(y) * signs.to(codes.device, dtype) * n

    if spec.key_mode == "int8":
        k = packed.k_codes.to(dtype) * packed.k_scale.to(dtype).unsqueeze(-1)
    else:
        assert spec.key_centroids is not None and spec.key_signs is not None
        k = rotated(
            packed.k_codes, packed.k_scale, spec.key_bits, spec.key_centroids, spec.key_signs
        )
    v = rotated(
        packed.v_codes, packed.v_norm, spec.value_bits, spec.value_centroids, spec.value_signs
    )
    return k, v


def _filled_like(p: PackedKV, int_fill: int, float_fill: float) -> PackedKV:
    """A PackedKV shaped like ``p`` whose tensors all hold one poison value."""
    return p.with_tensors(
        [torch.full_like(x, float_fill if x.is_floating_point() else int_fill) for x in p.tensors()]
    )


# --- layouts --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_split_kv_cache_views_write_through(layout: str) -> None:
    kv, k, v = _paged_cache(5, 3, 16, 8, torch.float32, layout, "cpu")
    assert k.shape == v.shape == (5, 16, 3, 8)
    k[2, 7, 1] = 1.0
    v[2, 7, 1] = 2.0
    assert torch.equal(kv[2, 1, 7, :8], torch.ones(8))
    assert torch.equal(kv[2, 1, 7, 8:], torch.full((8,), 2.0))
    assert kv.isnan().sum() == kv.numel() - 16


def test_split_kv_cache_legacy_5d_and_errors() -> None:
    kv = torch.zeros(2, 4, 16, 3, 8)
    k, v = split_kv_cache(kv, 8)
    assert k.data_ptr() == kv[0].data_ptr() and v.data_ptr() == kv[1].data_ptr()
    with pytest.raises(ValueError, match="2 \\* head_dim"):
        split_kv_cache(torch.zeros(4, 3, 16, 10), 8)
    with pytest.raises(ValueError, match="not a known vLLM layout"):
        split_kv_cache(torch.zeros(4, 16, 8), 8)


# --- torch reference vs the codec (exact) ---------------------------------------------------


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
REF_DECODE_CASES = [
    # (setting, layer, head_dim, block_size, tokens, dtype, layout)
    ("polykv", 0, 128, 16, 1025, BF16, "NHD"),
    ("polykv", 0, 80, 128, 1025, FP16, "HND"),
    ("polykv", 0, 64, 16, 7, BF16, "HND"),
    ("polykv", 0, 128, 128, 130, FP16, "HND"),
    ("k4v2nc", 1, 128, 128, 1, FP16, "NHD"),
    ("k4v2nc", 1, 80, 16, 1025, BF16, "NHD"),
    ("k4v2nc", 3, 64, 128, 1025, BF16, "HND"),
    ("k3v4", 1, 64, 16, 33, FP16, "NHD"),
]


@pytest.mark.parametrize(
    "setting,layer,head_dim,block_size,tokens,dtype,layout",
    REF_DECODE_CASES,
    ids=lambda c: str(c).replace("torch.", ""),
)
def test_ref_decompress_equals_codec_decode_scattered(
    setting: str,
    layer: int,
    head_dim: int,
    block_size: int,
    tokens: int,
    dtype: torch.dtype,
    layout: str,
) -> None:
    heads = 2
    codec, spec, packed, _, _ = _layer_case(setting, head_dim, tokens, heads, layer, "cpu")
    num_blocks = -(-tokens // block_size) + 3
    kv, kc, vc = _paged_cache(num_blocks, heads, block_size, head_dim, dtype, layout, "cpu")
    bids = _block_ids(tokens, block_size, num_blocks, tokens + head_dim, "cpu")
    decompress_into_paged(packed, spec, kc, vc, bids, backend="torch")
    k_ref, v_ref = codec.decode(packed, dtype=dtype)
    assert torch.equal(_gather(kc, bids, tokens), k_ref)
    assert torch.equal(_gather(vc, bids, tokens), v_ref)
    written = _written_mask(num_blocks, block_size, bids, tokens)
    _check_poison(kc, written)
    _check_poison(vc, written)


@pytest.mark.parametrize(
    "setting,layer,head_dim,block_size,tokens,dtype",
    [
        ("polykv", 0, 128, 16, 1025, BF16),
        ("polykv", 0, 80, 128, 130, FP32),
        ("polykv", 0, 64, 16, 1, BF16),
        ("k4v2nc", 1, 128, 128, 1025, FP32),
        ("k3v4", 1, 80, 16, 33, BF16),
        ("k4v2nc", 1, 64, 128, 1025, BF16),
    ],
    ids=lambda c: str(c).replace("torch.", ""),
)
def test_ref_compress_equals_codec_encode_of_gathered(
    setting: str, layer: int, head_dim: int, block_size: int, tokens: int, dtype: torch.dtype
) -> None:
    heads = 3
    codec = _codec(setting, 4)
    spec = codec.layer_spec(layer, head_dim)
    num_blocks = -(-tokens // block_size) + 2
    kv, kc, vc = _paged_cache(num_blocks, heads, block_size, head_dim, dtype, "NHD", "cpu")
    kv.copy_(torch.randn(kv.shape, dtype=torch.float32).to(dtype))
    bids = _block_ids(tokens, block_size, num_blocks, 5, "cpu")
    got = compress_from_paged(spec, kc, vc, bids, tokens, backend="torch")
    want = codec.encode(_gather(kc, bids, tokens), _gather(vc, bids, tokens), layer)
    for a, b in zip(got.tensors(), want.tensors(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert (got.tokens, got.kv_heads, got.head_dim) == (tokens, heads, head_dim)


def test_ref_layers_roundtrip_with_per_layer_specs() -> None:
    """Layers 0 and -1 kept at K8/V3, layer 1 rotated: specs differ per layer; out= is honoured."""
    codec = _codec("k4v2nc", 3)
    d, h, bs, t = 64, 2, 16, 40
    specs = [codec.layer_spec(i, d) for i in range(3)]
    assert {s.key_mode for s in specs} == {"int8", "rotated"}
    caches = [_paged_cache(6, h, bs, d, torch.float32, "HND", "cpu") for _ in range(3)]
    for kv, _, _ in caches:
        kv.copy_(torch.randn(kv.shape))
    bids = torch.tensor([4, 0, 2])
    keys = [c[1] for c in caches]
    values = [c[2] for c in caches]
    outs = compress_layers_from_paged(specs, keys, values, bids, t, backend="torch")
    again = [_filled_like(p, 7, 7.0) for p in outs]
    compress_layers_from_paged(specs, keys, values, bids, t, again, backend="torch")
    for a, b in zip(outs, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))
    fresh = [_paged_cache(6, h, bs, d, torch.float32, "NHD", "cpu") for _ in range(3)]
    decompress_layers_into_paged(
        outs, specs, [c[1] for c in fresh], [c[2] for c in fresh], bids, backend="torch"
    )
    for i, (p, c) in enumerate(zip(outs, fresh, strict=True)):
        k_ref, v_ref = codec.decode(p, dtype=torch.float32)
        assert torch.equal(_gather(c[1], bids, t), k_ref), i
        assert torch.equal(_gather(c[2], bids, t), v_ref), i


def test_validation_errors_name_the_problem() -> None:
    codec, spec, packed, _, _ = _layer_case("polykv", 64, 40, 2, 0, "cpu")
    _, kc, vc = _paged_cache(4, 2, 16, 64, torch.bfloat16, "NHD", "cpu")
    with pytest.raises(ValueError, match="need 3"):
        decompress_into_paged(packed, spec, kc, vc, torch.tensor([0, 1]), backend="torch")
    with pytest.raises(ValueError, match="kv_heads=2 but the cache has 3"):
        _, k3, v3 = _paged_cache(4, 3, 16, 64, torch.bfloat16, "NHD", "cpu")
        decompress_into_paged(packed, spec, k3, v3, torch.tensor([0, 1, 2]), backend="torch")
    with pytest.raises(ValueError, match="head_dim"):
        decompress_into_paged(
            packed, codec.layer_spec(0, 128), kc, vc, torch.tensor([0, 1, 2]), backend="torch"
        )
    with pytest.raises(ValueError, match="backend="):
        decompress_into_paged(packed, spec, kc, vc, torch.tensor([0, 1, 2]), backend="cuda")  # type: ignore[arg-type]


def test_import_is_light() -> None:
    """Importing the package loads neither Triton nor a backend module."""
    code = (
        "import sys, polykv_vllm.kernels; "
        "bad = [m for m in ('triton', 'polykv_vllm.kernels.paged_triton', "
        "'polykv_vllm.kernels.triton_plan', 'polykv_vllm.kernels.paged_ref') "
        "if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_auto_backend_is_torch_on_cpu() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"


@pytest.mark.skipif(not HAS_TRITON or CHILD, reason="needs triton imported without interpreter")
def test_triton_on_cpu_without_interpreter_says_how_to_fix() -> None:
    codec, spec, packed, _, _ = _layer_case("polykv", 64, 20, 2, 0, "cpu")
    _, kc, vc = _paged_cache(4, 2, 16, 64, torch.bfloat16, "NHD", "cpu")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton's interpreter")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        decompress_into_paged(packed, spec, kc, vc, torch.tensor([0, 1]), backend="triton")


# --- Triton vs the reference ------------------------------------------------------------------

TRITON_CASES = [
    # (setting, layer, head_dim, block_size, tokens, layout)
    ("polykv", 0, 128, 16, 1025, "NHD"),
    ("polykv", 0, 80, 128, 1025, "HND"),
    ("polykv", 0, 64, 16, 33, "HND"),
    ("k4v2nc", 1, 128, 128, 300, "NHD"),
    ("k3v4", 1, 80, 16, 1025, "NHD"),
    ("k4v2nc", 2, 64, 128, 1, "HND"),
]
if CHILD:
    # The interpreter is slow (minutes on 2 cores): one T = 1025 case and shorter documents
    # elsewhere, one cache dtype per test; the GPU runs the full matrix.
    TRITON_CASES = [
        c if i == 0 else (*c[:4], min(c[4], 129), c[5]) for i, c in enumerate(TRITON_CASES)
    ]
DECODE_DTYPES = [BF16] if CHILD else [BF16, FP16]
ENCODE_DTYPES = [BF16] if CHILD else [BF16, FP32]


@pytest.mark.skipif(TRITON_DEVICE is None, reason=NO_TRITON_DEVICE)
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", DECODE_DTYPES)
def test_triton_decompress_parity(
    case: tuple[str, int, int, int, int, str], dtype: torch.dtype
) -> None:
    assert TRITON_DEVICE is not None
    setting, layer, head_dim, block_size, tokens, layout = case
    heads = 2
    codec, spec, packed, _, _ = _layer_case(setting, head_dim, tokens, heads, layer, TRITON_DEVICE)
    num_blocks = -(-tokens // block_size) + 3
    kv, kc, vc = _paged_cache(num_blocks, heads, block_size, head_dim, dtype, layout, TRITON_DEVICE)
    bids = _block_ids(tokens, block_size, num_blocks, 11, TRITON_DEVICE).to(torch.int32)
    decompress_into_paged(packed, spec, kc, vc, bids, backend="triton")
    written = _written_mask(num_blocks, block_size, bids, tokens)
    _check_poison(kc, written)
    _check_poison(vc, written)
    k32, v32 = codec.decode(packed, dtype=torch.float32)
    k_t, v_t = _decode_in_dtype(packed, spec, dtype)
    for name, got, ref, torch_same in (
        ("k", _gather(kc, bids, tokens), k32, k_t),
        ("v", _gather(vc, bids, tokens), v32, v_t),
    ):
        err = (got.float() - ref).abs().max().item()
        err_torch = (torch_same.float() - ref).abs().max().item()
        assert err <= 2 * err_torch + 1e-6, (name, err, err_torch)


@pytest.mark.skipif(TRITON_DEVICE is None, reason=NO_TRITON_DEVICE)
def test_triton_decompress_layers_matches_single_layer_calls() -> None:
    """One multi-layer call (grouped launches, per-layer specs) == per-layer reference calls."""
    assert TRITON_DEVICE is not None
    dev = TRITON_DEVICE
    codec = _codec("k4v2nc", 3)
    d, h, bs, t = 64, 2, 16, 70
    specs = [codec.layer_spec(i, d) for i in range(3)]
    g = torch.Generator().manual_seed(3)
    packed = [
        codec.encode(
            torch.randn(t, h, d, generator=g).to(dev), torch.randn(t, h, d, generator=g).to(dev), i
        )
        for i in range(3)
    ]
    bids = torch.tensor([9, 2, 5, 0, 7], device=dev)
    got = [_paged_cache(10, h, bs, d, torch.bfloat16, "NHD", dev) for _ in range(3)]
    ref = [_paged_cache(10, h, bs, d, torch.bfloat16, "NHD", dev) for _ in range(3)]
    decompress_layers_into_paged(
        packed, specs, [c[1] for c in got], [c[2] for c in got], bids, backend="triton"
    )
    decompress_layers_into_paged(
        packed, specs, [c[1] for c in ref], [c[2] for c in ref], bids, backend="torch"
    )
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a[0].isnan(), b[0].isnan())
        m = ~b[0].isnan()
        # both round a float32 value to bf16 (the kernel's carries the fp16 centroid rounding,
        # ~2^-12 of the vector's scale): equal up to one bf16 ulp and that scale
        want = b[0][m].float()
        tol = 2**-10 * want.abs().max().item()
        assert torch.allclose(a[0][m].float(), want, rtol=2**-7, atol=tol)


def _near_boundary(x: torch.Tensor, signs: torch.Tensor, bits: int) -> torch.Tensor:
    """Coordinates of the reference's rotated vector within 1e-4 of a decision boundary."""
    xf = x.float()
    n = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    z = rotate(xf / torch.where(n > 0, n, torch.ones_like(n)), signs) * math.sqrt(x.shape[-1])
    b = lloyd_max.boundaries(bits).to(z.device)
    return (z.unsqueeze(-1) - b).abs().amin(-1) < 1e-4


@pytest.mark.skipif(TRITON_DEVICE is None, reason=NO_TRITON_DEVICE)
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", ENCODE_DTYPES)
def test_triton_compress_parity(
    case: tuple[str, int, int, int, int, str], dtype: torch.dtype
) -> None:
    assert TRITON_DEVICE is not None
    setting, layer, head_dim, block_size, tokens, layout = case
    heads = 2
    codec = _codec(setting, 4)
    spec = codec.layer_spec(layer, head_dim)
    num_blocks = -(-tokens // block_size) + 3
    kv, kc, vc = _paged_cache(num_blocks, heads, block_size, head_dim, dtype, layout, TRITON_DEVICE)
    g = torch.Generator().manual_seed(tokens)
    kv.copy_((torch.randn(kv.shape, generator=g) * 3).to(dtype))
    bids = _block_ids(tokens, block_size, num_blocks, 17, TRITON_DEVICE)
    kv[bids[0], :, 0] = 0.0  # a zero (token, head) row in both K and V
    want = compress_from_paged(spec, kc, vc, bids, tokens, backend="torch")
    poisoned = _filled_like(want, 0x5A, float("nan"))
    got = compress_from_paged(spec, kc, vc, bids, tokens, poisoned, backend="triton")
    assert got is poisoned
    k_in, v_in = _gather(kc, bids, tokens), _gather(vc, bids, tokens)
    d = head_dim
    streams = [
        (
            "v",
            got.v_codes,
            want.v_codes,
            got.v_norm,
            want.v_norm,
            spec.value_bits,
            spec.value_signs,
            v_in,
        )
    ]
    if spec.key_mode == "int8":
        assert torch.equal(got.k_codes, want.k_codes)
        assert torch.equal(got.k_scale, want.k_scale)
    else:
        assert spec.key_signs is not None
        streams.append(
            (
                "k",
                got.k_codes,
                want.k_codes,
                got.k_scale,
                want.k_scale,
                spec.key_bits,
                spec.key_signs,
                k_in,
            )
        )
    for name, gc, wc, gn, wn, bits, signs, x in streams:
        assert not gn.isnan().any(), f"{name} norm not written"
        assert torch.allclose(gn.float(), wn.float(), rtol=2**-10, atol=0), name
        cg, cw = unpack(gc, bits, d), unpack(wc, bits, d)
        diff = cg != cw
        near = _near_boundary(x, signs.to(x.device), bits)
        assert not (diff & ~near).any(), f"{name}: {int((diff & ~near).sum())} codes differ"
        assert (cg.int() - cw.int()).abs().max() <= 1
        # padding bytes/bits beyond D: compare the packed bytes wherever codes agree
        if not diff.any():
            assert torch.equal(gc, wc), name


@pytest.mark.skipif(TRITON_DEVICE is not None or CHILD, reason="in-process Triton runs above")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: pip install triton")
def test_triton_interpreter() -> None:
    """Reruns this file's Triton tests on the CPU under Triton's interpreter, in a child."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "POLYKV_TRITON_CHILD": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton_", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    expected = (
        2 * len(TRITON_CASES) + 3
    )  # CHILD: one dtype per parity test, the layers test, 2 bound
    assert passed is not None and int(passed.group(1)) == expected, tail


@pytest.mark.skipif(TRITON_DEVICE is None, reason=NO_TRITON_DEVICE)
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_triton_bound_kernels_equal_the_validated_plans(layout: str) -> None:
    """The connector's bound launcher (caches validated once, addresses per call) writes exactly
    what the per-call plans write: decode into the caches, encode out of them (two spec groups:
    layers 0 and 2 at K8/V3, layer 1 at K4/V2)."""
    from polykv_vllm.kernels.addresses import PackedAddresses
    from polykv_vllm.kernels.triton_bound import BoundPagedKernels

    assert TRITON_DEVICE is not None
    dev = TRITON_DEVICE
    codec = _codec("k4v2nc", 3)
    d, h, bs, t = 64, 2, 16, 70
    specs = [codec.layer_spec(i, d) for i in range(3)]
    g = torch.Generator().manual_seed(5)
    packed = [
        codec.encode(
            torch.randn(t, h, d, generator=g).to(dev), torch.randn(t, h, d, generator=g).to(dev), i
        )
        for i in range(3)
    ]
    bids = torch.tensor([9, 2, 5, 0, 7], device=dev)
    got = [_paged_cache(10, h, bs, d, torch.bfloat16, layout, dev) for _ in range(3)]
    want = [_paged_cache(10, h, bs, d, torch.bfloat16, layout, dev) for _ in range(3)]
    bound = BoundPagedKernels(specs, [c[1] for c in got], [c[2] for c in got])
    bound.decompress(PackedAddresses.of(packed), bids)
    decompress_layers_into_paged(
        packed, specs, [c[1] for c in want], [c[2] for c in want], bids, backend="triton"
    )
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a[0].isnan(), b[0].isnan())
        assert torch.equal(a[0].nan_to_num(), b[0].nan_to_num())
    # encode back out of the (now written) caches
    outs = [s.empty(t, h, dev) for s in specs]
    bound.compress(PackedAddresses.of(outs), bids)
    ref = compress_layers_from_paged(
        specs, [c[1] for c in want], [c[2] for c in want], bids, t, backend="triton"
    )
    for o, r in zip(outs, ref, strict=True):
        for x, y in zip(o.tensors(), r.tensors(), strict=True):
            assert torch.equal(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="copy_ranges runs on CUDA")
def test_copy_ranges_moves_every_range_into_device_and_pinned_host_memory() -> None:
    from polykv_vllm.kernels.triton_copy import copy_ranges

    src = torch.randint(0, 255, (1 << 20,), dtype=torch.uint8, device="cuda")
    for dst in (
        torch.zeros(1 << 20, dtype=torch.uint8, device="cuda"),
        torch.zeros(1 << 20, dtype=torch.uint8, pin_memory=True),
    ):
        ranges = [(0, 4096, 256), (1024, 0, 16), (8192, 65536, 300000), (400000, 500000, 48)]
        copy_ranges(
            [src.data_ptr() + s for s, _, _ in ranges],
            [dst.data_ptr() + d for _, d, _ in ranges],
            [n for _, _, n in ranges],
            src.device,
        )
        torch.cuda.synchronize()
        want = torch.zeros_like(dst, device="cpu")
        for s, d, n in ranges:
            want[d : d + n] = src[s : s + n].cpu()
        assert torch.equal(dst.cpu(), want)
    with pytest.raises(ValueError, match="16-byte"):
        copy_ranges([src.data_ptr() + 1], [src.data_ptr()], [16], src.device)
