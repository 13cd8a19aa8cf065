"""The static-shape decoding step of ``pool.generate`` (``polykv_vllm/hf/graph.py``) on the CPU:
run eagerly (``cuda_graph="static"``) against the dynamic path (greedy tokens identical, logits
within the 2x rule, different query lengths, early stops, same memory), and replayed by a CPU
stand-in for a CUDA graph that bakes in every Python value like a real capture (so a step
input that is not in a device buffer gives wrong tokens), plus the fallback when a capture
fails. The real CUDA graph is tested in ``tests/test_hf_batch_cuda.py``."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from test_hf_batch import CONTINUATION, QUERIES, _setup, _single_logits
from test_hf_support import DOCUMENT, make_model, make_tokenizer, stop_at_different_steps
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from polykv_vllm.hf import compress, graph
from polykv_vllm.hf.batch import BatchedDecoder
from polykv_vllm.hf.graph import resolve_cuda_graph

_SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero"}


class _FakeGraph(TorchDispatchMode):
    """CPU stand-in for a CUDA graph. While active it records every aten op with its arguments;
    :meth:`replay` runs them again on the same tensor objects and writes each result into the
    tensor the recording produced. Python values (ints, shapes, slices) are baked in, as in a
    CUDA graph; an op that needs the host to read device data raises, as a capture does."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []
        self.replays = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in _SYNCS:
            raise RuntimeError(f"{func} reads device data on the host: not capturable")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out

    def replay(self) -> None:
        self.replays += 1
        for func, args, kwargs, out in self.ops:
            new = func(*args, **kwargs)
            for old, fresh in zip(tree_leaves(out), tree_leaves(new), strict=True):
                if isinstance(old, torch.Tensor) and old.data_ptr() != fresh.data_ptr():
                    old.copy_(fresh)


def _fake_capture(fn):
    fake = _FakeGraph()
    with fake:
        out = fn()
    _fake_capture.last = fake
    return fake, out


@pytest.fixture
def fake_graph(monkeypatch):
    """``cuda_graph=True`` on the CPU with :class:`_FakeGraph` for the capture."""
    import polykv_vllm.hf.generate as gen

    monkeypatch.setattr(graph, "_warm_up", lambda fn: fn())
    monkeypatch.setattr(graph, "_capture", _fake_capture)
    monkeypatch.setattr(gen, "resolve_cuda_graph", _graph_unless_false)


def _graph_unless_false(value, device):
    return "eager" if value is False else "graph"


def test_fake_graph_bakes_python_values_and_reads_buffers():
    buf, n = torch.zeros(3), [2]
    fake, out = _fake_capture(lambda: buf * 2 + n[0])
    buf.fill_(1.0)
    n[0] = 100  # a Python value: baked in at capture
    fake.replay()
    assert out.tolist() == [4.0, 4.0, 4.0]


