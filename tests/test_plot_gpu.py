"""Unit tests of ``benchmarks/plot_gpu.py``: ratios from synthetic result files of both
benchmarks, missing configurations, the Markdown report and the PNG."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("plot_gpu", BENCHMARKS / "plot_gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["plot_gpu"] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


pg = _load()


def _serve(name: str, prefix_hit: float, revisit: float, req_s: float) -> dict[str, Any]:
    return {
        "config": name,
        "ttft_cold_ms": 100.0,
        "ttft_prefix_hit_ms": prefix_hit,
        "ttft_revisit_ms": revisit,
        "ttft_revisit2_ms": prefix_hit,
        "throughput_pass1_req_s": req_s / 2,
        "throughput_pass2_req_s": req_s,
        "gpu_max_allocated_gib": 20.0,
    }


SERVE = {
    "device": "H100",
    "args": {},
    "results": [
        _serve("bf16", 25.0, 100.0, 5.0),
        _serve("fp8", 20.0, 90.0, 8.0),
        _serve("offload", 25.0, 80.0, 4.0),
        {**_serve("polykv-gpu", 20.0, 30.0, 6.0), "revisit_load_ms": 7.0},
        _serve("polykv-cpu", 20.0, 40.0, 5.0),
        {"config": "turboquant", "error": "Traceback ...\nRuntimeError: needs FA2"},
    ],
}


def _ratios(data: dict[str, Any]) -> dict[str, Any]:
    run = pg.load_run(data, "r")
    return {r["ratio"]: r["value"] for r in pg.ratio_table(run)}


def test_gpu_serve_ratios() -> None:
    r = _ratios(SERVE)
    assert r["GPU tier revisit / its prefix-hit TTFT"] == pytest.approx(1.5)
    assert r["CPU tier revisit / its prefix-hit TTFT"] == pytest.approx(2.0)
    assert r["CPU tier revisit / offload revisit"] == pytest.approx(0.5)
    assert r["GPU tier revisit / recompute"] == pytest.approx(0.3)
    assert r["CPU tier revisit / recompute"] == pytest.approx(0.4)
    assert r["offload revisit / recompute"] == pytest.approx(0.8)
    assert r["polykv-gpu req/s / fp8 req/s"] == pytest.approx(0.75)
    assert r["polykv-cpu req/s / fp8 req/s"] == pytest.approx(0.625)
    assert r["polykv-cpu req/s / offload req/s"] == pytest.approx(1.25)
    assert r["polykv-gpu req/s / bf16 req/s"] == pytest.approx(1.2)
    assert r["polykv-gpu req/s / turboquant req/s"] is None  # its run failed
    texts = {x["ratio"]: x["text"] for x in pg.ratio_table(pg.load_run(SERVE, "r"))}
    assert texts["polykv-gpu req/s / turboquant req/s"] == "n/a (turboquant failed)"
    assert "polykv-gpu median TTFT / bf16" not in r  # gpu_serve does not measure it


def test_missing_configs_give_na_with_the_reason() -> None:
    data = {**SERVE, "results": [x for x in SERVE["results"] if x["config"] != "offload"]}
    run = pg.load_run(data, "no-offload")
    table = {r["ratio"]: r for r in pg.ratio_table(run)}
    assert table["CPU tier revisit / offload revisit"]["text"] == "n/a (no offload)"
    assert table["polykv-cpu req/s / offload req/s"]["value"] is None
    assert table["GPU tier revisit / recompute"]["value"] == pytest.approx(0.3)
    only = pg.load_run({"results": [_serve("polykv-gpu", 20.0, 30.0, 6.0)]}, "alone")
    texts = {r["ratio"]: r["text"] for r in pg.ratio_table(only)}
    assert texts["polykv-gpu req/s / fp8 req/s"] == "n/a (no fp8)"
    assert texts["GPU tier revisit / its prefix-hit TTFT"] == "1.500"


def test_bench_serve_ratios() -> None:
    def config(name: str, req_s: float, median: float) -> dict[str, Any]:
        figures = {"request_throughput": req_s, "median_ttft_ms": median}
        return {"config": name, "status": "ok", "clients": {"bench": {"figures": figures}}}

    data = {
        "format": "gpu_bench_serve",
        "device": "H100",
        "results": [
            config("bf16", 10.0, 200.0),
            config("fp8", 12.0, 150.0),
            config("offload", 8.0, 100.0),
            config("polykv-gpu", 9.0, 50.0),
            config("polykv-cpu", 6.0, 80.0),
            {"config": "turboquant", "status": "failed", "error": "no FA2", "clients": {}},
        ],
    }
    r = _ratios(data)
    assert r["polykv-gpu req/s / fp8 req/s"] == pytest.approx(0.75)
    assert r["polykv-cpu req/s / offload req/s"] == pytest.approx(0.75)
    assert r["polykv-gpu median TTFT / bf16"] == pytest.approx(0.25)
    assert r["polykv-cpu median TTFT / offload"] == pytest.approx(0.8)
    assert "GPU tier revisit / recompute" not in r  # no loadgen run, no revisit TTFT
    assert "turboquant" in pg.load_run(data, "b").errors


def test_markdown_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(SERVE))
    png, md = tmp_path / "out.png", tmp_path / "out.md"
    assert pg.main([str(path), "--png", str(png), "--md", str(md), "--labels", "equal-kv"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == md.read_text().strip()
    assert "### equal-kv (gpu_serve, H100)" in out
    assert "| polykv-gpu | 100.0 | 20.00 | 30.00 | 20.00 | 7.00 | 3.00 | 6.00 | 20.00 |" in out
    assert "| CPU tier revisit / offload revisit | 0.500 | 40.00 | 80.00 |" in out
    assert "turboquant: failed (RuntimeError: needs FA2)" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
