"""Batched agents over one pool (``SharedPool.generate``) on tiny random Llama models: logits
against the one-agent path under the 2x rule, identical greedy tokens, different query lengths,
early stops, memory O(1) in agents for the document, bad input."""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_hf_support import DOCUMENT, make_model, make_tokenizer

from polykv_vllm.hf import SharedPrefixCache, compress, create_agents
from polykv_vllm.hf.batch import BatchedDecoder
from polykv_vllm.hf.hydragen import resolve_backend

# Different lengths on purpose (left padding in the batched prefill).
QUERIES = [
    "What does __enter__ do?",
    "Name it.",
    "When is __exit__ loaded for later use?",
    "x",
    "What is evaluated to obtain a context manager?",
]
CONTINUATION = [11, 184, 30, 196, 53, 8]  # teacher-forced tokens after each query


def _setup(seed=1, layers=3, chat=False, **kw):
    model, tok = make_model(seed=seed, layers=layers, **kw), make_tokenizer(chat)
    return model, tok, compress(model, tok, DOCUMENT)


def _single_logits(pool, model, tok, query):
    """The one-agent path: logits [1 + len(CONTINUATION), V] at the last query token and after
    each teacher-forced token, float64."""
    suffix = pool.prompt.suffix_ids(tok, query) + CONTINUATION
    ids = torch.tensor([suffix])
    with torch.no_grad():
        logits = model(ids, past_key_values=SharedPrefixCache(pool), use_cache=True).logits
    start = len(suffix) - len(CONTINUATION) - 1
    return logits[0, start:].double()


def _batched_logits(pool, model, tok, queries):
    """The batched path on the same ids: [N, 1 + len(CONTINUATION), V], float64."""
    suffixes = [pool.prompt.suffix_ids(tok, q) for q in queries]
    rows = []
    with BatchedDecoder(pool, model) as dec:
        rows.append(dec.prefill(suffixes))
        for t in CONTINUATION:
            rows.append(dec.step(torch.full((len(queries),), t, dtype=torch.int64)))
    return torch.stack(rows, dim=1).double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,kv_heads", [(16, 2), (24, 1), (16, 4)])
@pytest.mark.parametrize("chat", [False, True])
def test_logits_within_twice_the_one_agent_error(dtype, head_dim, kv_heads, chat):
    """Against a float64 reference of the one-agent path, the batched logits' error is at most
    2x the one-agent path's own error in the same dtype (flash-attention's rule)."""
    model, tok, pool = _setup(head_dim=head_dim, kv_heads=kv_heads, chat=chat)
    ref_model = copy.deepcopy(model).double()
    low = copy.deepcopy(model).to(dtype)
    batched = _batched_logits(pool, low, tok, QUERIES)
    for i, q in enumerate(QUERIES):
        ref = _single_logits(pool, ref_model, tok, q)
        single_err = (_single_logits(pool, low, tok, q) - ref).abs().max().item()
        batched_err = (batched[i] - ref).abs().max().item()
        floor = 1e-5 if dtype == torch.float32 else 1e-3
        assert batched_err <= 2 * single_err + floor, (i, batched_err, single_err)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chat", [False, True])
def test_greedy_tokens_identical_to_sequential_agents_fp32(seed, chat):
    model, tok, pool = _setup(seed=seed, chat=chat)
    got = pool.generate_ids(QUERIES, model, tok, max_new_tokens=10, eos_token_id=None)
    agent = create_agents(pool, model, tok, 1)[0]
    want = [agent.generate_ids(q, max_new_tokens=10, eos_token_id=None) for q in QUERIES]
    assert got == want
    assert all(len(g) == 10 for g in got)
    assert model.config._attn_implementation == "sdpa"  # restored after the batch


def test_agents_stopping_at_different_steps_match_sequential():
    """A stop token that agents reach at different steps: each answer ends at its first stop
    token (included), the others keep decoding unchanged, as with one agent at a time."""
    model, tok, pool = _setup(seed=1)
    free = pool.generate_ids(QUERIES, model, tok, max_new_tokens=12, eos_token_id=None)
    stop = free[2][3]  # some agents reach it early, others later or never
    ends = [o.index(stop) + 1 if stop in o else len(o) for o in free]
    assert len(set(ends)) > 1, "the test needs agents that stop at different steps"
    got = pool.generate_ids(QUERIES, model, tok, max_new_tokens=12, eos_token_id=stop)
    assert got == [o[:e] for o, e in zip(free, ends, strict=True)]
    agent = create_agents(pool, model, tok, 1)[0]
    seq = [agent.generate_ids(q, max_new_tokens=12, eos_token_id=stop) for q in QUERIES]
    assert got == seq


