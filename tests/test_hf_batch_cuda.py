"""``pool.generate`` on CUDA: the xformers prefix attention against the torch backend and a
float64 reference (2x rule), greedy tokens of both backends against agents run one at a time,
and the fallback to torch when xformers is missing; the Triton decode of the shared prefix
(``decode_backend``) against the torch codec, and the torch backend's fused CUDA prefix
attention against ``attend_torch``. Skipped without CUDA; the xformers tests
also without a usable xformers (not installed, or a wheel that does not import)."""

from __future__ import annotations

import copy
import importlib.util
import logging

import pytest
import torch
from test_hf_support import DOCUMENT, make_model, make_tokenizer, stop_at_different_steps

from polykv_vllm.hf import SharedPrefixCache, compress, create_agents
from polykv_vllm.hf.batch import BatchedDecoder
from polykv_vllm.hf.hydragen import (
    _xformers_problem,
    attend_torch,
    prefix_attention_torch,
    prefix_attention_xformers,
    resolve_backend,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

needs_xformers = pytest.mark.skipif(
    not torch.cuda.is_available() or _xformers_problem(torch.device("cuda")) is not None,
    reason="needs CUDA and an xformers that runs there",
)

QUERIES = ["What does __enter__ do?", "Name it.", "x", "When is __exit__ loaded for later use?"]
CONTINUATION = [11, 184, 30, 196, 53, 8]


def _reference_prefix(q, k, v, scale):
    """float64 prefix attention on the CPU: out [N, H, M, D], lse [N, H, M]."""
    n, h, m, d = q.shape
    g = h // k.shape[1]
    keys = k.double().cpu().transpose(0, 1).repeat_interleave(g, 0)  # [H, P, D]
    vals = v.double().cpu().transpose(0, 1).repeat_interleave(g, 0)
    scores = torch.einsum("nhmd,hpd->nhmp", q.double().cpu(), keys) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("nhmp,hpd->nhmd", scores.softmax(-1), vals), lse


def _random_prefix_problem(dtype, n, m, heads, kv_heads, dim, prefix):
    """Seeded CUDA ``q [N, H, M, D]``, ``k`` / ``v [P, Hkv, D]`` in ``dtype``."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    return rand(n, heads, m, dim), rand(prefix, kv_heads, dim), rand(prefix, kv_heads, dim)


def _assert_within_twice(got, base, want, dtype, n, m, heads, dim):
    """``got = (out, lse)`` has the prefix-attention shapes, float32, and is within 2x the
    error of ``base`` against the float64 ``want`` (plus the output's rounding to ``dtype``)."""
    (got_out, got_lse), (base_out, base_lse), (want_out, want_lse) = got, base, want
    assert got_out.shape == (n, heads, m, dim) and got_lse.shape == (n, heads, m)
    assert got_out.dtype == torch.float32 and got_lse.dtype == torch.float32
    out_err = (got_out.double().cpu() - want_out).abs().max().item()
    lse_err = (got_lse.double().cpu() - want_lse).abs().max().item()
    # The torch backend keeps its inputs' rounding only; the kernel rounds its output to dtype.
    rounding = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}[dtype]
    base_out_err = (base_out.double().cpu() - want_out).abs().max().item()
    base_lse_err = (base_lse.double().cpu() - want_lse).abs().max().item()
    assert out_err <= 2 * base_out_err + rounding, (out_err, base_out_err)
    assert lse_err <= 2 * base_lse_err + 1e-4, (lse_err, base_lse_err)


@needs_xformers
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,m,heads,kv_heads,dim,prefix", [
    (1, 1, 9, 3, 64, 2072),
    (64, 1, 32, 8, 64, 2048),
    (5, 7, 8, 8, 128, 333),
    (3, 22, 4, 2, 16, 1025),
])  # fmt: skip
def test_xformers_prefix_attention_within_twice_torch_error(
    dtype, n, m, heads, kv_heads, dim, prefix
):
    q, k, v = _random_prefix_problem(dtype, n, m, heads, kv_heads, dim, prefix)
    scale = dim**-0.5
    got = prefix_attention_xformers(q, k, v, scale)
    base = prefix_attention_torch(q, k, v, scale)
    _assert_within_twice(got, base, _reference_prefix(q, k, v, scale), dtype, n, m, heads, dim)


def test_attend_torch_on_cuda_matches_sdpa():
    q, k, v = (torch.randn(2, 3, n, 64, device="cuda") for n in (5, 300, 300))
    out, lse = attend_torch(q, k, v, 0.125)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.125)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    want = torch.logsumexp((q @ k.transpose(-1, -2)) * 0.125, dim=-1)
    torch.testing.assert_close(lse, want, rtol=1e-5, atol=1e-5)


