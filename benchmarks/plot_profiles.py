"""Bytes vs quality of uniform presets and calibrated layer-wise profiles (issue 14).

Reads the ``quality.py`` JSONs of several corpora (``--runs LABEL=JSON``), writes a PNG of real
compression (bf16 bytes / stored bytes, scales and norms included) against the mean PPL delta
vs fp32 with its 95% t interval, one panel per corpus, the profiles joined as a curve (the
Pareto front they trace), the presets as single markers; and a markdown table of every variant
(ratio, PPL delta with CI, teacher-forced and free-running greedy agreement, needles).

    python benchmarks/plot_profiles.py \\
        --runs pydoc=benchmarks/results/quality_profiles_pydoc.json \\
        licenses=benchmarks/results/quality_profiles_licenses.json \\
        --out benchmarks/results/quality_profiles
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: issue 14's targets: (min ratio, max mean PPL delta %, min teacher-forced agreement)
TARGETS = [(4.5, 1.5, 0.95), (6.0, 3.0, None), (2.78, 0.4, 0.97)]


def _rows(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(n, s) for n, s in doc["summary"].items() if n != "fp32" and "delta_vs_fp32" in s]


def _fmt(d: dict[str, Any] | None, key: str = "mean", digits: int = 3) -> str:
    return "" if not d else f"{d[key]:.{digits}f}"


def table(runs: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| corpus | variant | real bytes | ΔPPL % (95% CI) | TF agreement | free-running | "
        "needles |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, doc in runs.items():
        for name, s in _rows(doc):
            d = s["delta_vs_fp32"]
            needles = (
                f"{round(s['retrieval_acc'] * s['retrieval_n'])}/{s['retrieval_n']}"
                if "retrieval_acc" in s
                else ""
            )
            lines.append(
                f"| {label} | `{name}` | {s['ratio_vs_bf16']:.2f}x | {d['mean']:+.2f} "
                f"[{d['t_lo']:+.2f}, {d['t_hi']:+.2f}] | {_fmt(s.get('greedy_tf'))} | "
                f"{_fmt(s.get('greedy_free'))} | {needles} |"
            )
    return lines


def targets(runs: dict[str, dict[str, Any]]) -> list[str]:
    """One line per (corpus, target): the best variant meeting the ratio, and whether it
    meets the quality."""
    out = []
    for label, doc in runs.items():
        for ratio, max_delta, min_tf in TARGETS:
            cands = [(n, s) for n, s in _rows(doc) if s["ratio_vs_bf16"] >= ratio - 1e-3]
            if not cands:
                out.append(f"- {label}, >= {ratio}x: no variant")
                continue
            name, s = min(cands, key=lambda c: c[1]["delta_vs_fp32"]["mean"])
            tf = s.get("greedy_tf", {}).get("mean")
            ok = s["delta_vs_fp32"]["mean"] <= max_delta and (min_tf is None or (tf or 0) >= min_tf)
            out.append(
                f"- {label}, >= {ratio}x (ΔPPL <= +{max_delta}%"
                + (f", TF >= {min_tf}" if min_tf else "")
                + f"): best `{name}` {s['ratio_vs_bf16']:.2f}x, ΔPPL "
                f"{s['delta_vs_fp32']['mean']:+.2f}%, TF {tf if tf is None else round(tf, 3)}: "
                + ("met" if ok else "MISSED")
            )
    return out


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), squeeze=False)
    for ax, (label, doc) in zip(axes[0], runs.items(), strict=True):
        rows = _rows(doc)
        prof = sorted(
            [(s["ratio_vs_bf16"], s["delta_vs_fp32"]) for n, s in rows if n.startswith("profile")]
        )
        if prof:
            xs = [r for r, _ in prof]
            ax.errorbar(
                xs,
                [d["mean"] for _, d in prof],
                yerr=[
                    [d["mean"] - d["t_lo"] for _, d in prof],
                    [d["t_hi"] - d["mean"] for _, d in prof],
                ],
                marker="o",
                capsize=3,
                label="calibrated profiles",
            )
        for name, s in rows:
            if name.startswith("profile"):
                continue
            d = s["delta_vs_fp32"]
            ax.errorbar(
                [s["ratio_vs_bf16"]],
                [d["mean"]],
                yerr=[[d["mean"] - d["t_lo"]], [d["t_hi"] - d["mean"]]],
                marker="s",
                capsize=3,
                linestyle="none",
                label=f"preset {name}",
            )
        for ratio, max_delta, _ in TARGETS:
            ax.plot([ratio], [max_delta], marker="*", color="red", markersize=9, linestyle="none")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xlabel("compression vs bf16 (real bytes, scales and norms included)")
        ax.set_ylabel("mean PPL delta vs fp32 (%), 95% CI")
        windows = len(doc["config"]["window_starts"])
        ax.set_title(f"{label}: {windows} windows of {doc['config']['context']}-token context")
        ax.legend(fontsize=8, title="red stars: issue 14 targets", title_fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M-Instruct: bytes vs PPL delta (lower right is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, metavar="LABEL=JSON")
    p.add_argument("--out", type=Path, required=True, help="output stem (.png and .md)")
    args = p.parse_args(argv)
    runs = {}
    for item in args.runs:
        label, _, path = item.partition("=")
        runs[label] = json.loads(Path(path).read_text())
    plot(runs, args.out.with_suffix(".png"))
    lines = ["# Layer-wise profiles vs uniform presets (issue 14)", "", *table(runs), ""]
    lines += ["Targets:", "", *targets(runs), ""]
    for label, doc in runs.items():
        lines.append(f"- {label}: `{doc['command']}` ({doc['elapsed_s']:.0f}s)")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
