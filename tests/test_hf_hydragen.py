"""Shared-prefix attention math: prefix once + suffix per agent, merged by log-sum-exp, equals
plain attention over each agent's concatenated keys (awkward sizes catch tail bugs)."""

from __future__ import annotations

import pytest
import torch

from polykv_vllm.hf import hydragen
from polykv_vllm.hf.hydragen import attend_torch, merge, prefix_attention_torch, suffix_attention


def _reference(q, k_pre, v_pre, k_suf, v_suf, mask, scale):
    """float64 attention per agent over [prefix, its own suffix] with repeat_kv semantics."""
    n, h, m, d = q.shape
    g = h // k_pre.shape[1]
    out = torch.empty(n, h, m, d, dtype=torch.float64)
    for a in range(n):
        keys = torch.cat([k_pre.transpose(0, 1), k_suf[a]], dim=1).double()  # [Hkv, P+S, D]
        vals = torch.cat([v_pre.transpose(0, 1), v_suf[a]], dim=1).double()
        keys, vals = keys.repeat_interleave(g, 0), vals.repeat_interleave(g, 0)
        allowed = torch.cat([torch.ones(m, k_pre.shape[0], dtype=torch.bool), mask[a]], dim=1)
        scores = (q[a].double() @ keys.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[a] = scores.softmax(-1) @ vals
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,m,heads,kv_heads,dim,prefix,suffix", [
    (1, 1, 4, 2, 16, 33, 1),
    (5, 3, 9, 3, 59, 1025, 7),
    (3, 1, 8, 8, 64, 200, 12),
])  # fmt: skip
@pytest.mark.parametrize("fused", [True, False])
def test_merged_attention_equals_attention_over_concatenation(
    monkeypatch, fused, dtype, n, m, heads, kv_heads, dim, prefix, suffix
):
    """Both CPU paths of the torch backend: the fused flash kernel and ``attend_torch`` (what
    CUDA and MPS run)."""
    if not fused:
        monkeypatch.setattr(hydragen, "_cpu_flash", lambda: None)
    elif hydragen._cpu_flash() is None:
        pytest.skip("this torch has no fused CPU flash-attention kernel")
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q = rand(n, heads, m, dim)
    k_pre, v_pre = rand(prefix, kv_heads, dim), rand(prefix, kv_heads, dim)
    k_suf, v_suf = rand(n, kv_heads, suffix, dim), rand(n, kv_heads, suffix, dim)
    mask = torch.rand(n, m, suffix, generator=gen) > 0.3
    mask[:, :, 0] = True
    scale = dim**-0.5
    out_p, lse_p = prefix_attention_torch(q, k_pre, v_pre, scale)
    out_s, lse_s = suffix_attention(q, k_suf, v_suf, mask, scale)
    got = merge(out_p, lse_p, out_s, lse_s)
    want = _reference(q, k_pre, v_pre, k_suf, v_suf, mask, scale)
    # 2x rule against plain torch attention in the same dtype (SDPA on the concatenation).
    plain = torch.empty_like(want)
    g = heads // kv_heads
    for a in range(n):
        keys = torch.cat([k_pre.transpose(0, 1), k_suf[a]], dim=1).repeat_interleave(g, 0)
        vals = torch.cat([v_pre.transpose(0, 1), v_suf[a]], dim=1).repeat_interleave(g, 0)
        allowed = torch.cat([torch.ones(m, prefix, dtype=torch.bool), mask[a]], dim=1)
        plain[a] = torch.nn.functional.scaled_dot_product_attention(
            q[a], keys, vals, attn_mask=allowed, scale=scale
        ).double()
    err, plain_err = (got.double() - want).abs().max(), (plain - want).abs().max()
    assert err <= 2 * plain_err + 1e-6


def test_merge_with_empty_part_is_the_other_part():
    out = torch.randn(2, 3, 4)
    lse = torch.randn(2, 3)
    empty = torch.full((2, 3), float("-inf"))
    torch.testing.assert_close(merge(out, lse, torch.zeros_like(out), empty), out)


def test_attend_torch_all_masked_rows_are_empty():
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    mask[..., 1, :] = False
    out, lse = attend_torch(q, k, v, 0.3, mask)
    assert torch.isneginf(lse[..., 1]).all() and (out[..., 1, :] == 0).all()
    assert torch.isfinite(lse[..., [0, 2]]).all()
    ref = torch.nn.functional.scaled_dot_product_attention(q[..., [0, 2], :], k, v, scale=0.3)
    torch.testing.assert_close(out[..., [0, 2], :], ref)


@pytest.mark.parametrize("n,m,heads,kv_heads,dim,suffix", [
    (1, 1, 4, 2, 16, 1),
    (5, 3, 9, 3, 59, 7),
    (3, 4, 8, 8, 64, 12),
])  # fmt: skip
def test_fused_suffix_merge_equals_suffix_attention_then_merge(n, m, heads, kv_heads, dim, suffix):
    """``suffix_attention_merged`` (what the decoder runs) == ``merge(prefix, suffix_attention)``
    in float32, rows whose suffix is all masked (left padding) included: they get the prefix."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(n, heads, m, dim, generator=gen)
    k_pre, v_pre = torch.randn(40, kv_heads, dim, generator=gen), torch.randn(40, kv_heads, dim)
    k_suf = torch.randn(n, kv_heads, suffix, dim, generator=gen)
    v_suf = torch.randn(n, kv_heads, suffix, dim, generator=gen)
    mask = torch.rand(n, m, suffix, generator=gen) > 0.4
    mask[0, 0] = False  # one query that reads no suffix slot
    scale = dim**-0.5
    out_p, lse_p = prefix_attention_torch(q, k_pre, v_pre, scale)
    out_s, lse_s = suffix_attention(q, k_suf, v_suf, mask, scale)
    want = merge(out_p, lse_p, out_s, lse_s)
    bias = hydragen.suffix_bias(mask, kv_heads, heads // kv_heads)
    got = hydragen.suffix_attention_merged(q, k_suf, v_suf, bias, scale, out_p, lse_p)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0, :, 0], out_p[0, :, 0], rtol=0, atol=0)
