"""CPU serving benchmark: polykv on vs plain vLLM, the real server, the embedded SmolLM2-135M.

One server per mode runs side by side (``polykv``: ``polykv-vllm serve ... --kv-cache-plugin
polykv`` on ``--port``; ``baseline``: the same server without it on ``--port`` + 1), both with
the same small vLLM KV cache (``--kv-cache-docs`` documents' worth). Two loadgen scenarios:

- ``reuse``: ``--documents`` documents x ``--agents`` agents, interleaved, one request at a time,
  polykv server first, then baseline. A revisit finds its document evicted from vLLM's cache;
  polykv serves it from the compressed store, plain vLLM recomputes it. Figure of merit: revisit
  TTFT p50, baseline / polykv.
- ``noreuse``: ``--rounds`` rounds; each round sends ``--noreuse-requests`` fresh documents
  (disjoint from every other round and from the reuse ones), one agent each,
  ``--noreuse-concurrency`` in flight, to each server in turn (order alternating per round), so
  background load on a shared machine hits both modes alike. Nothing is reused, so polykv only
  pays for storing. Figure of merit: output tok/s over all rounds, polykv / baseline.

Writes loadgen's ``<out>_<mode>_reuse.*`` and ``<out>_<mode>_noreuse_r<k>.*`` files and
``<out>_summary.json`` + ``<out>_summary.png`` (both modes, the command, the resolved config).

Example (what produced ``benchmarks/results/cpu_*``)::

    VLLM_CPU_OMP_THREADS_BIND=0-1 python benchmarks/cpu_serve.py --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import loadgen

from polykv_vllm.apps.demo.options import DemoConfig, server_command
from polykv_vllm.apps.serving import running_server
from polykv_vllm.embedded import embedded_model_dir

logger = logging.getLogger("cpu_serve")


def scenario_config(
    a: argparse.Namespace, mode: str, scenario: str, port: int, round_: int = 0
) -> loadgen.LoadConfig:
    """The loadgen settings of one scenario of one mode (``round_`` picks fresh documents)."""
    reuse = scenario == "reuse"
    return loadgen.LoadConfig(
        base_url=f"http://127.0.0.1:{port}/v1",
        model="smollm2",
        api="chat",
        documents=a.documents if reuse else a.noreuse_requests,
        agents=a.agents if reuse else 1,
        rounds=1,
        order="interleaved",
        doc_tokens=a.doc_tokens,
        doc_offset=0 if reuse else a.documents + round_ * a.noreuse_requests,
        max_tokens=a.max_tokens,
        rate=None,
        concurrency=1 if reuse else a.noreuse_concurrency,
        doc_id=mode == "polykv" and reuse,
        seed=0,
        max_requests=loadgen.MAX_REQUESTS_CAP,
        time_limit_s=a.time_limit,
        warmup=1,
        out=f"{a.out}_{mode}_{scenario}" + ("" if reuse else f"_r{round_}"),
    )


def run_scenario(a: argparse.Namespace, cfg: loadgen.LoadConfig, mode: str) -> dict[str, Any]:
    """One loadgen run; its report."""
    logger.info("%s: %s", mode, cfg)
    report = asyncio.run(loadgen.main_async(cfg, ["(cpu_serve)", mode, cfg.out]))
    logger.info("%s: %s\n%s", mode, cfg.out, loadgen.format_summary(report))
    return report


def merge_rounds(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput over all no-reuse rounds of one mode (total tokens / total wall time)."""
    sums = [r["summary"] for r in reports]
    wall = sum(s["wall_s"] for s in sums)
    return {
        "output_tok_per_s": sum(s["output_tokens"] for s in sums) / wall,
        "requests_per_s": sum(s["requests"] - s["failed"] for s in sums) / wall,
        "failed": sum(s["failed"] for s in sums),
        "per_round_output_tok_per_s": [s["output_tok_per_s"] for s in sums],
        "files": [f for r in reports for f in r.get("files", [])],
    }


