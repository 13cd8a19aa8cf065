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


def _config(spec: object, groups: int = 1, **cache: object) -> tuple[object, object]:
    from types import SimpleNamespace as NS

    vllm_config = NS(
        model_config=NS(
            model="m",
            use_mla=False,
            hf_text_config=NS(num_hidden_layers=4),
            dtype=cache.get("model_dtype", _bf16()),
        ),
        cache_config=NS(
            cache_dtype=cache.get("cache_dtype", "auto"),
            enable_prefix_caching=cache.get("prefix", True),
        ),
        parallel_config=NS(world_size=1),
    )
    kv_cache_config = NS(
        kv_cache_groups=[NS(kv_cache_spec=spec, layer_names=["a", "b"]) for _ in range(groups)]
    )
    return vllm_config, kv_cache_config


def _bf16() -> object:
    import torch

    return torch.bfloat16


def _full(**kw: object) -> object:
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    args: dict[str, object] = dict(block_size=16, num_kv_heads=2, head_size=64)
    args["dtype"] = kw.pop("dtype", torch.bfloat16)
    args.update(kw)
    return FullAttentionSpec(**args)  # type: ignore[arg-type]


def test_model_facts_accepts_a_full_attention_model() -> None:
    pytest.importorskip("vllm")
    from polykv_vllm.connector.spec import model_facts

    facts = model_facts(*_config(_full()))  # type: ignore[arg-type]
    assert (facts.num_layers, facts.kv_heads, facts.head_dim, facts.block_size) == (2, 2, 64, 16)


@pytest.mark.parametrize("name", ["fp8", "fp8_e4m3", "fp8_e5m2"])
def test_model_facts_accepts_an_fp8_cache_on_vllm_cpu(name: str) -> None:
    pytest.importorskip("vllm")
    import torch

    from polykv_vllm.connector.spec import model_facts

    facts = model_facts(*_config(_full(dtype=torch.uint8), cache_dtype=name))  # type: ignore[arg-type]
    assert (facts.cache_dtype, facts.dtype, facts.model_dtype) == (
        name,
        torch.uint8,
        torch.bfloat16,
    )


@pytest.mark.parametrize(
    ("name", "on_cpu", "match"),
    [
        ("fp8_e5m2", False, "FA3"),
        ("turboquant_k8v4", True, "turboquant"),
        ("turboquant_k8v4", False, "--kv-cache-dtype fp8"),
        ("nvfp4", False, "nvfp4"),
        ("int8_per_token_head", True, "per_token_head"),
        ("fp8_per_token_head", False, "per-token-head"),
        ("fp8_inc", True, "one scale per layer"),
    ],
)
def test_quantized_caches_other_than_fp8_are_refused_with_what_to_use(
    name: str, on_cpu: bool, match: str
) -> None:
    pytest.importorskip("vllm")
    import torch

    from polykv_vllm.connector.spec import check_cache_dtype

    with pytest.raises(ValueError, match=match):
        check_cache_dtype(name, torch.uint8, on_cpu=on_cpu)
    assert check_cache_dtype("fp8", torch.uint8, on_cpu=on_cpu) == "fp8"


@pytest.mark.parametrize(
    "case", ["mla", "sliding", "hybrid", "fp8-not-uint8", "uint8", "turboquant", "no-prefix-cache"]
)
def test_model_facts_refuses_what_polykv_cannot_serve(case: str) -> None:
    pytest.importorskip("vllm")
    import torch
    from vllm.v1.kv_cache_interface import MLAAttentionSpec, SlidingWindowSpec

    from polykv_vllm.connector.spec import model_facts

    spec: object = _full()
    cache: dict[str, object] = {}
    groups = 1
    match = "full attention"
    if case == "mla":
        spec = MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    elif case == "sliding":
        spec = SlidingWindowSpec(
            block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16, sliding_window=128
        )
    elif case == "hybrid":
        groups = 2
    elif case == "fp8-not-uint8":  # an fp8 name over a bf16 allocation: not what vLLM does
        cache["cache_dtype"] = "fp8_e4m3"
        match = "dtype"
    elif case == "turboquant":
        spec = _full(dtype=torch.uint8)
        cache["cache_dtype"] = "turboquant_k8v4"
        match = "turboquant"
    elif case == "uint8":
        spec = _full(dtype=torch.uint8)
        match = "dtype"
    else:
        cache["prefix"] = False
        match = "prefix caching"
    with pytest.raises(ValueError, match=match):
        model_facts(*_config(spec, groups, **cache))  # type: ignore[arg-type]


@pytest.mark.parametrize("head_dim", [7, 6, 0])
def test_codec_refuses_unsupported_head_dims(head_dim: int) -> None:
    pytest.importorskip("vllm")
    import torch

    from polykv_vllm.connector.config import PolyKVConfig
    from polykv_vllm.connector.spec import ModelFacts, build_codec

    facts = ModelFacts(
        num_layers=2,
        total_layers=2,
        kv_heads=2,
        head_dim=head_dim,
        block_size=16,
        dtype=torch.bfloat16,
        world_size=1,
    )
    with pytest.raises(ValueError, match="head_dim"):
        build_codec(PolyKVConfig(), facts)
