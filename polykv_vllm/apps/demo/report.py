"""The demo's result table: per-run medians (:func:`summarize`) and the terminal table."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from polykv_vllm.apps.demo.options import DemoConfig
from polykv_vllm.apps.demo.run import COMPUTED, EXTERNAL, LOCAL_HIT, RunResult

__all__ = ["render_table", "summarize"]


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.1f} MB"


def summarize(run: RunResult) -> dict[str, Any]:
    """Per-run figures used by the table (medians over requests)."""
    recs = run.records
    out_tokens = sum(r.completion_tokens for r in recs)
    store_revisits = [r for r in recs if r.revisit and r.tokens_from_store > 0]
    delta = {
        k: run.metrics_after.get(k, 0.0) - run.metrics_before.get(k, 0.0)
        for k in (EXTERNAL, LOCAL_HIT, COMPUTED, "vllm:polykv_load_seconds_sum")
    }
    return {
        "ttft_first_s": _median([r.ttft_s for r in recs if not r.revisit]),
        "ttft_revisit_s": _median([r.ttft_s for r in recs if r.revisit]),
        "ttft_revisit_from_store_s": _median([r.ttft_s for r in store_revisits]),
        "revisits_from_store": len(store_revisits),
        "revisits": sum(r.revisit for r in recs),
        "output_tok_per_s": out_tokens / run.wall_s if run.wall_s else float("nan"),
        "requests_per_s": len(recs) / run.wall_s if run.wall_s else float("nan"),
        "wall_s": run.wall_s,
        "startup_s": run.startup_s,
        "store_bytes": run.metrics_after.get("vllm:polykv_stored_bytes"),
        "store_engine_dtype_bytes": run.metrics_after.get("vllm:polykv_stored_bf16_bytes"),
        "stored_documents": run.metrics_after.get("vllm:polykv_stored_documents"),
        "tokens_stored": run.metrics_after.get("vllm:polykv_tokens_stored"),
        "kv_cache_tokens": run.kv_cache_tokens,
        "kv_cache_bytes": run.kv_cache_bytes,
        "prompt_tokens_delta": delta,
    }


def render_table(cfg: DemoConfig, on: RunResult | None, off: RunResult | None) -> str:
    """The final table, for the terminal."""
    s_on = summarize(on) if on else None
    s_off = summarize(off) if off else None
    rows: list[tuple[str, str, str]] = []

    def ms(x: float | None) -> str:
        return "-" if x is None or x != x else f"{x * 1e3:.0f} ms"

    def both(key: str, fmt: Any) -> tuple[str, str]:
        return (fmt(s_on[key]) if s_on else "-", fmt(s_off[key]) if s_off else "-")

    kv = s_on or s_off
    assert kv is not None
    rows.append(
        (
            "vLLM KV cache (cache_config_info)",
            *both("kv_cache_tokens", lambda t: f"{t} tokens" if t else "n/a"),
        )
    )
    rows.append(("  its bytes", *both("kv_cache_bytes", _mb)))
    if s_on:
        docs_stored = s_on["stored_documents"]
        rows.append(
            (
                "polykv store (vllm:polykv_stored_bytes)",
                f"{_mb(s_on['store_bytes'])}"
                + (f", {docs_stored:.0f} docs" if docs_stored is not None else ""),
                "-",
            )
        )
        engine = s_on["store_engine_dtype_bytes"]
        rows.append(("  same tokens in engine dtype fp32", _mb(engine), "-"))
        rows.append(
            (
                "  same tokens in bf16 (fp32 bytes / 2)",
                _mb(engine / 2 if engine is not None else None),
                "-",
            )
        )
        load_s = s_on["prompt_tokens_delta"]["vllm:polykv_load_seconds_sum"]
        rows.append(("  time spent loading from the store", f"{load_s * 1e3:.0f} ms in all", "-"))
        if s_on["store_bytes"] and engine:
            ratio = engine / s_on["store_bytes"]
            rows.append(
                ("  compression vs fp32 / vs bf16", f"{ratio:.2f}x / {ratio / 2:.2f}x", "-")
            )
    rows.append(("TTFT first read (median)", *both("ttft_first_s", ms)))
    rows.append(("TTFT revisit (median)", *both("ttft_revisit_s", ms)))
    if s_on:
        n_store = f"{s_on['revisits_from_store']}/{s_on['revisits']} revisits"
        rows.append(
            (
                "  revisits served from the store",
                f"{ms(s_on['ttft_revisit_from_store_s'])} ({n_store})",
                "-",
            )
        )
    if s_on and s_off and s_on["ttft_revisit_s"] > 0:
        speedup = s_off["ttft_revisit_s"] / s_on["ttft_revisit_s"]
        rows.append(("  revisit speed-up vs recompute", f"{speedup:.1f}x", "1.0x"))
    for key, name in ((EXTERNAL, "store"), (LOCAL_HIT, "vLLM cache"), (COMPUTED, "computed")):
        rows.append(
            (
                f"prompt tokens from {name}",
                *both("prompt_tokens_delta", lambda d, k=key: f"{d[k]:.0f}"),
            )
        )
    rows.append(
        ("output tokens/s (1 request at a time)", *both("output_tok_per_s", "{:.1f}".format))
    )
    rows.append(("requests/s", *both("requests_per_s", "{:.2f}".format)))
    rows.append(("workload wall time", *both("wall_s", "{:.1f} s".format)))
    rows.append(("server start-up", *both("startup_s", "{:.1f} s".format)))
    if on and off:
        same = [a.text == b.text for a, b in zip(on.records, off.records, strict=True)]
        differ = [f"#{r.index + 1}" for r, s in zip(on.records, same, strict=True) if not s]
        rows.append(
            (
                "answers equal to plugin off (greedy)",
                f"{sum(same)}/{len(same)}" + (f" (differ: {' '.join(differ)})" if differ else ""),
                "-",
            )
        )
    w0 = max(len(r[0]) for r in rows) + 2
    w1 = max(len(r[1]) for r in rows + [("", "polykv on", "")]) + 2
    head = f"{'':<{w0}}{'polykv on':<{w1}}plugin off"
    lines = [head, "-" * (len(head) + 12)]
    lines += [f"{a:<{w0}}{b:<{w1}}{c}" for a, b, c in rows]
    return "\n".join(lines)
