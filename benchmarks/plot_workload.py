"""PNG and Markdown table from ``gpu_workload.py`` result folders (one folder per regime).

Per folder: req/s bars, TTFT p50 bars with p99 ticks, and the prompt tokens per tier stacked
(local prefix-cache hit, external = offloading / polykv, computed); the table gives req/s, its
ratio to ``fp8+offload`` and to ``fp8`` (``n/a`` where that configuration is missing or failed),
TTFT p50/p99, ITL p50, the tier fractions, polykv's tokens loaded and the engine start time.

Usage::

    python benchmarks/plot_workload.py results/wl_kv4_cpu8 results/wl_kv4_cpu32 \\
        --labels "docs do not fit in CPU","docs fit" --png wl.png --md wl.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORDER = (
    "bf16",
    "fp8",
    "turboquant",
    "offload",
    "fp8+offload",
    "tq+offload",
    "polykv-cpu",
    "polykv-cpu-fp8",
    "polykv-gpu",
    "polykv-gpu-fp8",
)
BASELINES = ("fp8+offload", "fp8")
TIERS = (
    ("local_cache_hit", "local prefix cache", "tab:green"),
    ("external_kv_transfer", "external (offload / polykv)", "tab:orange"),
    ("local_compute", "computed", "tab:gray"),
)
GIB = 2**30


@dataclass
class Regime:
    """One ``--out`` folder: its workload summary and the result of each configuration."""

    label: str
    workload: dict[str, Any]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def configs(self) -> list[str]:
        names = list(self.results)
        return [c for c in ORDER if c in names] + [c for c in names if c not in ORDER]

    @property
    def device(self) -> str:
        r = next(iter(self.results.values()), {})
        return f"{r.get('device', '?')}, vLLM {r.get('vllm_version', '?')}"


def load_regime(folder: Path, label: str) -> Regime:
    """Read ``workload.json`` and every ``<config>.json`` of ``folder``."""
    wl = folder / "workload.json"
    if not wl.is_file():
        raise SystemExit(f"{folder}: no workload.json; pass a gpu_workload.py --out folder")
    regime = Regime(label, json.loads(wl.read_text()).get("summary", {}))
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if path.name == "workload.json" or data.get("format") != "gpu_workload":
            continue
        name = str(data.get("config", path.stem))
        if data.get("error"):
            lines = [x for x in str(data["error"]).splitlines() if x.strip()]
            regime.errors[name] = lines[-1][:160] if lines else "failed"
        else:
            regime.results[name] = data
    return regime


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def ratio(regime: Regime, config: str, baseline: str) -> str:
    """req/s of ``config`` over ``baseline``'s as text, ``n/a (why)`` where one is missing."""
    if baseline not in regime.results:
        return "n/a (" + ("failed" if baseline in regime.errors else "not run") + ")"
    num = _num(regime.results[config].get("req_s"))
    den = _num(regime.results[baseline].get("req_s"))
    return f"{num / den:.2f}x" if num is not None and den else "n/a"


def _f(x: Any, pct: bool = False) -> str:
    v = _num(x)
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else (f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}")


def markdown(regimes: Sequence[Regime]) -> str:
    parts = []
    for g in regimes:
        w = g.workload
        sizes = ", ".join(
            f"{k} {v / GIB:.2f} GiB" for k, v in w.get("kv_bytes_requested_documents", {}).items()
        )
        parts += [
            f"### {g.label} ({g.device})\n",
            f"{w.get('requests')} requests ({w.get('revisits')} revisits) on "
            f"{w.get('documents_requested')} of {w.get('documents')} documents; the requested "
            f"documents' KV is {sizes} (sizes computed from the model shape); GPU KV cache "
            f"{w.get('kv_gib')} GiB, CPU tier {w.get('cpu_gib')} GiB, polykv GPU store "
            f"{w.get('store_gib')} GiB.\n",
            "| config | req/s | vs fp8+offload | vs fp8 | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
            "| local hit | external | computed | polykv tokens loaded | engine start s |",
            "| --- |" + " ---: |" * 11,
        ]
        for c in g.configs:
            r = g.results[c]
            fr = r.get("tier_fractions") or {}
            loaded = (r.get("polykv_worker") or {}).get("tokens_decompressed")
            cells = [
                _f(r.get("req_s")),
                *(ratio(g, c, b) for b in BASELINES),
                _f(r.get("ttft_p50_ms")),
                _f(r.get("ttft_p99_ms")),
                _f(r.get("itl_p50_ms")),
                *(_f(fr.get(k), pct=True) for k, _, _ in TIERS),
                _f(loaded),
                _f(r.get("engine_start_s")),
            ]
            parts.append(f"| {c} | " + " | ".join(cells) + " |")
        for c, err in g.errors.items():
            parts.append(f"\n{c}: failed ({err})")
        parts.append("")
    return "\n".join(parts)


def plot(regimes: Sequence[Regime], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(regimes), 3, figsize=(16, 4.2 * len(regimes)), squeeze=False)
    for (ax1, ax2, ax3), g in zip(axes, regimes, strict=True):
        cs = g.configs
        xs = list(range(len(cs)))
        colors = ["tab:orange" if c.startswith("polykv") else "tab:blue" for c in cs]

        def get(key: str, g: Regime = g, cs: list[str] = cs) -> list[float]:
            return [_num(g.results[c].get(key)) or math.nan for c in cs]

        ax1.bar(xs, get("req_s"), 0.6, color=colors)
        for x, v in zip(xs, get("req_s"), strict=True):
            if math.isfinite(v):
                ax1.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize=8)
        ax1.set(ylabel="requests/s", title=f"{g.label}: throughput ({g.device})")
        ax2.bar(xs, get("ttft_p50_ms"), 0.6, color=colors, label="TTFT p50")
        ax2.scatter(xs, get("ttft_p99_ms"), marker="_", s=900, color="black", label="p99")
        ax2.set(ylabel="TTFT (ms)", title=f"{g.label}: TTFT")
        ax2.legend(fontsize=8)
        bottom = [0.0] * len(cs)
        for key, label, color in TIERS:
            vals = [(g.results[c].get("tier_fractions") or {}).get(key, math.nan) for c in cs]
            ax3.bar(xs, vals, 0.6, bottom=bottom, color=color, label=label)
            bottom = [
                b + (v if math.isfinite(v) else 0.0) for b, v in zip(bottom, vals, strict=True)
            ]
        ax3.set(ylabel="fraction of prompt tokens", ylim=(0, 1), title=f"{g.label}: tiers")
        ax3.legend(fontsize=8)
        for ax in (ax1, ax2, ax3):
            ax.set_xticks(xs, cs, rotation=25, ha="right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folders", nargs="+", help="gpu_workload.py --out folders, one per regime")
    p.add_argument("--labels", help="comma list, one per folder (default: the folder names)")
    p.add_argument("--png", help="write the figure here")
    p.add_argument("--md", help="also write the Markdown table here")
    a = p.parse_args(argv)
    labels = a.labels.split(",") if a.labels else [Path(f).name for f in a.folders]
    if len(labels) != len(a.folders):
        p.error(f"--labels has {len(labels)} names for {len(a.folders)} folders")
    regimes = [load_regime(Path(f), x) for f, x in zip(a.folders, labels, strict=True)]
    report = markdown(regimes)
    print(report)
    if a.md:
        Path(a.md).write_text(report + "\n")
    if a.png:
        print(f"wrote {plot(regimes, Path(a.png))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
