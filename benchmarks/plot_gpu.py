"""Figures and ratio tables from the GPU serving benchmarks.

Reads one or more result files (one per regime, e.g. equal KV cache vs equal GPU memory) written
by ``benchmarks/gpu_serve.py`` (in-process engine: cold / prefix-hit / revisit TTFT, two
throughput passes) or by ``benchmarks/gpu_bench_serve.py`` (``summary.json``: ``vllm bench
serve`` and loadgen against a server), and writes

- a PNG, one row per file: TTFT per configuration (``gpu_serve``: revisit TTFT bars, each
  configuration's own prefix-hit TTFT as a black tick = the floor, bf16's revisit TTFT = the
  recompute line; ``gpu_bench_serve``: median TTFT bars, p99 ticks) and requests/s per
  configuration;
- a Markdown report (stdout, and ``--md``): per file the figures per configuration and the
  ratios against the baselines (GPU tier revisit / prefix-hit; CPU tier revisit / offload
  revisit; tiers vs recompute; polykv req/s / fp8 req/s; polykv-cpu / offload req/s). A ratio
  whose configuration or figure is missing is shown as ``n/a`` with what is missing.

"Recompute" is bf16's revisit: plain vLLM after the document was evicted from its prefix cache.

Usage::

    python benchmarks/plot_gpu.py benchmarks/results/gpu_serve_h100_slab_v1.json \\
        --png benchmarks/results/gpu_serve_h100_slab_v1.png --md benchmarks/results/gpu.md
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

# (label, numerator (config, figure), denominator (config, figure)); a ratio < 1 means the
# numerator is faster (TTFT) or, for req/s, slower.
RATIOS: tuple[tuple[str, tuple[str, str], tuple[str, str]], ...] = (
    (
        "GPU tier revisit / its prefix-hit TTFT",
        ("polykv-gpu", "revisit_ms"),
        ("polykv-gpu", "prefix_hit_ms"),
    ),
    (
        "CPU tier revisit / its prefix-hit TTFT",
        ("polykv-cpu", "revisit_ms"),
        ("polykv-cpu", "prefix_hit_ms"),
    ),
    ("CPU tier revisit / offload revisit", ("polykv-cpu", "revisit_ms"), ("offload", "revisit_ms")),
    ("GPU tier revisit / recompute", ("polykv-gpu", "revisit_ms"), ("bf16", "revisit_ms")),
    ("CPU tier revisit / recompute", ("polykv-cpu", "revisit_ms"), ("bf16", "revisit_ms")),
    ("offload revisit / recompute", ("offload", "revisit_ms"), ("bf16", "revisit_ms")),
    ("polykv-gpu req/s / fp8 req/s", ("polykv-gpu", "req_s"), ("fp8", "req_s")),
    ("polykv-cpu req/s / fp8 req/s", ("polykv-cpu", "req_s"), ("fp8", "req_s")),
    ("polykv-cpu req/s / offload req/s", ("polykv-cpu", "req_s"), ("offload", "req_s")),
    ("polykv-gpu req/s / bf16 req/s", ("polykv-gpu", "req_s"), ("bf16", "req_s")),
    ("polykv-gpu req/s / turboquant req/s", ("polykv-gpu", "req_s"), ("turboquant", "req_s")),
    ("polykv-gpu median TTFT / bf16", ("polykv-gpu", "median_ttft_ms"), ("bf16", "median_ttft_ms")),
    (
        "polykv-cpu median TTFT / offload",
        ("polykv-cpu", "median_ttft_ms"),
        ("offload", "median_ttft_ms"),
    ),
)
# Figures shown per configuration (name, column title), in this order, where any row has them.
FIGURES = (
    ("cold_ms", "cold TTFT ms"),
    ("prefix_hit_ms", "prefix-hit TTFT ms"),
    ("revisit_ms", "revisit TTFT ms"),
    ("revisit2_ms", "2nd revisit ms"),
    ("load_ms", "store load ms"),
    ("mean_ttft_ms", "mean TTFT ms"),
    ("median_ttft_ms", "median TTFT ms"),
    ("p99_ttft_ms", "p99 TTFT ms"),
    ("mean_itl_ms", "mean ITL ms"),
    ("req_s_pass1", "req/s pass 1"),
    ("req_s", "req/s"),
    ("out_tok_s", "out tok/s"),
    ("prefix_hit_rate", "prefix hit"),
    ("external_hit_rate", "store hit"),
    ("gpu_gib", "GPU GiB"),
)
CONFIG_ORDER = ("bf16", "fp8", "turboquant", "offload", "polykv-gpu", "polykv-cpu")


@dataclass
class Run:
    """One result file: ``rows[config] = {figure: value}`` in the names of :data:`FIGURES`."""

    label: str
    kind: str  # "gpu_serve" or "gpu_bench_serve"
    device: str
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def _num(x: Any) -> float | None:
    """A finite float, else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _clean(d: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in ((k, _num(v)) for k, v in d.items()) if v is not None}


