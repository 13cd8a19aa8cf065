"""HF fallback on every accelerator this machine has (CPU always; CUDA and MPS where present):
the pool and the agents follow the model's device."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_hf_support import DOCUMENT, make_model, make_tokenizer
from transformers import DynamicCache

from polykv_vllm.hf import (
    SharedPrefixCache,
    compress,
    create_agents,
    generate_uncompressed_ids,
    prompt_ids,
)

DEVICES = ["cpu"]
if torch.cuda.is_available():
    DEVICES.append("cuda")
if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
    DEVICES.append("mps")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_pool_and_agents_follow_the_model_device(device, dtype):
    model = make_model().to(device=device, dtype=dtype)
    tok = make_tokenizer(chat=True)
    pool = compress(model, tok, DOCUMENT)
    assert pool.layout.device.type == device
    assert all(t.device.type == device for p in pool.layers for t in p.tensors())
    assert pool.token_ids.device.type == "cpu"

    # Same logits as a DynamicCache holding the decoded prefix, on the device, in the dtype.
    ids = prompt_ids(pool, tok, "Why?")
    suffix = ids[:, pool.num_tokens :]
    ref = DynamicCache()
    for i, packed in enumerate(pool.layers):
        k, v = pool.codec.decode(packed, dtype=dtype)
        ref.update(k.transpose(0, 1)[None], v.transpose(0, 1)[None], i)
    ours = SharedPrefixCache(pool)
    with torch.no_grad():
        got = model(suffix, past_key_values=ours, use_cache=True).logits
        want = model(suffix, past_key_values=ref, use_cache=True).logits
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert all(t.device.type == device and t.dtype == dtype for t in ours.held_tensors())

    # Threaded agents on the device give the sequential answers; the baseline runs there too.
    queries = ["What is evaluated?", "Which method is called?", "Why?"]
    pairs = list(zip(create_agents(pool, model, tok, 3), queries, strict=True))
    sequential = [a.generate_ids(q, 6) for a, q in pairs]
    agents = create_agents(pool, model, tok, 3)
    with ThreadPoolExecutor(max_workers=3) as ex:
        futures = [ex.submit(a.generate_ids, q, 6) for a, q in zip(agents, queries, strict=True)]
        threaded = [f.result() for f in futures]
    assert threaded == sequential
    assert generate_uncompressed_ids(pool, model, tok, queries[0], 6)
    summary = pool.memory_summary(3)
    assert summary.agent_peak_bytes == max(a.peak_bytes for a in agents)
    assert summary.agent_working_dtype == str(dtype).removeprefix("torch.")
