"""The polykv codec (torch only): keys int8 or rotated Lloyd-Max, values rotated Lloyd-Max.

Contract and byte layout: ``docs/FORMAT.md``. Importing this package imports only torch.
"""

from polykv_vllm.core.codec import MIN_HEAD_DIM, KVCodec
from polykv_vllm.core.layer_spec import LayerSpec, StreamSpec
from polykv_vllm.core.packed import PackedKV
from polykv_vllm.core.presets import DEFAULT_PRESET, PRESETS, CodecConfig, get_preset

__all__ = [
    "DEFAULT_PRESET",
    "MIN_HEAD_DIM",
    "PRESETS",
    "CodecConfig",
    "KVCodec",
    "LayerSpec",
    "PackedKV",
    "StreamSpec",
    "get_preset",
]
