"""Option parsing of the connector (``PolyKVConfig``) and the ``KVTransferConfig`` it builds."""

from __future__ import annotations

from typing import Any

import pytest

from polykv_vllm.connector.config import PolyKVConfig, kv_transfer_config, parse_size


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
    }
    with pytest.raises(ValueError, match="unknown polykv option"):
        kv_transfer_config(budget="1GiB")