def test_resolve_cuda_graph():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_cuda_graph("auto", cpu) == "eager"
    assert resolve_cuda_graph("auto", cuda) == "graph"
    assert resolve_cuda_graph(True, cuda) == "graph"
    assert resolve_cuda_graph(False, cuda) == "eager"
    assert resolve_cuda_graph("static", cpu) == "static"
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        resolve_cuda_graph(True, cpu)
    for bad in (1, "on", None):
        with pytest.raises(ValueError, match=f"cuda_graph={bad!r} is invalid"):
            resolve_cuda_graph(bad, cpu)
    model, tok, pool = _setup(seed=1)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        pool.generate(["a"], model, tok, cuda_graph=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chat", [False, True])
def test_static_step_gives_the_dynamic_paths_greedy_tokens(seed, chat):
    model, tok, pool = _setup(seed=seed, chat=chat)
    want = pool.generate_ids(QUERIES, model, tok, max_new_tokens=10, eos_token_id=None)
    got = pool.generate_ids(
        QUERIES, model, tok, max_new_tokens=10, eos_token_id=None, cuda_graph="static"
    )
    assert got == want
    assert pool.memory_summary(len(QUERIES)).batched_cuda_graph is False
    assert model.config._attn_implementation == "sdpa"


def _stop_at_different_steps(pool, model, tok):
    found = stop_at_different_steps(pool, model, tok, QUERIES)
    assert found is not None, "the test needs agents that stop at different steps"
    return found


def test_static_step_with_agents_stopping_at_different_steps():
    model, tok, pool = _setup(seed=1)
    stop, want = _stop_at_different_steps(pool, model, tok)
    got = pool.generate_ids(QUERIES, model, tok, max_new_tokens=12, eos_token_id=stop,
                            cuda_graph="static")  # fmt: skip
    assert got == want


def _static_logits(pool, model, tok, queries, **kw):
    suffixes = [pool.prompt.suffix_ids(tok, q) for q in queries]
    rows = []
    with BatchedDecoder(pool, model, new_tokens=len(CONTINUATION), **kw) as dec:
        rows.append(dec.prefill(suffixes))
        for t in CONTINUATION:
            rows.append(dec.step(torch.full((len(queries),), t, dtype=torch.int64)))
        assert dec.live == len(queries)
    return torch.stack(rows, dim=1).double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,kv_heads", [(16, 2), (24, 1)])
def test_static_logits_within_twice_the_one_agent_error(dtype, head_dim, kv_heads):
    model, tok, pool = _setup(head_dim=head_dim, kv_heads=kv_heads)
    ref_model = copy.deepcopy(model).double()
    low = copy.deepcopy(model).to(dtype)
    static = _static_logits(pool, low, tok, QUERIES, static=True)
    dynamic = _static_logits(pool, low, tok, QUERIES)
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    for i, q in enumerate(QUERIES):
        ref = _single_logits(pool, ref_model, tok, q)
        single_err = (_single_logits(pool, low, tok, q) - ref).abs().max().item()
        dynamic_err = (dynamic[i] - ref).abs().max().item()
        static_err = (static[i] - ref).abs().max().item()
        assert static_err <= 2 * single_err + floor, (i, static_err, single_err)
        assert static_err <= 2 * dynamic_err + floor, (i, static_err, dynamic_err)


def test_static_memory_equals_the_dynamic_paths_and_misuse_is_refused():
    model, tok, pool = _setup(seed=1)
    kw = dict(max_new_tokens=7, eos_token_id=None)
    pool.generate_ids(QUERIES, model, tok, **kw)
    want = pool.memory_summary(len(QUERIES))
    pool.generate_ids(QUERIES, model, tok, cuda_graph="static", **kw)
    got = pool.memory_summary(len(QUERIES))
    assert got.batched_peak_bytes == want.batched_peak_bytes
    assert got.batched_document_bytes == want.batched_document_bytes
    with BatchedDecoder(pool, model, new_tokens=1, static=True) as dec:
        with pytest.raises(RuntimeError, match="before prefill"):
            dec.step(torch.zeros(2, dtype=torch.int64))
        dec.prefill([[1, 2], [3]])
        dec.step(torch.zeros(2, dtype=torch.int64))
        with pytest.raises(RuntimeError, match="hold 3 slots"):
            dec.step(torch.zeros(2, dtype=torch.int64))
        with pytest.raises(RuntimeError, match="keeps every agent"):
            dec.keep(torch.tensor([0]))


def test_static_step_with_keep_decoded():
    model, tok = make_model(seed=1, layers=4), make_tokenizer(False)
    pool = compress(model, tok, DOCUMENT)
    want = pool.generate_ids(QUERIES, model, tok, max_new_tokens=6, eos_token_id=None)
    got = pool.generate_ids(QUERIES, model, tok, max_new_tokens=6, eos_token_id=None,
                            keep_decoded=True, cuda_graph="static")  # fmt: skip
    assert got == want


@pytest.mark.parametrize("chat", [False, True])
def test_replayed_step_gives_the_dynamic_paths_tokens(fake_graph, chat):
    model, tok, pool = _setup(seed=1, chat=chat)
    if chat:  # the chat-template model's answers do not stop at different steps
        stop = None
        want = pool.generate_ids(
            QUERIES, model, tok, max_new_tokens=12, eos_token_id=None, cuda_graph=False
        )
    else:
        stop, want = _stop_at_different_steps(pool, model, tok)
    got = pool.generate_ids(QUERIES, model, tok, max_new_tokens=12, eos_token_id=stop)
    assert got == want
    assert pool.memory_summary(len(QUERIES)).batched_cuda_graph is True
    assert "CUDA graph" in str(pool.memory_summary(len(QUERIES)))
    # one warm-up step, then a replay per step until the last agent stopped
    assert _fake_capture.last.replays == max(len(w) for w in want) - 2


def test_replayed_logits_equal_the_eager_static_steps(fake_graph):
    model, tok, pool = _setup(seed=2)
    eager = _static_logits(pool, model, tok, QUERIES, static=True)
    replayed = _static_logits(pool, model, tok, QUERIES, cuda_graph=True)
    assert _fake_capture.last.replays == len(CONTINUATION) - 1
    torch.testing.assert_close(replayed, eager, rtol=0, atol=1e-6)


def test_a_step_input_baked_at_capture_gives_wrong_tokens(fake_graph, monkeypatch):
    """The stand-in catches what a real graph would get wrong: the written slot taken from a
    Python int instead of the device buffer (the test above can fail)."""
    model, tok, pool = _setup(seed=1)
    kw = dict(max_new_tokens=10, eos_token_id=None)
    want = pool.generate_ids(QUERIES, model, tok, cuda_graph=False, **kw)

    def baked(self):
        return self._at(self._ids, torch.tensor([self._next - 1]))

    monkeypatch.setattr(graph.StaticRun, "_step_fn", baked)
    assert pool.generate_ids(QUERIES, model, tok, **kw) != want


@pytest.mark.parametrize("where", ["_capture", "_warm_up"])
def test_a_failing_capture_falls_back_to_eager_with_one_line(monkeypatch, caplog, where):
    import polykv_vllm.hf.generate as gen

    def fail(fn):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    model, tok, pool = _setup(seed=1)
    stop, want = _stop_at_different_steps(pool, model, tok)
    monkeypatch.setattr(graph, "_warm_up", lambda fn: fn())
    monkeypatch.setattr(graph, where, fail)
    monkeypatch.setattr(gen, "resolve_cuda_graph", _graph_unless_false)
    with caplog.at_level(logging.INFO, logger="polykv_vllm.hf.graph"):
        got = pool.generate_ids(QUERIES, model, tok, max_new_tokens=12, eos_token_id=stop)
    assert got == want
    assert pool.memory_summary(len(QUERIES)).batched_cuda_graph is False
    lines = [r.getMessage() for r in caplog.records if r.name == "polykv_vllm.hf.graph"]
    assert len(lines) == 1 and "operation not permitted" in lines[0], lines
    assert "decoding eagerly" in lines[0] and "more detail" not in lines[0]
