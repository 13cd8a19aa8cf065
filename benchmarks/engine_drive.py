"""Driving an in-process vLLM engine through a request sequence, and its counters per tier.

:func:`drive` submits requests at their arrivals (closed-loop waves: when the previous wave has
finished) through ``add_request`` / ``step`` and timestamps each step's new tokens on the client
side; :func:`metric_values` and :func:`tiers` turn ``llm.get_metrics()`` into ``vllm:*`` counter
values and the fractions of prompt tokens per source. Pure Python: the engine is duck-typed, so
tests drive a fake one on a fake clock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from workload_gen import Record, Request

__all__ = ["SOURCES", "drive", "metric_values", "tiers"]

# the sources of vllm:prompt_tokens_by_source (vLLM 0.26 and 0.32)
SOURCES = ("local_cache_hit", "external_kv_transfer", "local_compute")


def drive(
    engine: Any,
    requests: Sequence[Request],
    prompt: Callable[[Request], Any],
    params: Any,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    prefix: str = "",
    steps: list[tuple[float, float, int]] | None = None,
) -> tuple[list[Record], float]:
    """Submit ``requests`` to ``engine`` (``add_request(id, prompt, params)``, ``step()``,
    ``has_unfinished_requests()``) at their arrivals, step until all finished; the records and
    the start time. ``params`` must ask for DELTA outputs (new tokens per step). ``steps``, if
    given, gets one ``(start since the run's start, seconds, tokens returned)`` per
    ``step()`` (see :func:`step_summary`)."""
    records: dict[str, Record] = {}
    pending = deque(requests)
    start = clock()

    def submit(r: Request, arrival: float) -> None:
        rid = f"{prefix}{r.index}"
        records[rid] = Record(r.index, r.revisit, arrival)
        engine.add_request(rid, prompt(r), params)

    while pending or engine.has_unfinished_requests():
        now = clock()
        head = pending[0] if pending else None
        if head is not None and head.arrival_s is None and not engine.has_unfinished_requests():
            while pending and pending[0].arrival_s is None and pending[0].wave == head.wave:
                submit(pending.popleft(), now)  # a closed-loop wave, all at once
        while pending and (at := pending[0].arrival_s) is not None and start + at <= now:
            submit(pending.popleft(), start + at)
        if not engine.has_unfinished_requests():
            if pending and (at := pending[0].arrival_s) is not None:
                sleep(max(0.0, start + at - clock()))
            continue
        t_step = clock()
        outs = engine.step()
        if steps is not None:
            n_out = sum(len(o.token_ids) for out in outs for o in out.outputs)
            steps.append((t_step - start, clock() - t_step, n_out))
        for out in outs:
            rec = records[out.request_id]
            t = clock()
            n = sum(len(o.token_ids) for o in out.outputs)
            if n:
                rec.tokens.append((t, n))
            if out.finished:
                rec.finished = t
                rec.num_cached_tokens = int(getattr(out, "num_cached_tokens", 0) or 0)
                latency = getattr(getattr(out, "metrics", None), "first_token_latency", None)
                rec.engine_ttft_s = float(latency) if latency else None
                params_out = (getattr(out, "kv_transfer_params", None) or {}).get("polykv", {})
                rec.tokens_from_store = int(params_out.get("tokens_from_store", 0))
    return [records[k] for k in sorted(records, key=lambda k: records[k].index)], start


def step_summary(steps: Sequence[tuple[float, float, int]], wall_s: float) -> dict[str, Any]:
    """Where the run's wall time went, from :func:`drive`'s ``steps``: how many ``step()``
    calls, the seconds inside them, the steps (and their seconds) that returned no token (a
    step that only prefilled, or only waited for loads), and the time outside any step."""
    inside = sum(dt for _, dt, _ in steps)
    empty = [dt for _, dt, n in steps if n == 0]
    return {
        "steps": len(steps),
        "step_s": inside,
        "steps_without_tokens": len(empty),
        "steps_without_tokens_s": sum(empty),
        "outside_steps_s": max(0.0, wall_s - inside),
    }


def metric_values(metrics: Iterable[Any]) -> dict[str, float]:
    """``vllm:*`` counters and gauges of ``llm.get_metrics()`` summed over engines, keyed
    ``name`` or ``name[source=...]``; histograms as ``name:count`` / ``name:sum``."""
    out: dict[str, float] = {}

    def add(key: str, v: Any) -> None:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = out.get(key, 0.0) + float(v)

    for m in metrics:
        name = str(getattr(m, "name", ""))
        if not name.startswith("vllm:"):
            continue
        source = (getattr(m, "labels", None) or {}).get("source")
        key = f"{name}[source={source}]" if source else name
        if hasattr(m, "count") and hasattr(m, "sum"):
            add(f"{key}:count", m.count)
            add(f"{key}:sum", m.sum)
        else:
            add(key, getattr(m, "value", None))
    return out


def tiers(deltas: dict[str, float]) -> dict[str, Any]:
    """Fractions of prompt tokens per source from ``vllm:prompt_tokens_by_source`` deltas."""
    counts = {s: deltas.get(f"vllm:prompt_tokens_by_source[source={s}]") for s in SOURCES}
    if any(v is None for v in counts.values()):
        return {"tier_tokens": None, "tier_fractions": None}
    total = sum(v or 0.0 for v in counts.values())
    return {
        "tier_tokens": counts,
        "tier_fractions": {s: (v or 0.0) / total for s, v in counts.items()} if total else None,
    }
