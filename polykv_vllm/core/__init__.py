"""The polykv codec (torch only): keys int8 or rotated Lloyd-Max, values rotated Lloyd-Max.

Contract and byte layout: ``docs/FORMAT.md``. Importing this package imports only torch.
"""

from polykv_vllm.core.codec import MIN_HEAD_DIM, KVCodec
from polykv_vllm.core.layer_spec import LayerSpec, StreamSpec
from polykv_vllm.core.packed import PackedKV
from polykv_vllm.core.presets import DEFAULT_PRESET, PRESETS, CodecConfig, get_preset
from polykv_vllm.core.profile import (
    CodecProfile,
    LayerSetting,
    ModelFingerprint,
    ProfileError,
    load_profile,
)

__all__ = [
    "DEFAULT_PRESET",
    "MIN_HEAD_DIM",
    "PRESETS",
    "CodecConfig",
    "CodecProfile",
    "KVCodec",
    "LayerSetting",
    "LayerSpec",
    "ModelFingerprint",
    "PackedKV",
    "ProfileError",
    "StreamSpec",
    "get_preset",
    "load_profile",
]
