"""Layer-wise codec profiles: one setting per layer, made for one model (torch only).

A :class:`CodecProfile` is what ``polykv-vllm calibrate`` writes (:mod:`polykv_vllm.calibrate`):
the model it was measured on (:class:`ModelFingerprint`), one :class:`LayerSetting` per layer
(key bits / scheme, value bits, norm correction), the bytes each layer takes per (token, kv head)
measured from the :class:`~.layer_spec.LayerSpec` tensors, and the calibration figures (kept for
the record, never read back into the codec). ``KVCodec(profile=...)`` encodes with it; a profile
refuses any other model (:meth:`CodecProfile.check_model`).

File format (JSON, ``"format": "polykv-profile"``, ``"version": 1``)::

    {"format": "polykv-profile", "version": 1, "seed": 0,
     "model": {"name": ..., "architecture": ..., "num_layers": 30, "kv_heads": 3, "head_dim": 64},
     "layers": [{"key_bits": 8, "value_bits": 3, "norm_correction": false,
                 "bytes_per_token_head": 92}, ...],
     "bytes": {"per_token_head": ..., "bf16_per_token_head": ..., "ratio": ...},
     "calibration": {...}}

Every error names the file, the field, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from polykv_vllm.core.layer_spec import make_layer_spec
from polykv_vllm.core.presets import KEY_BITS, VALUE_BITS

__all__ = [
    "PROFILE_FORMAT",
    "PROFILE_VERSION",
    "CodecProfile",
    "LayerSetting",
    "ModelFingerprint",
    "ProfileError",
    "load_profile",
]

PROFILE_FORMAT = "polykv-profile"
PROFILE_VERSION = 1


class ProfileError(ValueError):
    """A profile file that cannot be read or does not fit the model it is used with."""


@dataclass(frozen=True)
class LayerSetting:
    """One layer's setting: ``key_bits`` 8 (int8 per (token, head)) or 2-4 (rotated Lloyd-Max),
    ``value_bits`` 2-4, ``norm_correction`` for the rotated streams of this layer."""

    key_bits: int
    value_bits: int
    norm_correction: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.key_bits) or self.key_bits not in KEY_BITS:
            raise ProfileError(
                f"key_bits={self.key_bits!r} is not allowed: use one of {KEY_BITS} "
                "(8 = int8, 2-4 = rotated)."
            )
        if not _is_int(self.value_bits) or self.value_bits not in VALUE_BITS:
            raise ProfileError(
                f"value_bits={self.value_bits!r} is not allowed: use one of {VALUE_BITS}."
            )
        if not isinstance(self.norm_correction, bool):
            raise ProfileError(
                f"norm_correction={self.norm_correction!r} is not allowed: use true or false."
            )

    @property
    def label(self) -> str:
        """``K8V3``, ``K4V2n`` (``n``: norm correction)."""
        return f"K{self.key_bits}V{self.value_bits}{'n' if self.norm_correction else ''}"

    def bytes_per_token_head(self, head_dim: int, seed: int = 0) -> int:
        """Bytes one (token, kv head) takes at ``head_dim``, measured from the spec's tensors."""
        spec = make_layer_spec(head_dim, self.key_bits, self.value_bits, seed, self.norm_correction)
        return spec.bytes_per_token_head


@dataclass(frozen=True)
class ModelFingerprint:
    """What a profile is bound to: the model's name (HF name or folder name), its architecture
    (``LlamaForCausalLM``), layer count, total kv heads and head dim."""

    name: str
    architecture: str
    num_layers: int
    kv_heads: int
    head_dim: int

    def describe(self) -> str:
        return (
            f"{self.name!r} ({self.architecture}, {self.num_layers} layers, {self.kv_heads} kv "
            f"heads, head dim {self.head_dim})"
        )

    def short_name(self) -> str:
        """The last path component, lower case: a local folder and the hub id it was saved
        from (``HuggingFaceTB/SmolLM2-135M-Instruct``) compare equal."""
        return self.name.rstrip("/").rsplit("/", 1)[-1].lower()