def gpu_serve_row(r: dict[str, Any]) -> dict[str, float]:
    """Figures of one ``gpu_serve.py`` result (req/s is pass 2, the pass that reuses)."""
    return _clean(
        {
            "cold_ms": r.get("ttft_cold_ms"),
            "prefix_hit_ms": r.get("ttft_prefix_hit_ms"),
            "revisit_ms": r.get("ttft_revisit_ms"),
            "revisit2_ms": r.get("ttft_revisit2_ms"),
            "load_ms": r.get("revisit_load_ms"),
            "req_s_pass1": r.get("throughput_pass1_req_s"),
            "req_s": r.get("throughput_pass2_req_s"),
            "out_tok_s": r.get("throughput_pass2_out_tok_s"),
            "gpu_gib": r.get("gpu_max_allocated_gib"),
        }
    )


def bench_row(r: dict[str, Any]) -> dict[str, float]:
    """Figures of one ``gpu_bench_serve.py`` configuration: the bench client's, plus loadgen's
    revisit TTFT (and its req/s where the bench client did not run)."""
    clients = r.get("clients", {})
    bench = clients.get("bench", {})
    lg = clients.get("loadgen", {})
    fig = bench.get("figures") or {}
    lfig = lg.get("figures") or {}
    cache = bench.get("cache") or lg.get("cache") or {}
    return _clean(
        {
            "mean_ttft_ms": fig.get("mean_ttft_ms"),
            "median_ttft_ms": fig.get("median_ttft_ms", lfig.get("median_ttft_ms")),
            "p99_ttft_ms": fig.get("p99_ttft_ms", lfig.get("p99_ttft_ms")),
            "mean_itl_ms": fig.get("mean_itl_ms"),
            "req_s": fig.get("request_throughput", lfig.get("request_throughput")),
            "out_tok_s": fig.get("output_throughput", lfig.get("output_throughput")),
            "revisit_ms": lfig.get("median_ttft_revisit_ms"),
            "cold_ms": lfig.get("median_ttft_first_visit_ms"),
            "prefix_hit_rate": cache.get("prefix_hit_rate"),
            "external_hit_rate": cache.get("external_hit_rate"),
        }
    )


def load_run(data: dict[str, Any], label: str) -> Run:
    """A :class:`Run` from the parsed JSON of either benchmark (format told by its keys)."""
    kind = "gpu_bench_serve" if data.get("format") == "gpu_bench_serve" else "gpu_serve"
    run = Run(label=label, kind=kind, device=str(data.get("device", "?")))
    for r in data.get("results", []):
        name = str(r.get("config", "?"))
        if r.get("error") and (kind == "gpu_serve" or r.get("status") != "ok"):
            run.errors[name] = str(r["error"]).strip().splitlines()[-1][:200] if r["error"] else ""
            if kind == "gpu_serve":
                continue
        row = gpu_serve_row(r) if kind == "gpu_serve" else bench_row(r)
        if row:
            run.rows[name] = row
    return run


def ordered(configs: Sequence[str]) -> list[str]:
    """Known configurations in :data:`CONFIG_ORDER`, then the others in their order."""
    known = [c for c in CONFIG_ORDER if c in configs]
    return known + [c for c in configs if c not in CONFIG_ORDER]


def ratio(run: Run, num: tuple[str, str], den: tuple[str, str]) -> tuple[float | None, str]:
    """``num / den`` of two (config, figure) of ``run``; None and what is missing otherwise."""
    missing = []
    vals = []
    for config, fig in (num, den):
        v = run.rows.get(config, {}).get(fig)
        if config in run.rows:
            why = f"{config} {fig}"
        else:
            why = f"{config} failed" if config in run.errors else f"no {config}"
        if v is None and why not in missing:
            missing.append(why)
        vals.append(v)
    if missing:
        return None, "n/a (" + ", ".join(missing) + ")"
    if not vals[1]:
        return None, "n/a (denominator 0)"
    value = vals[0] / vals[1]  # type: ignore[operator]
    return value, f"{value:.3f}"


def ratio_table(run: Run) -> list[dict[str, Any]]:
    """The ratios of :data:`RATIOS` for ``run`` (label, value or None, text, operands); those
    whose figures this kind of benchmark does not measure at all are left out."""
    measured = {f for row in run.rows.values() for f in row}
    out = []
    for label, num, den in RATIOS:
        if num[1] not in measured or den[1] not in measured:
            continue
        value, text = ratio(run, num, den)
        out.append(
            {
                "ratio": label,
                "value": value,
                "text": text,
                "numerator": run.rows.get(num[0], {}).get(num[1]),
                "denominator": run.rows.get(den[0], {}).get(den[1]),
            }
        )
    return out


