"""The KV codec: :class:`KVCodec` encodes ``[T, H, D]`` keys/values into a :class:`PackedKV`.

The codec chooses each layer's setting (preset, kept layers, seed) and hands out its
:class:`~.layer_spec.LayerSpec`, which owns the byte layout and the math. Byte layout and API
contract: ``docs/FORMAT.md``.
"""

from __future__ import annotations

import logging

import torch

from polykv_vllm.core.layer_spec import LayerSpec, make_layer_spec
from polykv_vllm.core.packed import PackedKV
from polykv_vllm.core.presets import (
    DEFAULT_PRESET,
    KEEP_KEY_BITS,
    KEEP_VALUE_BITS,
    PRESETS,
    CodecConfig,
    get_preset,
)
from polykv_vllm.core.profile import CodecProfile, LayerSetting, ProfileError, load_profile

__all__ = ["MIN_HEAD_DIM", "KVCodec", "LayerSpec", "PackedKV"]  # the latter two re-exported

logger = logging.getLogger(__name__)

MIN_HEAD_DIM = 8


class KVCodec:
    """Encode/decode per-layer K/V ``[tokens, kv_heads, head_dim]`` (the torch reference).

    ``KVCodec(preset="polykv")``, ``KVCodec(config=CodecConfig(...))`` or
    ``KVCodec(profile="PROFILE.json")`` (a :class:`~.profile.CodecProfile` or its path: one
    setting per layer, for one model). ``num_layers`` is needed only when ``config.keep_layers``
    holds negative indices; with a profile, ``num_layers`` / ``head_dim`` given must match it
    (:class:`~.profile.ProfileError` otherwise). ``head_dim`` is only the default for
    :meth:`layer_spec`.
    """

    def __init__(
        self,
        preset: str | None = None,
        *,
        config: CodecConfig | None = None,
        num_layers: int | None = None,
        head_dim: int | None = None,
        profile: str | CodecProfile | None = None,
    ) -> None:
        given = [n for n, x in (("preset", preset), ("config", config), ("profile", profile)) if x]
        if len(given) > 1:
            raise ValueError(f"KVCodec got {' and '.join(given)}; pass only one of them.")
        self.profile = load_profile(profile) if profile is not None else None
        if self.profile is not None:
            num_layers, head_dim = _check_profile_shape(self.profile, num_layers, head_dim)
            config = CodecConfig(seed=self.profile.seed)
        self.config = config if config is not None else get_preset(preset or DEFAULT_PRESET)
        if num_layers is not None and (not isinstance(num_layers, int) or num_layers < 1):
            raise ValueError(f"KVCodec num_layers={num_layers!r} is invalid: use an integer >= 1.")
        if any(i < 0 for i in self.config.keep_layers) and num_layers is None:
            raise ValueError(
                f"CodecConfig.keep_layers={self.config.keep_layers} has negative (from the end) "
                "indices: pass num_layers= to KVCodec so they can be resolved."
            )
        self.num_layers = num_layers
        self.head_dim = head_dim
        kept = {i % num_layers if num_layers else i for i in self.config.keep_layers}
        self._kept_layers = frozenset(kept)

    def __repr__(self) -> str:
        if self.profile is not None:
            return f"KVCodec(profile={self.profile.source}, num_layers={self.num_layers})"
        return f"KVCodec(config={self.config!r}, num_layers={self.num_layers})"

    @property
    def identity(self) -> str:
        """A name for everything the stored bytes depend on besides the model: the preset
        name, ``custom:<config>`` or ``profile:<digest>``."""
        if self.profile is not None:
            return f"profile:{self.profile.digest}"
        for name, cfg in PRESETS.items():
            if cfg == self.config:
                return name
        return f"custom:{self.config!r}"

    # --- per-layer settings -------------------------------------------------------------

    def layer_setting(self, layer: int) -> LayerSetting:
        """The :class:`~.profile.LayerSetting` of ``layer`` (from the profile or the config)."""
        key_bits, value_bits = self.layer_bits(layer)
        if self.profile is not None:
            return self.profile.layers[layer]
        return LayerSetting(key_bits, value_bits, self.config.norm_correction)

    def layer_bits(self, layer: int) -> tuple[int, int]:
        """``(key_bits, value_bits)`` used for ``layer``."""
        if not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer={layer!r} is invalid: use a layer index >= 0.")
        if self.num_layers is not None and layer >= self.num_layers:
            raise ValueError(
                f"layer={layer} is out of range: this codec was built for num_layers="
                f"{self.num_layers} (allowed 0..{self.num_layers - 1})."
            )
        if self.profile is not None:
            setting = self.profile.layers[layer]
            return setting.key_bits, setting.value_bits
        if layer in self._kept_layers:
            return KEEP_KEY_BITS, KEEP_VALUE_BITS
        return self.config.key_bits, self.config.value_bits

    def layer_spec(self, layer: int = 0, head_dim: int | None = None) -> LayerSpec:
        """The tables for ``layer`` at ``head_dim`` (default: the codec's ``head_dim``)."""
        dim = head_dim if head_dim is not None else self.head_dim
        if dim is None:
            raise ValueError(
                "layer_spec needs the head dim: pass head_dim= here or to KVCodec(...)."
            )
        _check_head_dim(dim)
        if self.profile is not None and dim != self.profile.model.head_dim:
            _check_profile_shape(self.profile, None, dim)
        s = self.layer_setting(layer)
        return make_layer_spec(dim, s.key_bits, s.value_bits, self.config.seed, s.norm_correction)

    # --- encode / decode ----------------------------------------------------------------

    def encode(self, k: torch.Tensor, v: torch.Tensor, layer: int = 0) -> PackedKV:
        """Compress ``k``, ``v`` (float ``[tokens, kv_heads, head_dim]``, same shape and device).

        Returns a :class:`PackedKV` on the inputs' device. The inputs are not modified.
        """
        _check_kv(k, v)
        return self.layer_spec(layer, k.shape[-1]).encode(k, v)

    def decode(
        self,
        packed: PackedKV,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        layer: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decompress to ``(k, v)``, each ``dtype`` ``[tokens, kv_heads, head_dim]`` on ``device``
        (default: the packed tensors' device). Computed in float32, cast at the end.

        The bits come from ``packed`` itself; the seed from this codec's config and norm
        correction from ``layer``'s setting when ``layer`` is given, else from the config (a
        profile whose layers of these bits differ in norm correction needs ``layer``).
        """
        if not isinstance(packed, PackedKV):
            raise TypeError(f"decode expects a PackedKV, got {type(packed).__name__}.")
        if not dtype.is_floating_point:
            raise ValueError(
                f"decode dtype={dtype} is not allowed: use a floating dtype such as "
                "torch.bfloat16, torch.float16 or torch.float32."
            )
        target = torch.device(device) if device is not None else packed.device
        p = packed.to(target)
        spec = make_layer_spec(
            p.head_dim, p.key_bits, p.value_bits, self.config.seed, self._norm_correction(p, layer)
        )
        k, v = spec.decode(p)
        return k.to(dtype), v.to(dtype)

    def _norm_correction(self, p: PackedKV, layer: int | None) -> bool:
        if layer is not None:
            return self.layer_setting(layer).norm_correction
        if self.profile is None:
            return self.config.norm_correction
        found = {
            s.norm_correction
            for s in self.profile.layers
            if (s.key_bits, s.value_bits) == (p.key_bits, p.value_bits)
        }
        if len(found) != 1:
            raise ValueError(
                f"decode: this profile has {len(found) or 'no'} norm-correction settings for "
                f"K{p.key_bits}V{p.value_bits} layers; pass layer= (the layer it was encoded for)."
            )
        return found.pop()

    def bytes_per_token_head(self, head_dim: int, layer: int = 0) -> int:
        """Bytes one (token, head) takes at ``layer`` (:attr:`LayerSpec.bytes_per_token_head`)."""
        return self.layer_spec(layer, head_dim).bytes_per_token_head


def _check_profile_shape(
    profile: CodecProfile, num_layers: int | None, head_dim: int | None
) -> tuple[int, int]:
    """``(num_layers, head_dim)`` of ``profile``; raises :class:`ProfileError` naming both when
    a given one differs."""
    model = profile.model
    for name, given, mine in (
        ("num_layers", num_layers, model.num_layers),
        ("head_dim", head_dim, model.head_dim),
    ):
        if given is not None and given != mine:
            raise ProfileError(
                f"profile {profile.source} was made for {model.describe()} but this model has "
                f"{name}={given} (the profile allows only {name}={mine}): make a profile for "
                "this model with `polykv-vllm calibrate`."
            )
    return model.num_layers, model.head_dim


def _check_head_dim(dim: int) -> None:
    if not isinstance(dim, int) or dim < MIN_HEAD_DIM or dim % 2:
        raise ValueError(
            f"head_dim={dim!r} is not supported: allowed are even integers >= {MIN_HEAD_DIM} "
            "(e.g. 64, 80, 96, 112, 128)."
        )


def _check_kv(k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 3:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}: expected 3 dims [tokens, kv_heads, "
                "head_dim]; reshape or index one layer first."
            )
        if not t.dtype.is_floating_point:
            raise ValueError(
                f"{name} has dtype {t.dtype}: expected a floating dtype (float32, float16, "
                "bfloat16); cast it first."
            )
    if k.shape != v.shape:
        raise ValueError(
            f"k shape {tuple(k.shape)} != v shape {tuple(v.shape)}: keys and values must have the "
            "same [tokens, kv_heads, head_dim]."
        )
    if k.device != v.device:
        raise ValueError(f"k is on {k.device} but v is on {v.device}: put both on one device.")
    _check_head_dim(k.shape[-1])
