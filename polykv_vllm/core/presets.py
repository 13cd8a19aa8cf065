"""Codec configuration: the frozen :class:`CodecConfig` and the named :data:`PRESETS`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["CodecConfig", "PRESETS", "DEFAULT_PRESET", "get_preset"]

KeyMode = Literal["int8", "rotated"]

ROTATED_BITS = (2, 3, 4)
KEY_BITS = (*ROTATED_BITS, 8)
VALUE_BITS = ROTATED_BITS
#: Bits a layer listed in ``keep_layers`` is encoded with (the default preset's).
KEEP_KEY_BITS = 8
KEEP_VALUE_BITS = 3


@dataclass(frozen=True)
class CodecConfig:
    """How K/V are quantized. Built once at the edge, immutable afterwards.

    - ``key_bits``: 8 (``key_mode="int8"``, per-(token, head) int8) or 2/3/4
      (``key_mode="rotated"``: norm + Hadamard + Lloyd-Max, like values).
    - ``key_mode``: ``"int8"`` or ``"rotated"``; must agree with ``key_bits``.
    - ``value_bits``: 2, 3 or 4.
    - ``seed``: seed of the value sign vector; keys use ``seed + 1``.
    - ``norm_correction``: rescale decoded rotated vectors to their stored norm.
    - ``keep_layers``: layer indices encoded at K8 int8 / V3 whatever the settings above
      (negative indices count from the end and need ``num_layers`` on the codec).
    """

    key_bits: int = 8
    key_mode: KeyMode = "int8"
    value_bits: int = 3
    seed: int = 0
    norm_correction: bool = False
    keep_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not _is_int(self.key_bits) or self.key_bits not in KEY_BITS:
            raise ValueError(
                f"CodecConfig.key_bits={self.key_bits!r} is not allowed: use one of {KEY_BITS} "
                "(8 = int8 per (token, head), 2-4 = rotated Lloyd-Max)."
            )
        expected = "int8" if self.key_bits == 8 else "rotated"
        if self.key_mode != expected:
            raise ValueError(
                f"CodecConfig.key_mode={self.key_mode!r} does not match key_bits={self.key_bits}: "
                f"allowed modes are 'int8' (key_bits=8) and 'rotated' (key_bits in "
                f"{ROTATED_BITS}); set key_mode={expected!r}."
            )
        if not _is_int(self.value_bits) or self.value_bits not in VALUE_BITS:
            raise ValueError(
                f"CodecConfig.value_bits={self.value_bits!r} is not allowed: use one of "
                f"{VALUE_BITS}."
            )
        if not _is_int(self.seed) or not 0 <= self.seed < 2**62:
            raise ValueError(
                f"CodecConfig.seed={self.seed!r} is not allowed: use an integer in [0, 2**62)."
            )
        if not isinstance(self.norm_correction, bool):
            raise ValueError(
                f"CodecConfig.norm_correction={self.norm_correction!r} is not allowed: use "
                "True or False."
            )
        if not isinstance(self.keep_layers, tuple) or not all(_is_int(i) for i in self.keep_layers):
            raise ValueError(
                f"CodecConfig.keep_layers={self.keep_layers!r} is not allowed: use a tuple of "
                "layer indices, e.g. (0, -1) for the first and last layer."
            )

    def replace(self, **changes: Any) -> CodecConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CodecConfig:
        """Build from an untyped mapping (e.g. JSON); unknown keys are rejected.

        ``data`` may name a ``"preset"`` to start from; other keys override its fields.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields - {"preset"})
        if unknown:
            raise ValueError(
                f"unknown codec config key(s) {unknown}: allowed keys are "
                f"{sorted(fields | {'preset'})}."
            )
        base = get_preset(data.get("preset", DEFAULT_PRESET))
        changes = {k: v for k, v in data.items() if k != "preset"}
        if "keep_layers" in changes and isinstance(changes["keep_layers"], list):
            changes["keep_layers"] = tuple(changes["keep_layers"])
        return base.replace(**changes)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


DEFAULT_PRESET = "polykv"

#: Named configurations. ``polykv`` is the paper's recipe (K8 int8, V3). ``polykv-lite`` is the
#: aggressive one: rotated K4 + V2 with norm correction, layers 0, 1 and the last kept at K8/V3;
#: >= 4.5x vs bf16 averaged over a 30-layer model (measured 4.57x at head dim 64). Chosen with
#: ``benchmarks/quality.py`` (continuation PPL given a compressed 2K-token prefix, 50 windows of
#: pydoc_data.topics, SmolLM2-135M): among >= 4.5x settings it had the lowest PPL delta (+1.93%,
#: 95% CI [+1.39, +2.47]); keeping (0, -1) only gave +2.18%, K3V3 +3.7-4.4%, K2V4 +15%.
#: ``benchmarks/codec_alternatives.py`` ranks the same way on a harsher test (every layer's K/V
#: quantized inside attention). Per-(token, head) int8 keys stay the default: Hadamard + int8 has
#: 4x lower key MSE at equal bytes but no better PPL (13.03 vs 12.90 there).
PRESETS: Mapping[str, CodecConfig] = {
    "polykv": CodecConfig(),
    "polykv-lite": CodecConfig(
        key_bits=4, key_mode="rotated", value_bits=2, norm_correction=True, keep_layers=(0, 1, -1)
    ),
}


def get_preset(name: str) -> CodecConfig:
    """The :class:`CodecConfig` of preset ``name``; unknown names list the presets."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown codec preset {name!r}: allowed presets are {sorted(PRESETS)}."
        ) from None
