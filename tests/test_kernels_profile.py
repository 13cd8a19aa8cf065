"""Paged kernels with a layer-wise profile (every layer a different setting, as ``polykv-vllm
calibrate`` writes): torch reference == codec bit for bit; Triton (grouped multi-layer launches
and the connector's bound launcher) == torch reference.

Triton runs on CUDA when there is a GPU; on a CPU-only machine ``test_triton_interpreter_profile``
reruns the Triton tests of this file under Triton's interpreter in a child process (the pattern of
``tests/test_kernels.py``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch
from test_kernels import _gather, _near_boundary, _paged_cache

from polykv_vllm.core import CodecProfile, KVCodec, LayerSetting, ModelFingerprint
from polykv_vllm.core.bitpack import unpack
from polykv_vllm.kernels import compress_layers_from_paged, decompress_layers_into_paged

HAS_TRITON = importlib.util.find_spec("triton") is not None
CHILD = os.environ.get("POLYKV_TRITON_CHILD") == "1"
if torch.cuda.is_available():
    TRITON_DEVICE: str | None = "cuda"
elif CHILD and os.environ.get("TRITON_INTERPRET") == "1":
    TRITON_DEVICE = "cpu"
else:
    TRITON_DEVICE = None

#: every key scheme and bit width, every value width, norm correction on and off, mixed
MIXED = (
    LayerSetting(8, 4, False),
    LayerSetting(4, 2, True),
    LayerSetting(3, 3, False),
    LayerSetting(2, 4, True),
    LayerSetting(8, 2, True),
    LayerSetting(4, 3, False),
)


def _codec(head_dim: int) -> KVCodec:
    model = ModelFingerprint("tiny", "LlamaForCausalLM", len(MIXED), 2, head_dim)
    return KVCodec(profile=CodecProfile(model, MIXED, seed=3))


def _packed(codec: KVCodec, t: int, h: int, d: int, dev: str) -> list:
    g = torch.Generator().manual_seed(t + d)
    out = []
    for i in range(len(MIXED)):
        k = torch.randn(t, h, d, generator=g) * (1 + torch.rand(1, 1, d, generator=g))
        v = torch.randn(t, h, d, generator=g)
        out.append(codec.encode(k.to(dev), v.to(dev), i))
    return out


@pytest.mark.parametrize("d,bs,t", [(64, 16, 70), (80, 128, 130), (128, 16, 33)])
def test_ref_mixed_profile_roundtrip_equals_codec(d: int, bs: int, t: int) -> None:
    codec, h = _codec(d), 2
    specs = [codec.layer_spec(i) for i in range(len(MIXED))]
    assert len({(s.key_bits, s.value_bits, s.norm_correction) for s in specs}) == len(MIXED)
    packed = _packed(codec, t, h, d, "cpu")
    nb = -(-t // bs) + 2
    bids = torch.randperm(nb, generator=torch.Generator().manual_seed(1))[: -(-t // bs)]
    caches = [_paged_cache(nb, h, bs, d, torch.float32, "NHD", "cpu") for _ in MIXED]
    decompress_layers_into_paged(
        packed, specs, [c[1] for c in caches], [c[2] for c in caches], bids, backend="torch"
    )
    for i, (p, c) in enumerate(zip(packed, caches, strict=True)):
        k_ref, v_ref = codec.decode(p, dtype=torch.float32, layer=i)
        assert torch.equal(_gather(c[1], bids, t), k_ref), i
        assert torch.equal(_gather(c[2], bids, t), v_ref), i
    again = compress_layers_from_paged(
        specs, [c[1] for c in caches], [c[2] for c in caches], bids, t, backend="torch"
    )
    for i, (a, c) in enumerate(zip(again, caches, strict=True)):
        want = codec.encode(_gather(c[1], bids, t), _gather(c[2], bids, t), i)
        assert all(torch.equal(x, y) for x, y in zip(a.tensors(), want.tensors(), strict=True))


@pytest.mark.skipif(TRITON_DEVICE is None, reason="no CUDA GPU: see the interpreter test")
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_triton_mixed_profile_matches_reference(layout: str) -> None:
    from polykv_vllm.kernels.addresses import PackedAddresses
    from polykv_vllm.kernels.triton_bound import BoundPagedKernels

    assert TRITON_DEVICE is not None
    dev, d, h, bs, t = TRITON_DEVICE, 64, 2, 16, 70
    codec = _codec(d)
    specs = [codec.layer_spec(i) for i in range(len(MIXED))]
    packed = _packed(codec, t, h, d, dev)
    bids = torch.tensor([9, 2, 5, 0, 7], device=dev)
    got = [_paged_cache(10, h, bs, d, torch.bfloat16, layout, dev) for _ in MIXED]
    bound_out = [_paged_cache(10, h, bs, d, torch.bfloat16, layout, dev) for _ in MIXED]
    ref = [_paged_cache(10, h, bs, d, torch.bfloat16, layout, dev) for _ in MIXED]
    decompress_layers_into_paged(
        packed, specs, [c[1] for c in got], [c[2] for c in got], bids, backend="triton"
    )
    decompress_layers_into_paged(
        packed, specs, [c[1] for c in ref], [c[2] for c in ref], bids, backend="torch"
    )
    bound = BoundPagedKernels(specs, [c[1] for c in bound_out], [c[2] for c in bound_out])
    bound.decompress(PackedAddresses.of(packed), bids)
    for a, b, c in zip(got, ref, bound_out, strict=True):
        assert torch.equal(a[0].isnan(), b[0].isnan())
        assert torch.equal(a[0].nan_to_num(), c[0].nan_to_num())
        m = ~b[0].isnan()
        want = b[0][m].float()
        tol = 2**-10 * want.abs().max().item()
        assert torch.allclose(a[0][m].float(), want, rtol=2**-7, atol=tol)
    # encode back out of the reference-written caches: Triton vs torch, per stream
    keys, values = [c[1] for c in ref], [c[2] for c in ref]
    want_p = compress_layers_from_paged(specs, keys, values, bids, t, backend="torch")
    got_p = compress_layers_from_paged(specs, keys, values, bids, t, backend="triton")
    outs = [s.empty(t, h, dev) for s in specs]
    BoundPagedKernels(specs, keys, values).compress(PackedAddresses.of(outs), bids)
    for spec, g, w, o, kc, vc in zip(specs, got_p, want_p, outs, keys, values, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(g.tensors(), o.tensors(), strict=True))
        streams = [("v", g.v_codes, w.v_codes, g.v_norm, w.v_norm, spec.values, vc)]
        if spec.key_mode == "int8":
            assert torch.equal(g.k_codes, w.k_codes) and torch.equal(g.k_scale, w.k_scale)
        else:
            streams.append(("k", g.k_codes, w.k_codes, g.k_scale, w.k_scale, spec.keys, kc))
        for name, gc, wc, gn, wn, stream, cache in streams:
            assert torch.allclose(gn.float(), wn.float(), rtol=2**-10, atol=0), name
            cg, cw = unpack(gc, stream.bits, d), unpack(wc, stream.bits, d)
            near = _near_boundary(_gather(cache, bids, t), stream.signs.to(dev), stream.bits)
            assert not ((cg != cw) & ~near).any(), name


@pytest.mark.skipif(TRITON_DEVICE is not None or CHILD, reason="in-process Triton runs above")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: pip install triton")
def test_triton_interpreter_profile() -> None:
    """Reruns this file's Triton tests on the CPU under Triton's interpreter, in a child."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "POLYKV_TRITON_CHILD": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "triton_mixed",
            __file__,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed is not None and int(passed.group(1)) == 2, tail