def run_all(a: argparse.Namespace, modes: list[str], model_dir: Path) -> dict[str, Any]:
    """Start one server per mode (side by side), run reuse per mode, then the no-reuse rounds
    alternating between the modes, so background load on a shared machine hits both alike."""
    results: dict[str, Any] = {m: {"noreuse_rounds": []} for m in modes}
    ports = {m: a.port + i for i, m in enumerate(modes)}
    logs = Path(tempfile.mkdtemp(prefix="polykv-cpu-serve-"))
    with contextlib.ExitStack() as stack:
        for mode in modes:
            demo = DemoConfig(
                documents=a.documents,
                doc_tokens=a.doc_tokens,
                max_tokens=a.max_tokens,
                port=ports[mode],
                kv_cache_docs=a.kv_cache_docs,
                store_bytes=a.store_bytes,
                preset=a.preset,
                startup_timeout_s=a.startup_timeout,
            )
            cmd = server_command(demo, model_dir, plugin=mode == "polykv")
            results[mode]["server_command"] = " ".join(shlex.quote(c) for c in cmd)
            server = stack.enter_context(
                running_server(
                    cmd, ports[mode], logs / f"{mode}.log", timeout_s=a.startup_timeout, label=mode
                )
            )
            results[mode]["startup_s"] = server.startup_s
        for mode in modes:
            cfg = scenario_config(a, mode, "reuse", ports[mode])
            results[mode]["reuse"] = run_scenario(a, cfg, mode)
        for r in range(a.rounds):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                cfg = scenario_config(a, mode, "noreuse", ports[mode], r)
                results[mode]["noreuse_rounds"].append(run_scenario(a, cfg, mode))
    for mode in modes:
        results[mode]["noreuse"] = merge_rounds(results[mode]["noreuse_rounds"])
    return results


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The two figures of merit (empty where a mode did not run)."""
    p, b = results.get("polykv"), results.get("baseline")
    if not p or not b:
        return {}
    ttft_p = p["reuse"]["summary"]["ttft_revisit_s"]["p50"]
    ttft_b = b["reuse"]["summary"]["ttft_revisit_s"]["p50"]
    tput_p = p["noreuse"]["output_tok_per_s"]
    tput_b = b["noreuse"]["output_tok_per_s"]
    per_round = [
        x / y
        for x, y in zip(
            p["noreuse"]["per_round_output_tok_per_s"],
            b["noreuse"]["per_round_output_tok_per_s"],
            strict=True,
        )
    ]
    return {
        "revisit_ttft_p50_s": {"polykv": ttft_p, "baseline": ttft_b},
        "revisit_ttft_speedup": ttft_b / ttft_p if ttft_p else None,
        "first_ttft_p50_s": {
            "polykv": p["reuse"]["summary"]["ttft_first_visit_s"]["p50"],
            "baseline": b["reuse"]["summary"]["ttft_first_visit_s"]["p50"],
        },
        "noreuse_output_tok_per_s": {"polykv": tput_p, "baseline": tput_b},
        "noreuse_throughput_ratio": tput_p / tput_b if tput_b else None,
        "noreuse_throughput_ratio_per_round": per_round,
        "noreuse_requests_per_s": {
            "polykv": p["noreuse"]["requests_per_s"],
            "baseline": b["noreuse"]["requests_per_s"],
        },
        "targets": {
            "revisit_ttft_speedup >= 5": None,
            "noreuse_throughput_ratio >= 0.95": None,
        },
    }


def plot_summary(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Bars: first/revisit TTFT (reuse) and output tok/s (noreuse), per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("polykv", "baseline") if m in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    for i, m in enumerate(modes):
        s = results[m]["reuse"]["summary"]
        vals = [s["ttft_first_visit_s"]["p50"] * 1e3, s["ttft_revisit_s"]["p50"] * 1e3]
        ax1.bar([x + i * width for x in (0, 1)], vals, width, label=m)
        ax2.bar(i, results[m]["noreuse"]["output_tok_per_s"], 0.6, label=m)
    ax1.set_xticks([width / 2, 1 + width / 2], ["first read", "revisit"])
    ax1.set(ylabel="TTFT p50 (ms)", title="reuse: documents x agents, interleaved")
    ax1.legend()
    ax2.set_xticks(range(len(modes)), modes)
    ax2.set(ylabel="output tok/s (all rounds)", title="noreuse: distinct documents")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--documents", type=int, default=4)
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--doc-tokens", type=int, default=1500)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--noreuse-requests", type=int, default=8)
    p.add_argument("--noreuse-concurrency", type=int, default=2)
    p.add_argument(
        "--rounds", type=int, default=3, help="no-reuse rounds per mode, alternating modes"
    )
    p.add_argument("--kv-cache-docs", type=float, default=2.5)
    p.add_argument("--store-bytes", default="256MiB")
    p.add_argument("--preset", default="polykv")
    p.add_argument("--port", type=int, default=8799, help="first port; one per mode")
    p.add_argument("--modes", default="polykv,baseline", help="comma list of polykv, baseline")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--time-limit", type=float, default=900.0, help="per scenario, seconds")
    p.add_argument("--out", default="benchmarks/results/cpu")
    a = p.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    bad = sorted(set(modes) - {"polykv", "baseline"})
    if bad:
        p.error(f"--modes {a.modes!r}: unknown {bad}; allowed polykv, baseline")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    model_dir = embedded_model_dir()
    t0 = time.perf_counter()
    results = run_all(a, modes, model_dir)
    summary: dict[str, Any] = {
        "command": " ".join(shlex.quote(x) for x in ["python", "benchmarks/cpu_serve.py", *argv]),
        "config": vars(a),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": time.perf_counter() - t0,
        "modes": {
            m: {
                "server_command": r["server_command"],
                "startup_s": r["startup_s"],
                "reuse": {k: r["reuse"][k] for k in ("summary", "cache", "files")},
                "noreuse": r["noreuse"],
                "noreuse_rounds": [
                    {k: x[k] for k in ("summary", "cache")} for x in r["noreuse_rounds"]
                ],
            }
            for m, r in results.items()
        },
    }
    comp = compare(results)
    if comp:
        targets = comp["targets"]
        targets["revisit_ttft_speedup >= 5"] = (comp["revisit_ttft_speedup"] or 0) >= 5
        targets["noreuse_throughput_ratio >= 0.95"] = (
            comp["noreuse_throughput_ratio"] or 0
        ) >= 0.95
    summary["comparison"] = comp
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{a.out}_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot_summary(results, Path(f"{a.out}_summary.png"))
    print(json.dumps(comp, indent=2))
    print(f"wrote {a.out}_summary.json, {a.out}_summary.png and per-scenario files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
