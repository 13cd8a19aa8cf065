"""CodecConfig validation and the preset registry."""

from __future__ import annotations

import dataclasses

import pytest

from polykv_vllm.core import DEFAULT_PRESET, PRESETS, CodecConfig, KVCodec, get_preset


def test_default_preset_is_the_paper_recipe() -> None:
    cfg = get_preset(DEFAULT_PRESET)
    assert (cfg.key_bits, cfg.key_mode, cfg.value_bits) == (8, "int8", 3)
    assert KVCodec().config == cfg


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["polykv"].key_bits = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"key_bits": 5}, r"key_bits=5 is not allowed: use one of \(2, 3, 4, 8\)"),
        ({"key_bits": 4}, r"key_mode='int8' does not match key_bits=4.*set key_mode='rotated'"),
        ({"key_bits": 8, "key_mode": "rotated"}, "set key_mode='int8'"),
        ({"value_bits": 8}, r"value_bits=8 is not allowed: use one of \(2, 3, 4\)"),
        ({"value_bits": True}, "value_bits=True is not allowed"),
        ({"seed": -1}, r"seed=-1 is not allowed: use an integer in \[0, 2\*\*62\)"),
        ({"norm_correction": 1}, "norm_correction=1 is not allowed: use True or False"),
        ({"keep_layers": [0, -1]}, r"keep_layers=\[0, -1\] is not allowed: use a tuple"),
    ],
)
def test_bad_config_errors_name_field_value_and_fix(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CodecConfig(**kwargs)  # type: ignore[arg-type]


def test_from_dict() -> None:
    cfg = CodecConfig.from_dict({"preset": "polykv-lite", "keep_layers": [0], "seed": 3})
    assert cfg.keep_layers == (0,) and cfg.seed == 3
    assert cfg.key_bits == PRESETS["polykv-lite"].key_bits
    assert CodecConfig.from_dict({}) == PRESETS["polykv"]
    with pytest.raises(ValueError, match=r"unknown codec config key\(s\) \['value_bit'\]"):
        CodecConfig.from_dict({"value_bit": 3})
    with pytest.raises(ValueError, match="allowed presets are"):
        CodecConfig.from_dict({"preset": "fast"})


def test_keep_layers_resolution() -> None:
    codec = KVCodec("polykv-lite", num_layers=30)
    lite = PRESETS["polykv-lite"]
    assert codec.layer_bits(0) == (8, 3)
    assert codec.layer_bits(29) == (8, 3)
    assert codec.layer_bits(15) == (lite.key_bits, lite.value_bits)
    assert KVCodec(config=lite.replace(keep_layers=(2,))).layer_bits(2) == (8, 3)
