"""Paged kernels on fp8 caches (``float8_e4m3fn`` / ``float8_e5m2`` views with per-layer scales).

- Reference: compress equals ``KVCodec.encode`` of ``x8.float() * scale`` bit for bit; decompress
  writes exactly ``fp8(clamp(decode / scale))`` (:func:`polykv_vllm.kernels.fp8.quantize`).
- Triton vs the reference: codes exact (int8 key codes and scales bit-exact; rotated codes exact
  except within 1e-4 of a decision boundary, as for float caches: both backends compress the same
  fp32 values), norms within one fp16 ulp. Decompress: int8 key bytes equal exactly (the same
  IEEE arithmetic, and the kernel rounds to the fp8 grid by hand, half to even, like torch's
  cast); rotated streams: every byte within one fp8 ulp of the reference's or within the float
  path's tolerance (2^-10 of the row's largest value: the kernel's fp32 decode carries the fp16
  centroid rounding, which can move a small element across several fine fp8 steps), and the
  dequantized values obey the 2x rule against the fp32 codec decode.
- Scales: stored values are independent of them; a non-finite or zero scale is refused.

On a CPU-only machine ``test_triton_fp8_interpreter`` reruns the Triton tests in a child under
Triton's interpreter, as ``tests/test_kernels.py`` does.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import test_kernels as tk
import torch

from polykv_vllm.core import PackedKV
from polykv_vllm.core.bitpack import unpack
from polykv_vllm.kernels import (
    compress_from_paged,
    compress_layers_from_paged,
    decompress_into_paged,
    decompress_layers_into_paged,
    fp8_view,
    split_kv_cache,
)
from polykv_vllm.kernels.fp8 import dequantize, quantize

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8 = {"fp8": E4M3, "fp8_e5m2": E5M2}


def _fp8_cache(
    num_blocks: int, heads: int, block_size: int, head_dim: int, name: str, layout: str, dev: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's uint8 fp8 cache (logical [B, H, N, 2D]) poisoned with NaN bytes (0x7F), and its
    K/V fp8 views."""
    if layout == "NHD":
        raw = torch.full((num_blocks, block_size, heads, 2 * head_dim), 0x7F, dtype=torch.uint8)
        raw = raw.to(dev).transpose(1, 2)
    else:
        raw = torch.full((num_blocks, heads, block_size, 2 * head_dim), 0x7F, dtype=torch.uint8)
        raw = raw.to(dev)
    k, v = split_kv_cache(fp8_view(raw, name), head_dim)
    return raw, k, v