def _cuda_pool(seed=1, layers=3, dtype=torch.float32, chat=False):
    model = make_model(seed=seed, layers=layers).to(device="cuda", dtype=dtype)
    tok = make_tokenizer(chat)
    return model, tok, compress(model, tok, DOCUMENT)


BACKENDS = [
    "torch",
    pytest.param("xformers", marks=needs_xformers),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chat", [False, True])
def test_greedy_tokens_identical_to_sequential_agents_fp32_cuda(backend, chat):
    model, tok, pool = _cuda_pool(chat=chat)
    got = pool.generate_ids(
        QUERIES, model, tok, max_new_tokens=10, eos_token_id=None, backend=backend
    )
    assert pool.memory_summary(len(QUERIES)).batched_backend == backend
    agent = create_agents(pool, model, tok, 1)[0]
    want = [agent.generate_ids(q, max_new_tokens=10, eos_token_id=None) for q in QUERIES]
    assert got == want


def _single_logits(pool, model, tok, query):
    suffix = pool.prompt.suffix_ids(tok, query) + CONTINUATION
    ids = torch.tensor([suffix], device=model.device)
    with torch.no_grad():
        logits = model(ids, past_key_values=SharedPrefixCache(pool), use_cache=True).logits
    return logits[0, len(suffix) - len(CONTINUATION) - 1 :].double().cpu()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_within_twice_the_one_agent_error_cuda(backend, dtype):
    model, tok, pool = _cuda_pool()
    ref_model = copy.deepcopy(model).double()
    low = copy.deepcopy(model).to(dtype)
    suffixes = [pool.prompt.suffix_ids(tok, q) for q in QUERIES]
    rows = []
    with BatchedDecoder(pool, low, backend) as dec:
        rows.append(dec.prefill(suffixes))
        for t in CONTINUATION:
            rows.append(dec.step(torch.full((len(QUERIES),), t, device="cuda")))
    batched = torch.stack(rows, dim=1).double().cpu()
    for i, q in enumerate(QUERIES):
        ref = _single_logits(pool, ref_model, tok, q)
        single_err = (_single_logits(pool, low, tok, q) - ref).abs().max().item()
        batched_err = (batched[i] - ref).abs().max().item()
        assert batched_err <= 2 * single_err + 1e-3, (i, batched_err, single_err)


def test_missing_xformers_on_cuda_falls_back_to_torch(monkeypatch, caplog):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "xformers" else real(name, *a)
    )
    assert resolve_backend("xformers", torch.device("cuda")) == "torch"
    caplog.clear()
    model, tok, pool = _cuda_pool()
    with caplog.at_level(logging.INFO, logger="polykv_vllm.hf.hydragen"):
        ids = pool.generate_ids(["a", "bb"], model, tok, max_new_tokens=3, backend="xformers")
    assert len(ids) == 2
    assert pool.memory_summary(2).batched_backend == "torch"
    lines = [r.getMessage() for r in caplog.records if r.name == "polykv_vllm.hf.hydragen"]
    assert len(lines) == 1 and "xformers is not installed" in lines[0]


# --- the Triton decode of the shared prefix, and the fused prefix attention (issue 15) ---------

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_decoded_layer_matches_the_torch_codec(dtype):
    """Every layer decoded by the kernel into the single-block buffer vs the torch codec in
    float32: within 2x the codec's own error in ``dtype`` plus the kernel's fp16 centroid
    rounding (2^-10 of the layer's scale); int8 keys in float32 exactly."""
    from polykv_vllm.hf.cache import MemoryMeter
    from polykv_vllm.hf.prefix_decode import PrefixDecoder

    model, tok, pool = _cuda_pool(layers=4)
    dev = torch.device("cuda")
    dec = PrefixDecoder(pool, "triton", 8192, MemoryMeter(), MemoryMeter())
    for layer in range(pool.num_layers):
        got_k, got_v = dec.decode(layer, dtype, dev)
        got_k, got_v = got_k.clone(), got_v.clone()  # the buffer is reused by the next layer
        ref_k, ref_v = pool.decode_layer(layer, 0, pool.num_tokens, torch.float32, dev)
        low_k, low_v = pool.decode_layer(layer, 0, pool.num_tokens, dtype, dev)
        for name, got, ref, low in (("k", got_k, ref_k, low_k), ("v", got_v, ref_v, low_v)):
            assert got.shape == ref.shape and got.dtype == dtype
            err = (got.float() - ref).abs().max().item()
            err_low = (low.float() - ref).abs().max().item()
            assert err <= 2 * err_low + 2**-10 * ref.abs().max().item(), (layer, name, err)
        spec = pool.codec.layer_spec(layer, pool.layout.head_dim)
        if spec.key_mode == "int8" and dtype == torch.float32:
            assert torch.equal(got_k, ref_k), layer


