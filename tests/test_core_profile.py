"""Codec profiles: file round trip, the codec reading it, and every refusal naming the value."""

from __future__ import annotations

import json

import pytest
import torch

from polykv_vllm.core import (
    CodecProfile,
    KVCodec,
    LayerSetting,
    ModelFingerprint,
    ProfileError,
)

MODEL = ModelFingerprint("org/Tiny-Model", "LlamaForCausalLM", 4, 2, 64)
LAYERS = (
    LayerSetting(8, 3),
    LayerSetting(4, 2, True),
    LayerSetting(2, 4),
    LayerSetting(3, 3, True),
)


def _profile(**kw) -> CodecProfile:
    return CodecProfile(MODEL, LAYERS, seed=5, calibration={"note": "x"}, **kw)


def test_round_trip_keeps_settings_bytes_and_figures(tmp_path) -> None:
    path = tmp_path / "p.json"
    _profile().save(path)
    doc = json.loads(path.read_text())
    assert doc["bytes"]["per_token_head"] == sum(r["bytes_per_token_head"] for r in doc["layers"])
    # bytes measured from the spec tensors: K8 int8 64 + 2, V3 24 + 2, K4 32 + 2, V2 16 + 2 ...
    assert [r["bytes_per_token_head"] for r in doc["layers"]] == [92, 52, 52, 52]
    again = CodecProfile.load(path)
    assert again == _profile() and again.calibration == {"note": "x"}
    assert again.digest == _profile().digest
    assert again.ratio == pytest.approx(4 * 256 / 248)


def test_codec_uses_each_layers_setting(tmp_path) -> None:
    path = tmp_path / "p.json"
    _profile().save(path)
    codec = KVCodec(profile=str(path))
    assert codec.num_layers == 4 and codec.head_dim == 64
    assert codec.identity == f"profile:{_profile().digest}"
    g = torch.Generator().manual_seed(0)
    for i, s in enumerate(LAYERS):
        spec = codec.layer_spec(i)
        assert (spec.key_bits, spec.value_bits, spec.norm_correction) == (
            s.key_bits,
            s.value_bits,
            s.norm_correction,
        )
        k, v = torch.randn(7, 2, 64, generator=g), torch.randn(7, 2, 64, generator=g)
        packed = codec.encode(k, v, layer=i)
        assert packed.nbytes == 7 * 2 * s.bytes_per_token_head(64, 5)
        ref = spec.decode(packed)
        for got in (
            codec.decode(packed, torch.float32, layer=i),
            codec.decode(packed, torch.float32),
        ):
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_decode_without_layer_refuses_an_ambiguous_profile() -> None:
    layers = (LayerSetting(4, 2, True), LayerSetting(4, 2, False))
    codec = KVCodec(profile=CodecProfile(ModelFingerprint("m", "A", 2, 1, 64), layers))
    packed = codec.encode(torch.randn(3, 1, 64), torch.randn(3, 1, 64), layer=0)
    with pytest.raises(ValueError, match="pass layer="):
        codec.decode(packed)
    codec.decode(packed, layer=0)


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            {"num_layers": 5},
            r"this model has num_layers=5 \(the profile allows only num_layers=4\)",
        ),
        ({"head_dim": 128}, r"this model has head_dim=128 \(the profile allows only head_dim=64\)"),
    ],
)
def test_codec_refuses_other_shapes(kw, match) -> None:
    with pytest.raises(ProfileError, match=match):
        KVCodec(profile=_profile(), **kw)
    with pytest.raises(ProfileError, match="head_dim=80"):
        KVCodec(profile=_profile()).layer_spec(0, 80)


@pytest.mark.parametrize(
    "other,named",
    [
        (ModelFingerprint("org/Other-Model", "LlamaForCausalLM", 4, 2, 64), "name"),
        (ModelFingerprint("org/Tiny-Model", "LlamaForCausalLM", 6, 2, 64), "num_layers 4 != 6"),
        (ModelFingerprint("org/Tiny-Model", "LlamaForCausalLM", 4, 2, 128), "head_dim 64 != 128"),
        (ModelFingerprint("org/Tiny-Model", "Qwen2ForCausalLM", 4, 2, 64), "architecture"),
        (ModelFingerprint("org/Tiny-Model", "LlamaForCausalLM", 4, 8, 64), "kv_heads 2 != 8"),
    ],
)
def test_profile_for_another_model_is_refused_naming_both(other, named) -> None:
    with pytest.raises(ProfileError) as e:
        _profile().check_model(other)
    msg = str(e.value)
    assert MODEL.describe() in msg and other.describe() in msg and named in msg


def test_same_model_by_folder_name_is_accepted() -> None:
    _profile().check_model(ModelFingerprint("/models/tiny-model/", "LlamaForCausalLM", 4, 2, 64))


def _write(tmp_path, text: str):
    path = tmp_path / "bad.json"
    path.write_text(text)
    return path


def _doc() -> dict:
    return _profile().to_dict()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: "{not json", r"is not valid JSON .*corrupt"),
        (lambda d: "[1, 2]", "expected a JSON object, got list"),
        (lambda d: {**d, "format": "other"}, "format='other' version=1 is not allowed"),
        (lambda d: {**d, "version": 9}, "version=9 is not allowed"),
        (lambda d: {**d, "layers": d["layers"][:3]}, "lists 3 layers but its model .* has 4"),
        (lambda d: {**d, "model": {**d["model"], "head_dim": 63}}, "head_dim=63 is not allowed"),
        (lambda d: {**d, "model": {"name": "x"}}, "model has no 'architecture'"),
        (
            lambda d: {**d, "layers": [{**d["layers"][0], "key_bits": 5}] + d["layers"][1:]},
            r"layers\[0\]: key_bits=5 is not allowed: use one of \(2, 3, 4, 8\)",
        ),
        (
            lambda d: {**d, "layers": [{**d["layers"][0], "value_bits": 8}] + d["layers"][1:]},
            r"layers\[0\]: value_bits=8 is not allowed",
        ),
        (
            lambda d: {
                **d,
                "layers": [{**d["layers"][0], "bytes_per_token_head": 9}] + d["layers"][1:],
            },
            r"layers\[0\] bytes_per_token_head=9 but K8V3 at head dim 64 takes 92 bytes",
        ),
        (lambda d: {**d, "layers": "K8V3"}, "layers='K8V3' is missing or not a JSON list"),
    ],
)
def test_corrupt_profile_is_refused_naming_the_value(tmp_path, mutate, match) -> None:
    out = mutate(_doc())
    path = _write(tmp_path, out if isinstance(out, str) else json.dumps(out))
    with pytest.raises(ProfileError, match=match) as e:
        CodecProfile.load(path)
    assert str(path) in str(e.value)


def test_missing_profile_file_is_refused(tmp_path) -> None:
    with pytest.raises(ProfileError, match=r"nope.json' cannot be read"):
        KVCodec(profile=str(tmp_path / "nope.json"))


def test_preset_and_profile_together_are_refused() -> None:
    with pytest.raises(ValueError, match="preset and profile"):
        KVCodec("polykv", profile=_profile())