@dataclass(frozen=True)
class CodecProfile:
    """Per-layer codec settings for one model (see the module docstring for the file)."""

    model: ModelFingerprint
    layers: tuple[LayerSetting, ...]
    seed: int = 0
    calibration: Mapping[str, Any] = field(default_factory=dict, compare=False)
    source: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        if len(self.layers) != self.model.num_layers:
            raise ProfileError(
                f"profile {self.source}: it lists {len(self.layers)} layers but its model "
                f"{self.model.describe()} has {self.model.num_layers}; the file is damaged: "
                "make it again with `polykv-vllm calibrate`."
            )
        if not _is_int(self.seed) or not 0 <= self.seed < 2**62:
            raise ProfileError(
                f"profile {self.source}: seed={self.seed!r} is not allowed: use an integer in "
                "[0, 2**62)."
            )

    # --- bytes ----------------------------------------------------------------------------

    def layer_bytes(self) -> list[int]:
        """Bytes per (token, kv head) of each layer, measured from its spec's tensors."""
        return [s.bytes_per_token_head(self.model.head_dim, self.seed) for s in self.layers]

    @property
    def bytes_per_token_head(self) -> int:
        """Sum over layers of :meth:`layer_bytes`."""
        return sum(self.layer_bytes())

    @property
    def bf16_bytes_per_token_head(self) -> int:
        """The same K/V in bf16: ``layers * 2 * head_dim * 2`` bytes."""
        return self.model.num_layers * 2 * self.model.head_dim * 2

    @property
    def ratio(self) -> float:
        """Compression vs bf16, from the measured bytes (scales and norms included)."""
        return self.bf16_bytes_per_token_head / self.bytes_per_token_head

    @property
    def digest(self) -> str:
        """sha256 (hex, 16 chars) of what the stored bytes depend on: the settings and seed."""
        blob = json.dumps(
            {"seed": self.seed, "layers": [asdict(s) for s in self.layers]}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # --- the model it belongs to ---------------------------------------------------------

    def check_model(self, model: ModelFingerprint) -> None:
        """Raise :class:`ProfileError` naming both models unless ``model`` is the profile's."""
        mine = self.model
        diffs = [
            f"{name} {a} != {b}"
            for name, a, b in (
                ("num_layers", mine.num_layers, model.num_layers),
                ("head_dim", mine.head_dim, model.head_dim),
                ("kv_heads", mine.kv_heads, model.kv_heads),
                ("architecture", mine.architecture, model.architecture),
                ("name", mine.short_name(), model.short_name()),
            )
            if a != b
        ]
        if diffs:
            raise ProfileError(
                f"profile {self.source} was made for {mine.describe()} and cannot serve "
                f"{model.describe()} ({'; '.join(diffs)}): a profile belongs to one model; "
                f"make one for this model with `polykv-vllm calibrate {model.name} "
                "--target-ratio R --out PROFILE.json`, or use a preset."
            )

    # --- file ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        per_layer = self.layer_bytes()
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "seed": self.seed,
            "model": asdict(self.model),
            "layers": [
                {**asdict(s), "bytes_per_token_head": b}
                for s, b in zip(self.layers, per_layer, strict=True)
            ],
            "bytes": {
                "per_token_head": sum(per_layer),
                "bf16_per_token_head": self.bf16_bytes_per_token_head,
                "ratio": round(self.ratio, 4),
            },
            "calibration": dict(self.calibration),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> CodecProfile:
        """Parse and check a profile mapping; raises :class:`ProfileError` naming what is wrong."""
        where = f"profile {source}"
        if not isinstance(data, Mapping):
            raise ProfileError(f"{where}: expected a JSON object, got {type(data).__name__}.")
        if data.get("format") != PROFILE_FORMAT or data.get("version") != PROFILE_VERSION:
            raise ProfileError(
                f"{where}: format={data.get('format')!r} version={data.get('version')!r} is not "
                f"allowed: expected format={PROFILE_FORMAT!r} version={PROFILE_VERSION} (a file "
                "written by `polykv-vllm calibrate`)."
            )
        model = _section(data, "model", Mapping, where)
        try:
            fp = ModelFingerprint(**{k: model[k] for k in _FINGERPRINT_KEYS})
        except KeyError as e:
            raise ProfileError(
                f"{where}: model has no {e.args[0]!r}: a fingerprint needs {_FINGERPRINT_KEYS}."
            ) from None
        for key in _FINGERPRINT_KEYS[2:]:
            value = getattr(fp, key)
            if not _is_int(value) or value < 1:
                raise ProfileError(f"{where}: model.{key}={value!r} must be an integer >= 1.")
        if fp.head_dim % 2 or fp.head_dim < 8:
            raise ProfileError(
                f"{where}: model.head_dim={fp.head_dim} is not allowed: use an even head dim >= 8."
            )
        for key in _FINGERPRINT_KEYS[:2]:
            if not isinstance(getattr(fp, key), str):
                raise ProfileError(f"{where}: model.{key}={getattr(fp, key)!r} must be a string.")
        rows = _section(data, "layers", Sequence, where)
        layers = []
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ProfileError(f"{where}: layers[{i}]={row!r} must be an object.")
            try:
                setting = LayerSetting(
                    row.get("key_bits"),  # type: ignore[arg-type]  # checked by LayerSetting
                    row.get("value_bits"),  # type: ignore[arg-type]
                    row.get("norm_correction", False),
                )
            except ProfileError as e:
                raise ProfileError(f"{where}: layers[{i}]: {e}") from None
            layers.append(setting)
            want = row.get("bytes_per_token_head")
            got = setting.bytes_per_token_head(fp.head_dim, int(data.get("seed", 0)))
            if want is not None and want != got:
                raise ProfileError(
                    f"{where}: layers[{i}] bytes_per_token_head={want!r} but {setting.label} at "
                    f"head dim {fp.head_dim} takes {got} bytes: the file is damaged or was made "
                    "for another head dim; make it again with `polykv-vllm calibrate`."
                )
        calibration = data.get("calibration", {})
        if not isinstance(calibration, Mapping):
            raise ProfileError(f"{where}: calibration must be an object.")
        return cls(fp, tuple(layers), data.get("seed", 0), calibration, source)

    @classmethod
    def load(cls, path: str | Path) -> CodecProfile:
        """Read a profile file; raises :class:`ProfileError` for a missing, corrupt or
        inconsistent one."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ProfileError(
                f"profile {str(p)!r} cannot be read ({e.strerror or e}): pass the path of a file "
                "written by `polykv-vllm calibrate`."
            ) from None
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ProfileError(
                f"profile {str(p)!r} is not valid JSON ({e}): the file is corrupt; make it "
                "again with `polykv-vllm calibrate`."
            ) from None
        return cls.from_dict(data, source=repr(str(p)))


_FINGERPRINT_KEYS = ("name", "architecture", "num_layers", "kv_heads", "head_dim")


def _section(data: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, str):
        raise ProfileError(
            f"{where}: {key}={value!r} is missing or not a JSON "
            f"{'object' if kind is Mapping else 'list'}."
        )
    return value


def load_profile(profile: str | Path | CodecProfile) -> CodecProfile:
    """``profile`` itself, or the profile read from the path ``profile``."""
    return profile if isinstance(profile, CodecProfile) else CodecProfile.load(profile)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