@needs_triton
@pytest.mark.parametrize("chat", [False, True])
def test_greedy_tokens_with_triton_decode_identical_fp32_cuda(chat):
    model, tok, pool = _cuda_pool(chat=chat)
    kw = dict(max_new_tokens=10, eos_token_id=None, backend="torch")
    got = pool.generate_ids(QUERIES, model, tok, decode_backend="triton", **kw)
    summary = pool.memory_summary(len(QUERIES))
    assert summary.batched_decode_backend == "triton"
    # one buffer [P, Hkv, D] for K and one for V, for every layer and step
    layout = pool.layout
    assert summary.batched_document_bytes == 2 * pool.num_tokens * layout.kv_heads * (
        layout.head_dim * 4
    )
    off = pool.generate_ids(QUERIES, model, tok, decode_backend="torch", **kw)
    assert pool.memory_summary(len(QUERIES)).batched_decode_backend == "torch"
    kept = pool.generate_ids(QUERIES, model, tok, decode_backend="triton", keep_decoded=True, **kw)
    agent = create_agents(pool, model, tok, 1)[0]
    want = [agent.generate_ids(q, max_new_tokens=10, eos_token_id=None) for q in QUERIES]
    assert got == off == kept == want


@needs_triton
def test_auto_decode_backend_is_triton_on_cuda_for_bf16_and_fp16():
    from polykv_vllm.hf.prefix_decode import resolve_decode_backend

    dev = torch.device("cuda")
    assert resolve_decode_backend("auto", dev, torch.bfloat16) == "triton"
    assert resolve_decode_backend("auto", dev, torch.float16) == "triton"
    assert resolve_decode_backend("auto", dev, torch.float32) == "torch"
    assert resolve_decode_backend("triton", dev, torch.float32) == "triton"
    assert resolve_decode_backend("auto", dev, torch.float64) == "torch"
    with pytest.raises(ValueError, match="dtype"):
        resolve_decode_backend("triton", dev, torch.float64)


@pytest.mark.parametrize("decode_backend,dtype", [
    ("torch", torch.bfloat16),
    ("torch", torch.float16),
    ("torch", torch.float32),
    pytest.param("triton", torch.bfloat16, marks=needs_triton),
    pytest.param("triton", torch.float16, marks=needs_triton),
])  # fmt: skip
def test_logits_within_twice_the_one_agent_error_per_decode_backend(decode_backend, dtype):
    model, tok, pool = _cuda_pool()
    ref_model = copy.deepcopy(model).double()
    low = copy.deepcopy(model).to(dtype)
    suffixes = [pool.prompt.suffix_ids(tok, q) for q in QUERIES]
    rows = []
    with BatchedDecoder(pool, low, "torch", 8192, decode_backend=decode_backend) as dec:
        rows.append(dec.prefill(suffixes))
        for t in CONTINUATION:
            rows.append(dec.step(torch.full((len(QUERIES),), t, device="cuda")))
    batched = torch.stack(rows, dim=1).double().cpu()
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    for i, q in enumerate(QUERIES):
        ref = _single_logits(pool, ref_model, tok, q)
        single_err = (_single_logits(pool, low, tok, q) - ref).abs().max().item()
        batched_err = (batched[i] - ref).abs().max().item()
        assert batched_err <= 2 * single_err + floor, (i, batched_err, single_err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,m,heads,kv_heads,dim,prefix", [
    (1, 1, 9, 3, 64, 2072),
    (64, 1, 9, 3, 64, 2048),
    (5, 7, 8, 8, 128, 333),
    (3, 22, 4, 2, 16, 1025),
])  # fmt: skip
def test_fused_cuda_prefix_attention_within_twice_attend_torch(
    dtype, n, m, heads, kv_heads, dim, prefix
):
    """The torch backend's CUDA path (aten's memory-efficient kernel with the LSE) is used for
    these shapes and is within 2x ``attend_torch``'s error against float64."""
    from polykv_vllm.hf import hydragen

    assert hydragen._cuda_fused_problem(torch.device("cuda"), dtype, dim) is None
    q, k, v = _random_prefix_problem(dtype, n, m, heads, kv_heads, dim, prefix)
    scale = dim**-0.5
    got = prefix_attention_torch(q, k, v, scale)
    folded = hydragen._fold(q, kv_heads)
    keys, values = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    base_out, base_lse = attend_torch(folded, keys, values, scale)
    base = (
        hydragen._unfold(base_out, n, m),
        hydragen._unfold(base_lse.unsqueeze(-1), n, m).squeeze(-1),
    )
    _assert_within_twice(got, base, _reference_prefix(q, k, v, scale), dtype, n, m, heads, dim)