def test_document_memory_is_constant_in_agents_and_suffixes_grow():
    model, tok = make_model(seed=1, layers=4), make_tokenizer(False)
    pool = compress(model, tok, DOCUMENT)
    doc, total = [], []
    for n in (1, 3, 6):
        queries = (QUERIES * 2)[:n]
        pool.generate_ids(queries, model, tok, max_new_tokens=6, chunk_tokens=64)
        summary = pool.memory_summary(n)
        assert summary.batched_agents == n
        assert summary.batched_peak_bytes is not None
        assert summary.batched_document_bytes is not None
        doc.append(summary.batched_document_bytes)
        total.append(summary.batched_peak_bytes)
        assert f"batched peak, {n} agents" in str(summary)
    assert doc[0] == doc[1] == doc[2]
    assert total[0] < total[1] < total[2]
    # The document's share is one decoded float32 layer (K and V) plus one 64-token chunk of
    # codec output being copied in, whatever N: below the bf16 copy of all layers.
    layout = pool.layout
    one_layer = 2 * pool.num_tokens * layout.kv_heads * layout.head_dim * 4
    one_chunk = 2 * min(64, pool.num_tokens) * layout.kv_heads * layout.head_dim * 4
    assert one_layer <= doc[0] <= one_layer + one_chunk < pool.bf16_bytes
    assert pool.memory_summary(6).batched_backend == "torch"
    assert "torch backend" in str(pool.memory_summary(6))


def test_sampling_is_seeded():
    model, tok, pool = _setup(seed=1)
    a = pool.generate_ids(QUERIES, model, tok, max_new_tokens=8, temperature=1.5, seed=3)
    b = pool.generate_ids(QUERIES, model, tok, max_new_tokens=8, temperature=1.5, seed=3)
    greedy = pool.generate_ids(QUERIES, model, tok, max_new_tokens=8, eos_token_id=None)
    assert a == b
    assert a != greedy


def test_generate_returns_text():
    model, tok, pool = _setup(seed=1)
    texts = pool.generate(QUERIES[:2], model, tok, max_new_tokens=4, eos_token_id=None)
    ids = pool.generate_ids(QUERIES[:2], model, tok, max_new_tokens=4, eos_token_id=None)
    assert texts == [tok.decode(i, skip_special_tokens=True) for i in ids]


@pytest.mark.parametrize(
    "queries,kwargs,match",
    [
        ([], {}, r"queries=\[\] is empty"),
        (["a"], {"max_new_tokens": 0}, "max_new_tokens=0 is invalid"),
        (["a"], {"temperature": -1.0}, "temperature=-1.0 is invalid"),
        (["a", "b" * 900], {"max_new_tokens": 4}, r"queries\[1\] \(\d+ tokens\)"),
        (["a"], {"backend": "flash"}, "backend='flash' is unknown"),
        (["a"], {"backend": "xformers"}, "backend='xformers' needs a CUDA model"),
        (["a"], {"eos_token_id": "tokenizer"}, "eos_token_id='tokenizer' is invalid"),
    ],
)
def test_bad_input_names_the_value(queries, kwargs, match):
    model, tok, pool = _setup()
    with pytest.raises(ValueError, match=match):
        pool.generate(queries, model, tok, **kwargs)
    assert model.config._attn_implementation == "sdpa"


def test_single_string_is_refused():
    model, tok, pool = _setup()
    with pytest.raises(TypeError, match="wrap a single query in a list"):
        pool.generate("What?", model, tok)


def test_other_model_and_other_device_are_refused():
    model, tok, pool = _setup()
    other = make_model(layers=3, head_dim=24)
    with pytest.raises(ValueError, match="head_dim=24 but the pool was compressed with"):
        pool.generate(["a"], other, tok)
    meta = copy.deepcopy(model).to("meta")
    with pytest.raises(ValueError, match="device=meta but the pool was compressed with"):
        pool.generate(["a"], meta, tok)