def _fill(raw: torch.Tensor, name: str, seed: int) -> None:
    """Random finite fp8 values (as vLLM would hold them) in every slot."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(raw.shape, generator=g) * 3
    raw.copy_(x.to(FP8[name]).view(torch.uint8).to(raw.device))


def _ordered(b: torch.Tensor) -> torch.Tensor:
    """fp8 bytes as integers ordered like their values (sign-magnitude to two's complement),
    so that one ulp apart is a difference of 1."""
    x = b.view(torch.uint8).to(torch.int32)
    mag = x & 0x7F
    return torch.where(x >= 0x80, -mag, mag)


def _bytes(cache: torch.Tensor, bids: torch.Tensor, tokens: int) -> torch.Tensor:
    return tk._gather(cache, bids, tokens).view(torch.uint8)


def _check_poison(cache: torch.Tensor, written: torch.Tensor) -> None:
    nan = cache.view(torch.uint8).cpu() == 0x7F
    assert not nan[written].any(), "a slot of the document was not written"
    assert nan[~written].all(), "a slot outside the document was written"


# --- the reference ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("setting", ["polykv", "k4v2nc"])
def test_ref_fp8_compress_encodes_dequantized_values(name: str, setting: str) -> None:
    codec = tk._codec(setting, 4)
    d, h, bs, t = 64, 2, 16, 37
    spec = codec.layer_spec(1, d)
    raw, kc, vc = _fp8_cache(6, h, bs, d, name, "NHD", "cpu")
    _fill(raw, name, 5)
    bids = torch.tensor([4, 0, 2])
    got = compress_from_paged(spec, kc, vc, bids, t, k_scale=0.25, v_scale=3.0, backend="torch")
    k = dequantize(tk._gather(kc, bids, t), 0.25)
    v = dequantize(tk._gather(vc, bids, t), 3.0)
    want = codec.encode(k, v, 1)
    for a, b in zip(got.tensors(), want.tensors(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
def test_ref_fp8_decompress_writes_quantized_decode(name: str) -> None:
    codec, spec, packed, _, _ = tk._layer_case("polykv", 64, 40, 2, 0, "cpu")
    raw, kc, vc = _fp8_cache(5, 2, 16, 64, name, "HND", "cpu")
    bids = torch.tensor([3, 1, 4])
    decompress_into_paged(packed, spec, kc, vc, bids, k_scale=0.5, v_scale=0.02, backend="torch")
    written = tk._written_mask(5, 16, bids, 40)
    _check_poison(kc, written)
    _check_poison(vc, written)
    k32, v32 = codec.decode(packed, dtype=torch.float32)
    assert torch.equal(_bytes(kc, bids, 40), quantize(k32, 0.5, FP8[name]).view(torch.uint8))
    assert torch.equal(_bytes(vc, bids, 40), quantize(v32, 0.02, FP8[name]).view(torch.uint8))
    # v_scale 0.02 pushes values beyond the fp8 range: saturated, never NaN or inf
    assert torch.isfinite(tk._gather(vc, bids, 40).float()).all()


def test_ref_fp8_entry_is_independent_of_the_scales() -> None:
    """The same K/V held under two scales compresses to one entry: the stored values are the
    dequantized ones. Magnitudes in [0.5, 4) and power-of-two scales keep ``x / scale`` in fp8's
    normal range, where the fp8 rounding commutes with the scaling."""
    codec = tk._codec("polykv", 2)
    spec = codec.layer_spec(0, 64)
    g = torch.Generator().manual_seed(2)
    sign = torch.randint(0, 2, (32, 2, 64), generator=g) * 2 - 1
    x = sign * (0.5 + 3.5 * torch.rand(32, 2, 64, generator=g))
    entries = []
    for scale in (1.0, 0.125):
        raw, kc, vc = _fp8_cache(2, 2, 16, 64, "fp8", "NHD", "cpu")
        bids = torch.tensor([0, 1])
        q = quantize(x, scale, E4M3)
        t = torch.arange(32)
        kc[bids[t // 16], t % 16] = q
        vc[bids[t // 16], t % 16] = q
        entries.append(compress_from_paged(spec, kc, vc, bids, 32, k_scale=scale, v_scale=scale))
    a, b = entries
    for ta, tb in zip(a.tensors(), b.tensors(), strict=True):
        assert torch.equal(ta, tb)


def test_fp8_scale_errors_name_the_problem() -> None:
    codec, spec, packed, _, _ = tk._layer_case("polykv", 64, 16, 2, 0, "cpu")
    raw, kc, vc = _fp8_cache(2, 2, 16, 64, "fp8", "NHD", "cpu")
    bids = torch.tensor([0])
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="k_scale"):
            decompress_into_paged(packed, spec, kc, vc, bids, k_scale=bad)
        with pytest.raises(ValueError, match="v_scale"):
            compress_from_paged(spec, kc, vc, bids, 16, v_scale=bad)
    float_kv, fk, fv = tk._paged_cache(2, 2, 16, 64, torch.bfloat16, "NHD", "cpu")
    with pytest.raises(ValueError, match="only to fp8 caches"):
        decompress_into_paged(packed, spec, fk, fv, bids, k_scale=0.5)
    u8 = split_kv_cache(raw, 64)
    with pytest.raises(ValueError, match="fp8_view"):
        decompress_into_paged(packed, spec, u8[0], u8[1], bids)
    with pytest.raises(ValueError, match="uint8"):
        fp8_view(float_kv, "fp8")


# --- Triton vs the reference ------------------------------------------------------------------

FP8_CASES = [
    # (setting, layer, head_dim, block_size, tokens, layout, kv_cache_dtype)
    ("polykv", 0, 128, 16, 300, "NHD", "fp8"),
    ("polykv", 0, 80, 32, 129, "HND", "fp8_e5m2"),
    ("k4v2nc", 1, 64, 16, 70, "HND", "fp8"),
    ("k3v4", 1, 64, 128, 33, "NHD", "fp8_e5m2"),
]


@pytest.mark.skipif(tk.TRITON_DEVICE is None, reason=tk.NO_TRITON_DEVICE)
@pytest.mark.parametrize("case", FP8_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_fp8_compress_parity(case: tuple[str, int, int, int, int, str, str]) -> None:
    assert tk.TRITON_DEVICE is not None
    dev = tk.TRITON_DEVICE
    setting, layer, d, bs, tokens, layout, name = case
    h = 2
    spec = tk._codec(setting, 4).layer_spec(layer, d)
    nb = -(-tokens // bs) + 2
    raw, kc, vc = _fp8_cache(nb, h, bs, d, name, layout, dev)
    _fill(raw, name, tokens)
    bids = tk._block_ids(tokens, bs, nb, 7, dev)
    kv = fp8_view(raw, name)
    kv[bids[0], :, 0] = 0.0  # a zero (token, head) row in K and V
    scales = {"k_scale": 0.37, "v_scale": 1.9}
    want = compress_from_paged(spec, kc, vc, bids, tokens, backend="torch", **scales)
    poisoned = tk._filled_like(want, 0x5A, float("nan"))
    got = compress_from_paged(spec, kc, vc, bids, tokens, poisoned, backend="triton", **scales)
    k_in = dequantize(tk._gather(kc, bids, tokens), 0.37)
    v_in = dequantize(tk._gather(vc, bids, tokens), 1.9)
    streams = [("v", got.v_codes, want.v_codes, got.v_norm, want.v_norm, spec.value_bits)]
    signs = {"v": spec.value_signs, "k": spec.key_signs}
    x_in = {"v": v_in, "k": k_in}
    if spec.key_mode == "int8":
        assert torch.equal(got.k_codes, want.k_codes)
        assert torch.equal(got.k_scale, want.k_scale)
    else:
        streams.append(("k", got.k_codes, want.k_codes, got.k_scale, want.k_scale, spec.key_bits))
    for s, gc, wc, gn, wn, bits in streams:
        assert torch.allclose(gn.float(), wn.float(), rtol=2**-10, atol=0), s
        cg, cw = unpack(gc, bits, d), unpack(wc, bits, d)
        sg = signs[s]
        assert sg is not None
        near = tk._near_boundary(x_in[s], sg.to(dev), bits)
        assert not ((cg != cw) & ~near).any(), f"{s}: codes differ away from a boundary"


@pytest.mark.skipif(tk.TRITON_DEVICE is None, reason=tk.NO_TRITON_DEVICE)
@pytest.mark.parametrize("case", FP8_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_fp8_decompress_parity(case: tuple[str, int, int, int, int, str, str]) -> None:
    assert tk.TRITON_DEVICE is not None
    dev = tk.TRITON_DEVICE
    setting, layer, d, bs, tokens, layout, name = case
    h = 2
    codec, spec, packed, _, _ = tk._layer_case(setting, d, tokens, h, layer, dev)
    nb = -(-tokens // bs) + 3
    got_raw, gk, gv = _fp8_cache(nb, h, bs, d, name, layout, dev)
    ref_raw, rk, rv = _fp8_cache(nb, h, bs, d, name, layout, dev)
    bids = tk._block_ids(tokens, bs, nb, 11, dev).to(torch.int32)
    scales = {"k_scale": 0.05, "v_scale": 0.02}
    decompress_into_paged(packed, spec, gk, gv, bids, backend="triton", **scales)
    decompress_into_paged(packed, spec, rk, rv, bids, backend="torch", **scales)
    written = tk._written_mask(nb, bs, bids, tokens)
    k32, v32 = codec.decode(packed, dtype=torch.float32)
    for s, got, ref, x32, scale in (("k", gk, rk, k32, 0.05), ("v", gv, rv, v32, 0.02)):
        _check_poison(got, written)
        gb, rb = _bytes(got, bids, tokens), _bytes(ref, bids, tokens)
        g8, r8 = gb.view(FP8[name]).float(), rb.view(FP8[name]).float()
        if s == "k" and spec.key_mode == "int8":
            assert torch.equal(gb, rb), s  # code * scale / k_scale: the same IEEE arithmetic
        # Rotated streams: the kernel rounds an fp32 decode that carries the fp16 centroid
        # rounding (~2^-12 of the row's scale, see test_kernels.py), so a byte is within one fp8
        # ulp of the reference's, or within that float tolerance of it (small elements of a row).
        ulps = (_ordered(gb) - _ordered(rb)).abs()
        row_tol = 2**-10 * r8.abs().amax(-1, keepdim=True)
        assert ((ulps <= 1) | ((g8 - r8).abs() <= row_tol)).all(), s
        err = (dequantize(gb.view(FP8[name]), scale) - x32).abs().max().item()
        err_torch = (dequantize(rb.view(FP8[name]), scale) - x32).abs().max().item()
        assert err <= 2 * err_torch + 1e-6, (s, err, err_torch)


@pytest.mark.skipif(tk.TRITON_DEVICE is None, reason=tk.NO_TRITON_DEVICE)
def test_triton_fp8_layers_with_per_layer_scales() -> None:
    """One multi-layer call with a different scale per layer == per-layer reference calls."""
    assert tk.TRITON_DEVICE is not None
    dev = tk.TRITON_DEVICE
    codec = tk._codec("polykv", 3)
    d, h, bs, t = 64, 2, 16, 40
    specs = [codec.layer_spec(i, d) for i in range(3)]
    caches = [_fp8_cache(4, h, bs, d, "fp8", "NHD", dev) for _ in range(3)]
    for i, c in enumerate(caches):
        _fill(c[0], "fp8", i)
    bids = torch.tensor([3, 0, 2], device=dev)
    ks, vs = [0.5, 2.0, 0.125], [1.0, 0.25, 4.0]
    kcs, vcs = [c[1] for c in caches], [c[2] for c in caches]
    args = (specs, kcs, vcs, bids, t)
    got = compress_layers_from_paged(*args, k_scales=ks, v_scales=vs, backend="triton")
    ref = compress_layers_from_paged(*args, k_scales=ks, v_scales=vs, backend="torch")
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a.k_codes, b.k_codes)  # polykv: int8 keys, exact
        assert torch.equal(a.k_scale, b.k_scale)
    outs = [_fp8_cache(4, h, bs, d, "fp8", "NHD", dev) for _ in range(3)]
    refs = [_fp8_cache(4, h, bs, d, "fp8", "NHD", dev) for _ in range(3)]
    packed: list[PackedKV] = ref
    for dst, backend in ((outs, "triton"), (refs, "torch")):
        decompress_layers_into_paged(
            packed,
            specs,
            [c[1] for c in dst],
            [c[2] for c in dst],
            bids,
            k_scales=ks,
            v_scales=vs,
            backend=backend,  # type: ignore[arg-type]
        )
    for o, r in zip(outs, refs, strict=True):
        # int8 keys: code * scale / k_scale is the same IEEE arithmetic in both: equal bytes
        assert torch.equal(_bytes(o[1], bids, t), _bytes(r[1], bids, t))
        assert (_ordered(_bytes(o[2], bids, t)) - _ordered(_bytes(r[2], bids, t))).abs().max() <= 1


@pytest.mark.skipif(tk.TRITON_DEVICE is not None or tk.CHILD, reason="in-process Triton above")
@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed: pip install triton"
)
def test_triton_fp8_interpreter() -> None:
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
    assert passed is not None and int(passed.group(1)) == 2 * len(FP8_CASES) + 1, tail