# --- the decoding step as a CUDA graph (pool.generate(cuda_graph=...), issue 15) ---------------

DECODERS = ["torch", pytest.param("triton", marks=needs_triton)]


def _stop_at_different_steps(pool, model, tok, **kw):
    found = stop_at_different_steps(pool, model, tok, QUERIES, **kw)
    if found is None:
        pytest.skip("no token that stops these agents at different steps")
    return found


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decode_backend", DECODERS)
@pytest.mark.parametrize("chat", [False, True])
def test_cuda_graph_greedy_tokens_identical_to_eager_fp32(backend, decode_backend, chat):
    model, tok, pool = _cuda_pool(chat=chat)
    kw = dict(max_new_tokens=10, eos_token_id=None, backend=backend, decode_backend=decode_backend)
    want = pool.generate_ids(QUERIES, model, tok, cuda_graph=False, **kw)
    assert pool.memory_summary(len(QUERIES)).batched_cuda_graph is False
    eager_peak = pool.memory_summary(len(QUERIES)).batched_peak_bytes
    got = pool.generate_ids(QUERIES, model, tok, cuda_graph=True, **kw)
    summary = pool.memory_summary(len(QUERIES))
    assert summary.batched_cuda_graph is True, "the capture failed: see the warning logged"
    assert got == want
    assert summary.batched_peak_bytes == eager_peak  # the same metered suffixes + one layer
    # auto is on for CUDA, and agents stopping at different steps stay correct
    stop, cut = _stop_at_different_steps(pool, model, tok, backend=backend,
                                         decode_backend=decode_backend)  # fmt: skip
    got = pool.generate_ids(QUERIES, model, tok, max_new_tokens=12, eos_token_id=stop,
                            backend=backend, decode_backend=decode_backend)  # fmt: skip
    assert pool.memory_summary(len(QUERIES)).batched_cuda_graph is True
    assert got == cut


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decode_backend", DECODERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_graph_logits_within_twice_the_one_agent_error(backend, decode_backend, dtype):
    model, tok, pool = _cuda_pool()
    ref_model = copy.deepcopy(model).double()
    low = copy.deepcopy(model).to(dtype)
    suffixes = [pool.prompt.suffix_ids(tok, q) for q in QUERIES]
    rows = []
    with BatchedDecoder(pool, low, backend, 8192, new_tokens=len(CONTINUATION),
                        decode_backend=decode_backend, cuda_graph=True) as dec:  # fmt: skip
        rows.append(dec.prefill(suffixes))
        for t in CONTINUATION:
            rows.append(dec.step(torch.full((len(QUERIES),), t, device="cuda")))
        assert dec.cuda_graph_ran
    graphed = torch.stack(rows, dim=1).double().cpu()
    for i, q in enumerate(QUERIES):
        ref = _single_logits(pool, ref_model, tok, q)
        single_err = (_single_logits(pool, low, tok, q) - ref).abs().max().item()
        graphed_err = (graphed[i] - ref).abs().max().item()
        assert graphed_err <= 2 * single_err + 1e-3, (i, graphed_err, single_err)


def test_cuda_graph_capture_failure_falls_back_to_eager(monkeypatch, caplog):
    """A host sync inside the captured step (here added to the suffix bias) makes the real
    capture fail: one warning, the same tokens as eager, and the next call captures again."""
    import polykv_vllm.hf.batch as batch

    model, tok, pool = _cuda_pool()
    stop, want = _stop_at_different_steps(pool, model, tok)
    real = batch.suffix_bias

    def syncing(mask, *args):
        if torch.cuda.is_current_stream_capturing():
            mask.any().item()  # not allowed while capturing
        return real(mask, *args)

    monkeypatch.setattr(batch, "suffix_bias", syncing)
    with caplog.at_level(logging.INFO, logger="polykv_vllm.hf.graph"):
        got = pool.generate_ids(QUERIES, model, tok, max_new_tokens=12, eos_token_id=stop)
    assert got == want
    assert pool.memory_summary(len(QUERIES)).batched_cuda_graph is False
    lines = [r.getMessage() for r in caplog.records if r.name == "polykv_vllm.hf.graph"]
    assert len(lines) == 1 and "decoding eagerly" in lines[0], lines
    monkeypatch.setattr(batch, "suffix_bias", real)
    again = pool.generate_ids(QUERIES, model, tok, max_new_tokens=12, eos_token_id=stop)
    assert again == want and pool.memory_summary(len(QUERIES)).batched_cuda_graph is True