def test_same_shape_other_weights_are_refused():
    model, tok, pool = _setup(seed=1)
    other = make_model(seed=2, layers=3)
    with pytest.raises(ValueError, match="has the pool's shape but other weights"):
        pool.generate(["a"], other, tok)
    with pytest.raises(ValueError, match="has the pool's shape but other weights"):
        create_agents(pool, other, tok, 1)
    # A cast of the pool's model is the same model.
    pool.generate_ids(["a"], copy.deepcopy(model).to(torch.bfloat16), tok, max_new_tokens=1)


def test_backend_resolution(monkeypatch, caplog):
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with caplog.at_level(logging.INFO, logger="polykv_vllm.hf.hydragen"):
        assert resolve_backend("xformers", torch.device("cuda")) == "torch"
    assert len(caplog.records) == 1
    assert "xformers is not installed" in caplog.records[0].getMessage()


def test_progress_falls_back_to_log_lines(monkeypatch, caplog):
    import polykv_vllm.hf.generate as gen

    model, tok, pool = _setup()
    monkeypatch.setattr(gen.importlib.util, "find_spec", lambda name: None)
    with caplog.at_level(logging.INFO, logger="polykv_vllm.hf.generate"):
        pool.generate(QUERIES[:2], model, tok, max_new_tokens=10, eos_token_id=None, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "polykv_vllm.hf.generate"]
    assert lines and lines[-1] == "step 10/10, 2 of 2 agents still decoding"


def test_xformers_without_cuda_operators_falls_back(monkeypatch, caplog):
    """An xformers that imports but cannot run its operator on the device (PyPI's wheel without
    CUDA operators raises NotImplementedError when called) is a fallback, not a crash."""
    import importlib.util
    import sys
    import types

    from polykv_vllm.hf.hydragen import _xformers_problem

    def refuse(*args, **kwargs):
        raise NotImplementedError("No operator found: xFormers wasn't build with CUDA support")

    fmha = types.SimpleNamespace(memory_efficient_attention_partial=refuse)
    ops = types.ModuleType("xformers.ops")
    ops.fmha = fmha  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    device = torch.device("meta")  # not CUDA: the probe's own call must fail and be caught
    assert "xformers cannot run on meta" in str(_xformers_problem(device))
    with caplog.at_level(logging.INFO, logger="polykv_vllm.hf.hydragen"):
        assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert len(caplog.records) == 1 and "xformers cannot run on cuda" in caplog.text