def _fmt(v: float | None, fig: str) -> str:
    if v is None:
        return "-"
    if fig.endswith("_rate"):
        return f"{100 * v:.1f}%"
    return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"


def markdown(runs: Sequence[Run], all_ratios: bool = True) -> str:
    """The Markdown report: per run, figures per configuration, then the ratios."""
    parts = []
    for run in runs:
        configs = ordered(list(run.rows))
        figs = [(f, t) for f, t in FIGURES if any(f in run.rows[c] for c in configs)]
        parts.append(f"### {run.label} ({run.kind}, {run.device})\n")
        if configs:
            parts.append("| config | " + " | ".join(t for _, t in figs) + " |")
            parts.append("| --- |" + " ---: |" * len(figs))
            for c in configs:
                cells = " | ".join(_fmt(run.rows[c].get(f), f) for f, _ in figs)
                parts.append(f"| {c} | {cells} |")
        for name, err in run.errors.items():
            parts.append(f"\n{name}: failed ({err})")
        parts.append("\n| ratio | value | numerator | denominator |\n| --- | ---: | ---: | ---: |")
        for r in ratio_table(run):
            if r["value"] is None and not all_ratios:
                continue
            parts.append(
                f"| {r['ratio']} | {r['text']} | {_fmt(r['numerator'], '')} | "
                f"{_fmt(r['denominator'], '')} |"
            )
        parts.append("")
    return "\n".join(parts)


def plot(runs: Sequence[Run], path: Path) -> Path:
    """One row per run: TTFT per configuration (floor and recompute marked) and req/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 3.8 * len(runs)), squeeze=False)
    for (ax1, ax2), run in zip(axes, runs, strict=True):
        configs = ordered(list(run.rows))
        xs = list(range(len(configs)))
        key = "revisit_ms" if run.kind == "gpu_serve" else "median_ttft_ms"
        tick = "prefix_hit_ms" if run.kind == "gpu_serve" else "p99_ttft_ms"
        vals = [run.rows[c].get(key, math.nan) for c in configs]
        colors = ["tab:orange" if c.startswith("polykv") else "tab:blue" for c in configs]
        ax1.bar(xs, vals, 0.6, color=colors)
        ticks = [run.rows[c].get(tick, math.nan) for c in configs]
        ax1.scatter(
            xs,
            ticks,
            marker="_",
            s=900,
            color="black",
            zorder=3,
            label="own prefix-hit TTFT (floor)" if run.kind == "gpu_serve" else "p99 TTFT",
        )
        recompute = run.rows.get("bf16", {}).get("revisit_ms")
        if recompute is not None and run.kind == "gpu_serve":
            ax1.axhline(recompute, ls="--", color="tab:red", label="recompute (bf16 revisit)")
        for x, v in zip(xs, vals, strict=True):
            if math.isfinite(v):
                ax1.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=8)
        ax1.set_xticks(xs, configs, rotation=20)
        what = "revisit TTFT" if run.kind == "gpu_serve" else "median TTFT (bench serve)"
        ax1.set(ylabel=f"{what} (ms)", title=f"{run.label}: {what}")
        ax1.legend(fontsize=8)
        if run.kind == "gpu_serve":
            w = 0.38
            p1 = [run.rows[c].get("req_s_pass1", math.nan) for c in configs]
            p2 = [run.rows[c].get("req_s", math.nan) for c in configs]
            ax2.bar([x - w / 2 for x in xs], p1, w, label="pass 1 (first read)")
            ax2.bar([x + w / 2 for x in xs], p2, w, label="pass 2 (reuse)")
            ax2.legend(fontsize=8)
        else:
            ax2.bar(xs, [run.rows[c].get("req_s", math.nan) for c in configs], 0.6, color=colors)
        ax2.set_xticks(xs, configs, rotation=20)
        ax2.set(ylabel="requests/s", title=f"{run.label}: throughput ({run.device})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("files", nargs="+", help="gpu_serve.py or gpu_bench_serve.py JSON files")
    p.add_argument("--labels", help="comma list, one per file (default: the file names)")
    p.add_argument("--png", help="write the figure here")
    p.add_argument("--md", help="also write the Markdown report here")
    p.add_argument("--only-available", action="store_true", help="leave out n/a ratios")
    a = p.parse_args(argv)
    labels = a.labels.split(",") if a.labels else [Path(f).stem for f in a.files]
    if len(labels) != len(a.files):
        p.error(f"--labels has {len(labels)} names for {len(a.files)} files")
    runs = [
        load_run(json.loads(Path(f).read_text()), label)
        for f, label in zip(a.files, labels, strict=True)
    ]
    report = markdown(runs, all_ratios=not a.only_available)
    print(report)
    if a.md:
        Path(a.md).write_text(report + "\n")
    if a.png:
        print(f"wrote {plot(runs, Path(a.png))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
