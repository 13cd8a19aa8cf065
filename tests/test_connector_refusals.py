"""The connector refuses what it cannot serve: bad options before the engine starts, and
unsupported engine settings at start-up, each with a message saying how to fix it."""

from __future__ import annotations

import pytest
import vllm_helpers as vh

from polykv_vllm.connector.config import kv_transfer_config


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"store_bytes": "a lot"}, "store_bytes"),
        ({"preset": "gzip"}, "preset"),
        ({"placement": "nvme"}, "placement"),
        ({"budget": "1GiB"}, "unknown polykv option"),
    ],
)
def test_bad_options_fail_before_the_engine(options: dict[str, str], match: str) -> None:
    pytest.importorskip("vllm")
    with pytest.raises(ValueError, match=match):
        kv_transfer_config(**options)


@pytest.mark.vllm
def test_engine_without_prefix_caching_is_refused_at_start_up() -> None:
    pytest.importorskip("vllm")
    with (
        pytest.raises(ValueError, match="prefix caching"),
        vh.engine({}, enable_prefix_caching=False),
    ):
        raise AssertionError("the engine must not start")
