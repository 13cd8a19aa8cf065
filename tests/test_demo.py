"""The README's first command, `make demo` (``python -m polykv_vllm.demo``), at a small size:
real vLLM servers (plugin on, then off), the openai client, and the printed table."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm


def test_demo_serves_revisits_from_the_store_and_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    cmd = [
        sys.executable,
        "-m",
        "polykv_vllm.demo",
        "--documents",
        "2",
        "--agents",
        "2",
        "--doc-tokens",
        "400",
        "--max-tokens",
        "4",
        "--kv-cache-docs",
        "1.5",
        "--port",
        "8791",
        "--json-out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout
    assert "TTFT revisit (median)" in table
    assert "answers equal to plugin off (greedy)" in table
    served = re.search(r"revisits served from the store\s+\S+ ms \((\d+)/(\d+) revisits\)", table)
    assert served is not None, table[-3000:]
    assert int(served.group(1)) >= 1  # the revisits after eviction came from the store
    assert json.loads(out.read_text())  # every measurement was written
