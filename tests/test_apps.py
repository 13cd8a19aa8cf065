"""The programs' package (``polykv_vllm.apps``) and its serving harness, without vLLM.

- the library never imports the programs, and importing the harness starts and imports nothing
  heavy;
- ``running_server``: a server that dies or never answers is reported with its log's tail, the
  port is checked first, and stopping it takes its whole process group with it;
- the ``/metrics`` parser's info labels, and the demo's server command.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polykv_vllm.apps import serving

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "polykv_vllm"


def test_the_library_does_not_import_the_programs() -> None:
    offenders = []
    for path in LIBRARY.rglob("*.py"):
        rel = path.relative_to(LIBRARY)
        if rel.parts[0] == "apps" or rel == Path("demo.py"):  # demo.py: the README's shim
            continue
        if re.search(r"^\s*(from|import) polykv_vllm\.apps", path.read_text(), re.MULTILINE):
            offenders.append(str(rel))
    assert offenders == []


def test_importing_the_harness_is_light() -> None:
    code = (
        "import sys, json; import polykv_vllm.apps.serving, polykv_vllm.apps.workload; "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'vllm', 'transformers', 'openai'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_a_server_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "print('bad flag --nope'); raise SystemExit(3)"]
    with (
        pytest.raises(serving.ServerError, match="exited with code 3") as err,
        serving.running_server(cmd, serving.free_port(), tmp_path / "s.log", timeout_s=60),
    ):
        pass
    assert "bad flag --nope" in str(err.value)


def test_a_server_without_health_times_out_with_its_log(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(60)"]
    t0 = time.monotonic()
    with (
        pytest.raises(serving.ServerError, match="no /health within 2 s") as err,
        serving.running_server(cmd, serving.free_port(), tmp_path / "s.log", timeout_s=2),
    ):
        pass
    assert "loading" in str(err.value)
    assert time.monotonic() - t0 < 30  # stopped, not waited for


def test_a_taken_port_is_refused_before_starting(tmp_path: Path) -> None:
    port = serving.free_port()
    http = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while serving.http_get(f"http://127.0.0.1:{port}/", timeout=1)[0] == 0:
            assert time.monotonic() < deadline, "http.server did not start"
            time.sleep(0.2)
        with (
            pytest.raises(serving.ServerError, match=f"port {port} is already in use"),
            serving.running_server(["false"], port, tmp_path / "s.log", timeout_s=5),
        ):
            pass
        assert not (tmp_path / "s.log").exists()  # nothing was started
    finally:
        http.terminate()
        http.wait(timeout=30)


_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


def test_stop_takes_the_whole_process_group(tmp_path: Path) -> None:
    """An engine process of the server must not outlive it."""
    log = tmp_path / "s.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=out, start_new_session=True)
    deadline = time.monotonic() + 30
    while not log.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    child = int(log.read_text().split()[0])
    serving.stop(proc, grace_s=10)
    assert proc.poll() is not None
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and "Z" not in _state(child):
        assert time.monotonic() < deadline, "the child outlived stop()"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return "Z"


def test_metric_labels_and_totals() -> None:
    text = (
        "# HELP vllm:cache_config_info x\n"
        'vllm:cache_config_info{kv_cache_size_tokens="2688",kv_cache_memory_bytes="123"} 1.0\n'
        'vllm:prompt_tokens_by_source_total{source="local_compute"} 5\n'
        'vllm:prompt_tokens_by_source_total{source="external_kv_transfer"} 7\n'
    )
    samples = serving.parse_metrics(text)
    labels = serving.metric_labels(samples, "vllm:cache_config_info")
    assert labels == {"kv_cache_size_tokens": "2688", "kv_cache_memory_bytes": "123"}
    assert serving.metric_labels(samples, "vllm:nothing") == {}
    totals = serving.metric_totals(samples)
    assert totals["vllm:prompt_tokens_by_source"] == 12
    assert totals["vllm:prompt_tokens_by_source[source=external_kv_transfer]"] == 7


def test_server_env_puts_this_package_on_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env = serving.server_env()
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/somewhere"]
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    assert serving.server_env(engine_process=None)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_demo_server_command(tmp_path: Path) -> None:
    from polykv_vllm.apps.demo.options import DemoConfig, server_command

    (tmp_path / "config.json").write_text(
        json.dumps({"hidden_size": 576, "num_attention_heads": 9, "num_hidden_layers": 30,
                    "num_key_value_heads": 3})
    )  # fmt: skip
    cfg = DemoConfig(doc_tokens=400, max_tokens=4, kv_cache_docs=1.5, port=8791)
    off = server_command(cfg, tmp_path, plugin=False)
    on = server_command(cfg, tmp_path, plugin=True)
    assert off[1:5] == ["-m", "polykv_vllm.cli", "serve", str(tmp_path)]
    assert on[: len(off)] == off
    assert on[len(off) :] == ["--kv-cache-plugin", "polykv", "--polykv-store-bytes", "256MiB"]
    # 768 tokens of context (400 + 256 + 4, whole blocks), cache: 6 blocks + 1 of 46080 bytes
    assert off[off.index("--max-model-len") + 1] == "768"
    assert off[off.index("--kv-cache-memory-bytes") + 1] == str(7 * 128 * 46080)
