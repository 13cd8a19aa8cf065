"""``benchmarks/hf_batch.py`` end to end on a two-layer random model (CPU): every method runs,
the JSON records the backend that ran, repeats per agent count, and is written after every run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import hf_batch  # noqa: E402


def test_benchmark_writes_every_method(tmp_path, monkeypatch):
    out = tmp_path / "tiny"
    argv = ["hf_batch.py", "--model", "random-tiny", "--doc-tokens", "48", "--agents", "1", "3"]
    argv += ["--new-tokens", "2", "--repeats", "2", "--repeats-at", "3=1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    hf_batch.main()
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["complete"] is True
    assert out.with_suffix(".png").exists()
    counts = {}
    for run in result["runs"]:
        assert "error" not in run, run
        counts[run["agents"], run["method"]] = counts.get((run["agents"], run["method"]), 0) + 1
        assert run["tokens"] == 2 * run["agents"]
    assert counts == {
        (n, m): 2 if n == 1 else 1
        for n in (1, 3)
        for m in ("sequential", "private", "batched-torch")
    }
    by_n = {row["agents"]: row for row in result["summary"]}
    assert by_n[3]["batched-torch"]["backend_ran"] == ["torch"]
    assert by_n[1]["batched-torch"]["repeats"] == 2
    assert "batched-torch/private" in by_n[3]
    assert result["environment"]["xformers"] is None or isinstance(
        result["environment"]["xformers"], str
    )


def test_bad_repeats_at_is_refused():
    with pytest.raises(SystemExit, match="--repeats-at '64' is invalid"):
        hf_batch.parse_repeats_at("64")
