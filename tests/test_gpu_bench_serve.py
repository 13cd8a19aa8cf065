"""Unit tests of ``benchmarks/gpu_bench_serve.py``: the server and client command lines (parsed
by vLLM's own ``serve`` and ``bench serve`` parsers), the dummy model folder, result parsing,
the CSV, and that a server failing to start is reported with its log and does not stop the run.

A real end-to-end run (two servers, ~3 min on 2 cores) is too slow for a test; it is the CPU
smoke run in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))  # it imports loadgen and gpu_serve from there
    spec = importlib.util.spec_from_file_location(
        "gpu_bench_serve", BENCHMARKS / "gpu_bench_serve.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench_serve"] = module
    spec.loader.exec_module(module)
    return module


gbs = _load()


def _args(*extra: str) -> argparse.Namespace:
    return gbs.parse_args(["--out", "/tmp/x", *extra])


def _tokenizer_dir(tmp_path: Path) -> Path:
    src = tmp_path / "tok"
    src.mkdir()
    vocab = {f"t{i}": i for i in range(300)}
    added = [{"id": 300, "content": "<|x|>"}]
    (src / "tokenizer.json").write_text(
        json.dumps({"model": {"vocab": vocab}, "added_tokens": added})
    )
    (src / "tokenizer_config.json").write_text("{}")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (src / "model.safetensors").write_text("weights are not copied")
    return src


# --- command lines ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serve_parser() -> argparse.ArgumentParser:
    """vLLM's ``vllm serve`` parser with the polykv plugin's flags (as ``polykv_vllm.cli``)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from polykv_vllm.connector.plugin import register

    register()
    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


@pytest.mark.parametrize("name", gbs.CONFIGS)
def test_server_command_parses_with_vllm(
    name: str, serve_parser: argparse.ArgumentParser, tmp_path: Path
) -> None:
    a = _args("--eager", "--gpu-memory-utilization", "0.5", "--kv-cache-memory-bytes", "1000000")
    cmd = gbs.server_command(name, a, tmp_path, 8123, dummy=True)
    assert cmd[1:4] == ["-m", "polykv_vllm.cli", "serve"]
    ns = serve_parser.parse_args(cmd[4:])
    assert ns.model_tag == str(tmp_path) and ns.port == 8123 and ns.load_format == "dummy"
    assert ns.enforce_eager and ns.gpu_memory_utilization == 0.5
    assert ns.kv_cache_memory_bytes == 1_000_000
    assert ns.max_model_len == 4096 + 64 + 32 + 128
    expected_dtype = {"turboquant": "turboquant_k8v4", "tq+offload": "turboquant_k8v4"}.get(
        name, "fp8" if "fp8" in name else "auto"
    )
    assert ns.kv_cache_dtype == expected_dtype
    assert (ns.kv_offloading_size == 6.0) == name.endswith("offload")
    if name.startswith("polykv"):
        extra = ns.kv_transfer_config.kv_connector_extra_config
        assert extra["placement"] == name.split("-")[1]
        gib = 3.0 if name.startswith("polykv-gpu") else 6.0
        assert extra["store_bytes"] == int(gib * 2**30)
    else:
        assert ns.kv_transfer_config is None


def test_equal_gpu_memory_takes_the_store_out_of_the_kv_cache() -> None:
    a = _args("--equal-gpu-memory", "--store-gib", "1", "--kv-cache-memory-bytes", str(3 * 2**30))
    flags = gbs.config_flags("polykv-gpu", a)
    assert flags[flags.index("--kv-cache-memory-bytes") + 1] == str(2 * 2**30)
    cpu = gbs.config_flags("polykv-cpu", a)
    assert cpu[cpu.index("--kv-cache-memory-bytes") + 1] == str(3 * 2**30)
    a = _args("--equal-gpu-memory", "--store-gib", "4", "--kv-cache-memory-bytes", str(2**30))
    with pytest.raises(gbs.BenchError, match="--store-gib"):
        gbs.config_flags("polykv-gpu", a)


def test_bench_command_parses_with_vllm(tmp_path: Path) -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    a = _args("--num-prefixes", "5", "--prompts-per-prefix", "3", "--bench-args", "--num-warmups 2")
    cmd = gbs.bench_command("fp8", a, tmp_path / "m", 8124, tmp_path / "res")
    assert cmd[1:5] == ["-m", "polykv_vllm.cli", "bench", "serve"]
    ns = parser.parse_args(cmd[5:])
    assert ns.dataset_name == "prefix_repetition" and ns.num_prompts == 15
    assert ns.prefix_repetition_prefix_len == 4096 and ns.prefix_repetition_suffix_len == 64
    assert ns.prefix_repetition_num_prefixes == 5 and ns.prefix_repetition_output_len == 32
    assert ns.save_result and ns.result_dir == str(tmp_path / "res")
    assert ns.result_filename == "fp8.json" and ns.ignore_eos and ns.num_warmups == 2
    assert ns.base_url == "http://127.0.0.1:8124" and ns.tokenizer == str(tmp_path / "m")


def test_loadgen_argv_is_valid_for_loadgen() -> None:
    argv = gbs.loadgen_argv("polykv-cpu", _args("--num-prefixes", "6"), 8125)
    cfg = gbs.loadgen.parse_args(argv)
    assert cfg.documents == 6 and cfg.agents == 4 and cfg.doc_tokens == 4096
    assert cfg.doc_id and cfg.base_url == "http://127.0.0.1:8125/v1"
    assert not gbs.loadgen.parse_args(gbs.loadgen_argv("bf16", _args(), 8125)).doc_id


