"""HF fallback with the real embedded SmolLM2-135M-Instruct (fp32, CPU)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytestmark = pytest.mark.model

# Real English text not written by this project (Python's own documentation).
DOCUMENT_CHARS = 420
QUERIES = ["What does the with statement do?", "What method is called first?"]
NEW_TOKENS = 8
FIRST_TOKENS = 3


@pytest.fixture(scope="module")
def embedded():
    from polykv_vllm.embedded import load_embedded_model

    # Two agent threads on a 2-core machine: one intra-op thread each avoids OpenMP threads
    # fighting over the cores (which made this test 10x slower on a loaded machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_embedded_model()
    torch.set_num_threads(threads)


def test_two_agents_match_uncompressed_baseline(embedded):
    from pydoc_data.topics import topics

    from polykv_vllm.hf import (
        SharedPrefixCache,
        compress,
        create_agents,
        generate_uncompressed_ids,
        prompt_ids,
    )

    model, tokenizer = embedded
    document = topics["with"][:DOCUMENT_CHARS].strip()
    pool = compress(model, tokenizer, document)
    assert pool.prompt.chat  # SmolLM2-Instruct has a chat template
    assert pool.num_layers == 30 and pool.layout.kv_heads == 3 and pool.layout.head_dim == 64
    agents = create_agents(pool, model, tokenizer, 2)
    with ThreadPoolExecutor(max_workers=2) as ex:
        futures = [
            ex.submit(a.generate_ids, q, max_new_tokens=NEW_TOKENS)
            for a, q in zip(agents, QUERIES, strict=True)
        ]
        answers = [f.result() for f in futures]
    for query, got in zip(QUERIES, answers, strict=True):
        want = generate_uncompressed_ids(pool, model, tokenizer, query, NEW_TOKENS)
        assert got[:FIRST_TOKENS] == want[:FIRST_TOKENS], (tokenizer.decode(got), want)
        # Teacher-forced on the baseline's answer, most next-token choices agree.
        ids = torch.cat([prompt_ids(pool, tokenizer, query), torch.tensor([want])], dim=1)
        with torch.no_grad():
            full = model(ids).logits[0, pool.num_tokens :]
            ours = model(
                ids[:, pool.num_tokens :], past_key_values=SharedPrefixCache(pool), use_cache=True
            ).logits[0]
        agree = (full.argmax(-1) == ours.argmax(-1)).float().mean().item()
        assert agree >= 0.75, (query, agree)
    summary = pool.memory_summary(2)
    assert summary.agent_peak_bytes is not None
    assert summary.pool_bytes < summary.shared_bf16_bytes / 2.7  # K8/V3 at head dim 64: 2.78x
    # One agent's measured working memory is far below a private fp32 copy of the document.
    fp32_copy = 2 * summary.shared_bf16_bytes
    assert summary.agent_peak_bytes < fp32_copy / 4
