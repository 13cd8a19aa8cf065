"""The report of ``gpu_paired.py``: per configuration medians, per pair of configurations the
per-round paired TTFT ratios (median, min, max) and a verdict vs issue 11's target, as a
Markdown table and a PNG (matplotlib, if importable)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PHASES = ("cold", "hit", "revisit")
# label -> (numerator (config, phase), denominator (config, phase), target or None)
PAIRS: dict[str, tuple[tuple[str, str], tuple[str, str], float | None]] = {
    "cpu_tier_hit_vs_plugin_off": (("polykv-cpu", "hit"), ("bf16", "hit"), 1.03),
    "gpu_tier_hit_vs_plugin_off": (("polykv-gpu", "hit"), ("bf16", "hit"), 1.03),
    "gpu_tier_revisit_vs_hit": (("polykv-gpu", "revisit"), ("bf16", "hit"), 1.1),
    "cpu_tier_revisit_vs_offload_revisit": (("polykv-cpu", "revisit"), ("offload", "revisit"), 0.5),
    "cpu_tier_revisit_vs_recompute": (("polykv-cpu", "revisit"), ("bf16", "revisit"), None),
}


def summarize(rounds: list[dict[str, Any]], configs: Sequence[str]) -> dict[str, Any]:
    """Per configuration medians, per pair the per-round ratios and a verdict."""
    medians = {
        c: {p: statistics.median(r["measurements"][c][p]["ms"] for r in rounds) for p in PHASES}
        for c in configs
    }
    pairs: dict[str, Any] = {}
    for label, ((nc, np_), (dc, dp), target) in PAIRS.items():
        if nc not in configs or dc not in configs:
            continue
        ratios = [
            r["measurements"][nc][np_]["ms"] / r["measurements"][dc][dp]["ms"] for r in rounds
        ]
        med = statistics.median(ratios)
        met = sum(x <= target for x in ratios) if target is not None else None
        if target is None:
            verdict = "no target"
        elif max(ratios) <= target:
            verdict = f"met in every round (<= {target:g}x)"
        elif med <= target:
            verdict = f"met by the median, {met} of {len(ratios)} rounds (<= {target:g}x)"
        else:
            verdict = f"missed: median {med:.3f}x > {target:g}x ({met} of {len(ratios)} rounds)"
        if target is not None and len(ratios) < 6:
            verdict += f"; only {len(ratios)} rounds (6 or more for a verdict)"
        pairs[label] = {
            "numerator": f"{nc} {np_}",
            "denominator": f"{dc} {dp}",
            "target": target,
            "per_round": ratios,
            "median": med,
            "min": min(ratios),
            "max": max(ratios),
            "rounds_met": met,
            "verdict": verdict,
        }
    return {"medians_ms": medians, "pairs": pairs}


def markdown(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = [
        f"Paired TTFT, {res['device']}, vLLM {res['vllm_version']}, {res['args']['doc_tokens']}"
        f"-token documents + {res['args']['query_tokens']}-token queries, {len(res['rounds'])}"
        " rounds, engines up at once, one measurement at a time, rotating order.",
        f"Command: `{res['command']}`",
        "",
        "| config | cold (ms) | prefix hit (ms) | revisit (ms) | engine start (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c, m in s["medians_ms"].items():
        start = res["engines"][c]["engine_start_s"]
        lines.append(
            f"| {c} | {m['cold']:.2f} | {m['hit']:.2f} | {m['revisit']:.2f} | {start:.0f} |"
        )
    lines += [
        "",
        "| paired ratio (per round) | median | min | max | target | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p in s["pairs"].values():
        target = f"<= {p['target']:g}x" if p["target"] is not None else "-"
        lines.append(
            f"| {p['numerator']} / {p['denominator']} | {p['median']:.3f}x | {p['min']:.3f}x |"
            f" {p['max']:.3f}x | {target} | {p['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> Path | None:
    """Per pair the per-round ratios and the target (dashed); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    pairs = res["summary"]["pairs"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, p in enumerate(pairs.values()):
        color = f"C{i}"
        label = f"{p['numerator']} / {p['denominator']} (median {p['median']:.2f}x)"
        ax.plot(range(len(p["per_round"])), p["per_round"], "o-", color=color, label=label)
        if p["target"] is not None:
            ax.axhline(p["target"], color=color, linestyle="--", linewidth=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("paired TTFT ratio (dashed: target)")
    ax.set_title(f"Paired TTFT ratios, {res['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