def test_parse_args_refuses_unknown_config() -> None:
    with pytest.raises(SystemExit):
        _args("--configs", "bf16,fp4")


def test_cpu_smoke_settings() -> None:
    a = _args("--cpu-smoke", "--client", "both")
    assert a.dtype == "float32" and a.eager and a.clients == ["bench", "loadgen"]
    assert gbs.max_model_len(a) < 4096


# --- model folder -----------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", ["llama3", "tokenizer"])
def test_dummy_model_has_config_and_tokenizer(tmp_path: Path, vocab: str) -> None:
    model = gbs.write_dummy_model(tmp_path / "m", _tokenizer_dir(tmp_path), vocab)
    config = json.loads((model / "config.json").read_text())
    assert config["num_hidden_layers"] == 32 and config["num_key_value_heads"] == 8
    assert config["vocab_size"] == (128256 if vocab == "llama3" else 301)
    names = sorted(p.name for p in model.iterdir())
    assert names == [
        "chat_template.jinja",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_copy_tokenizer_refuses_a_folder_without_one(tmp_path: Path) -> None:
    with pytest.raises(gbs.BenchError, match="no tokenizer"):
        gbs.copy_tokenizer(tmp_path, tmp_path / "out")


# --- results ----------------------------------------------------------------------------------


def test_parse_bench_result() -> None:
    data = {"num_prompts": 10, "completed": 9, "request_throughput": 2.5, "median_ttft_ms": 40.0}
    fig = gbs.parse_bench_result(data)
    assert fig["failed"] == 1 and fig["requests"] == 10 and fig["request_throughput"] == 2.5
    assert fig["median_ttft_ms"] == 40.0 and fig["p99_ttft_ms"] is None


def _summary() -> dict[str, Any]:
    cache = gbs.loadgen.cache_report(
        {"vllm:prefix_cache_queries": 100.0, "vllm:polykv_hits": 1.0},
        {
            "vllm:prefix_cache_queries": 300.0,
            "vllm:prefix_cache_hits": 50.0,
            "vllm:external_prefix_cache_queries": 100.0,
            "vllm:external_prefix_cache_hits": 25.0,
            "vllm:polykv_hits": 4.0,
            "vllm:polykv_stored_bytes": 1000.0,
        },
    )
    ok = {"status": "ok", "figures": {"request_throughput": 3.0, "median_ttft_ms": 12.0}}
    return {
        "results": [
            {"config": "polykv-gpu", "status": "ok", "startup_s": 9.0, "clients": {
                "bench": {**ok, "cache": cache}}},
            {"config": "fp8", "status": "failed", "error": "no /health", "clients": {}},
        ]
    }  # fmt: skip


def test_csv_rows_and_outputs(tmp_path: Path) -> None:
    rows = gbs.csv_rows(_summary()["results"])
    assert rows[0]["prefix_hit_rate"] == 0.25 and rows[0]["external_hit_rate"] == 0.25
    assert rows[0]["polykv_hits"] == 3.0 and rows[0]["polykv_stored_bytes"] == 1000.0
    assert rows[1] == {
        "config": "fp8",
        "status": "failed",
        "startup_s": None,
        "client": "",
        "error": "no /health",
    }
    js, cs = gbs.write_outputs(tmp_path, _summary())
    assert json.loads(js.read_text())["results"][1]["config"] == "fp8"
    with cs.open() as f:
        table = list(csv.DictReader(f))
    assert [r["config"] for r in table] == ["polykv-gpu", "fp8"]
    assert table[0]["request_throughput"] == "3.0" and table[1]["status"] == "failed"


# --- failures ---------------------------------------------------------------------------------


def test_server_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "print('config rejected: bad flag'); raise SystemExit(3)"]
    port = gbs.free_port(8990)
    with (
        pytest.raises(gbs.ServerError, match="code 3") as err,
        gbs.running_server(cmd, port, tmp_path / "s.log", timeout_s=60),
    ):
        pass
    assert "config rejected: bad flag" in str(err.value)


def test_a_failing_config_does_not_stop_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*_: Any, **__: Any) -> list[str]:
        return [sys.executable, "-c", "raise SystemExit('no GPU here')"]

    monkeypatch.setattr(gbs, "server_command", failing)
    a = _args("--startup-timeout", "60")
    a.out = str(tmp_path)
    res = gbs.run_config("offload", a, tmp_path, dummy=True)
    assert res["status"] == "failed" and "no GPU here" in res["error"]
    assert res["clients"] == {}


def test_append_keeps_other_configs_and_a_failure_sets_the_exit_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*_: Any, **__: Any) -> list[str]:
        return [sys.executable, "-c", "raise SystemExit('no GPU here')"]

    monkeypatch.setattr(gbs, "server_command", failing)
    out = tmp_path / "out"
    out.mkdir()
    earlier = [{"config": "bf16", "status": "ok"}, {"config": "offload", "status": "failed"}]
    (out / "summary.json").write_text(json.dumps({"results": earlier}))
    argv = ["--out", str(out), "--configs", "offload", "--append", "--cooldown", "0"]
    argv += ["--tokenizer-dir", str(_tokenizer_dir(tmp_path))]
    assert gbs.main(argv) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [r["config"] for r in summary["results"]] == ["bf16", "offload"]
    assert "no GPU here" in summary["results"][1]["error"]
    assert json.loads((out / "dummy-llama3-8b" / "config.json").read_text())["vocab_size"] == 128256