def test_broken_xformers_falls_back_with_one_line(monkeypatch, caplog):
    """An xformers wheel that does not import (built for another torch) is a fallback too."""
    import importlib.util
    import sys

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setitem(sys.modules, "xformers", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with caplog.at_level(logging.INFO, logger="polykv_vllm.hf.hydragen"):
        assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert len(caplog.records) == 1
    assert "xformers failed to import (ModuleNotFoundError" in caplog.records[0].getMessage()


def test_keep_decoded_gives_the_same_tokens_and_holds_every_layer():
    model, tok = make_model(seed=1, layers=4), make_tokenizer(False)
    pool = compress(model, tok, DOCUMENT)
    want = pool.generate_ids(QUERIES, model, tok, max_new_tokens=6, eos_token_id=None)
    one = pool.memory_summary(len(QUERIES)).batched_document_bytes
    got = pool.generate_ids(
        QUERIES, model, tok, max_new_tokens=6, eos_token_id=None, keep_decoded=True
    )
    assert got == want
    kept = pool.memory_summary(len(QUERIES)).batched_document_bytes
    layout = pool.layout
    one_layer = 2 * pool.num_tokens * layout.kv_heads * layout.head_dim * 4
    assert one is not None and kept is not None
    assert pool.num_layers * one_layer <= kept < one + pool.num_layers * one_layer
    with pytest.raises(ValueError, match="keep_decoded=1 is invalid"):
        pool.generate(["a"], model, tok, keep_decoded=1)


def test_prefix_within_one_chunk_is_decoded_straight_into_the_buffer():
    model, tok, pool = _setup(seed=1)
    chunked = pool.generate_ids(QUERIES, model, tok, max_new_tokens=5, chunk_tokens=32)
    whole = pool.generate_ids(QUERIES, model, tok, max_new_tokens=5, chunk_tokens=4096)
    assert chunked == whole
    layout = pool.layout
    one_layer = 2 * pool.num_tokens * layout.kv_heads * layout.head_dim * 4
    assert pool.memory_summary(1).batched_document_bytes == one_layer
    with pytest.raises(ValueError, match="chunk_tokens=0 is invalid"):
        pool.generate(["a"], model, tok, chunk_tokens=0)


def test_suffix_buffers_are_allocated_once_for_the_whole_run():
    """The measured peak is the document's share plus exactly one copy of every agent's suffix
    K/V (prefill width + new tokens, all layers): no second copy from a per-step concatenation."""
    model, tok, pool = _setup(seed=1)
    new = 7
    pool.generate_ids(QUERIES, model, tok, max_new_tokens=new, eos_token_id=None)
    summary = pool.memory_summary(len(QUERIES))
    assert summary.batched_peak_bytes is not None and summary.batched_document_bytes is not None
    width = max(len(pool.prompt.suffix_ids(tok, q)) for q in QUERIES)
    layout = pool.layout
    per_slot = 2 * layout.kv_heads * layout.head_dim * 4  # K and V, float32
    suffixes = pool.num_layers * len(QUERIES) * (width + new - 1) * per_slot
    assert summary.batched_peak_bytes == summary.batched_document_bytes + suffixes


def test_decode_backend_resolution_and_record():
    from polykv_vllm.hf.prefix_decode import resolve_decode_backend

    cpu = torch.device("cpu")
    assert resolve_decode_backend("auto", cpu, torch.float32) == "torch"
    assert resolve_decode_backend("torch", cpu, torch.float32) == "torch"
    with pytest.raises(ValueError, match="decode_backend='gpu' is unknown"):
        resolve_decode_backend("gpu", cpu, torch.float32)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="runs on CUDA"):
            resolve_decode_backend("triton", cpu, torch.float32)
    model, tok, pool = _setup(seed=1)
    pool.generate_ids(["a"], model, tok, max_new_tokens=2, decode_backend="torch")
    summary = pool.memory_summary(1)
    assert summary.batched_decode_backend == "torch"
    assert "torch decode" in str(summary)
    with pytest.raises(ValueError, match="decode_backend"):
        pool.generate_ids(["a"], model, tok, max_new_tokens=2, decode_backend="nope")


_INTERPRETED = """
import sys, torch
sys.path.insert(0, TESTS)
from test_hf_support import DOCUMENT, make_model, make_tokenizer
from polykv_vllm.hf import compress
from polykv_vllm.hf.cache import MemoryMeter
from polykv_vllm.hf.prefix_decode import PrefixDecoder
model, tok = make_model(seed=1, layers=2), make_tokenizer(False)
pool = compress(model, tok, DOCUMENT)
cpu = torch.device("cpu")
dec = PrefixDecoder(pool, "triton", 256, MemoryMeter(), doc := MemoryMeter())
for layer in range(pool.num_layers):
    k, v = dec.decode(layer, torch.float32, cpu)
    wk, wv = pool.decode_layer(layer, 0, pool.num_tokens, torch.float32, cpu)
    for got, want in ((k, wk), (v, wv)):
        assert got.shape == want.shape, (got.shape, want.shape)
        # the kernel's centroid tables are fp16: 2^-10 of the layer's scale
        assert (got - want).abs().max() <= 2**-10 * want.abs().max(), layer
buffer = 2 * pool.num_tokens * pool.layout.kv_heads * pool.layout.head_dim * 4
assert doc.peak_bytes == buffer, (doc.peak_bytes, buffer)  # one buffer for every layer
qs = ["What does __enter__ do?", "x"]
kw = dict(max_new_tokens=4, eos_token_id=None)
a = pool.generate_ids(qs, model, tok, decode_backend="triton", **kw)
assert pool.memory_summary(2).batched_decode_backend == "triton"
b = pool.generate_ids(qs, model, tok, decode_backend="torch", **kw)
c = pool.generate_ids(qs, model, tok, decode_backend="triton", keep_decoded=True, **kw)
assert a == b == c, (a, b, c)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_decode_backend_under_the_interpreter():
    """The Triton decode path (single-block buffer, plans per layer) on the CPU under Triton's
    interpreter (it must be enabled before triton is imported: a child process)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", f"TESTS = {str(Path(__file__).parent)!r}\n" + _INTERPRETED],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
