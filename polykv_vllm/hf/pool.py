"""The shared compressed document: :func:`compress` builds a :class:`SharedPool`.

The pool holds one :class:`~polykv_vllm.core.PackedKV` per layer (the compressed bytes) and the
document's token ids, nothing in full precision. :meth:`SharedPool.memory_summary` puts its real
bytes next to the baselines.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from polykv_vllm.core import (
    CodecConfig,
    CodecProfile,
    KVCodec,
    ModelFingerprint,
    PackedKV,
    get_preset,
    load_profile,
)
from polykv_vllm.hf.layout import ModelLayout, UnsupportedModelError, weight_sample
from polykv_vllm.hf.prompt import PromptFormat

__all__ = ["MemorySummary", "SharedPool", "compress"]

logger = logging.getLogger(__name__)


@dataclass
class _PeakRecord:
    """The largest agent working memory seen so far (agents report after each generate)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    peak_bytes: int | None = None
    working_dtype: torch.dtype | None = None
    # Latest batched generation (SharedPool.generate): agents, total peak, document share,
    # the attention backend and the prefix decode backend that ran, whether a CUDA graph ran.
    batched: tuple[int, int, int, str, str, bool] | None = None

    def record(self, peak_bytes: int, dtype: torch.dtype) -> None:
        with self.lock:
            if self.peak_bytes is None or peak_bytes > self.peak_bytes:
                self.peak_bytes, self.working_dtype = peak_bytes, dtype


@dataclass(frozen=True, eq=False)
class SharedPool:
    """A document's KV cache, compressed once, read by any number of agents.

    - ``layers``: one :class:`PackedKV` per model layer, ``tokens = num_tokens``, on
      ``layout.device``; the only KV bytes the pool holds.
    - ``token_ids``: int64 ``[num_tokens]`` on the CPU, the exact prefix ids that were prefilled.
    - ``bf16_bytes``: bytes of the document's K and V cast to bf16, measured from the tensors
      at compress time one layer at a time (the size of one uncompressed copy).
    - ``weights``: a few of the model's embedding weights (``layout.weight_sample``), so agents
      and :meth:`generate` refuse another checkpoint of the same shape.
    """

    layers: tuple[PackedKV, ...]
    token_ids: torch.Tensor
    codec: KVCodec
    preset: str
    layout: ModelLayout
    prompt: PromptFormat
    bf16_bytes: int
    weights: torch.Tensor | None = field(default=None, repr=False)
    _peaks: _PeakRecord = field(default_factory=_PeakRecord, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        """Compressed KV bytes: the sum of every layer's ``PackedKV.nbytes``."""
        return sum(p.nbytes for p in self.layers)

    def decode_layer(
        self, layer: int, start: int, end: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of prefix tokens ``[start, end)`` of ``layer``: each ``dtype``
        ``[end - start, kv_heads, head_dim]`` on ``device`` (new tensors; the pool is unchanged)."""
        return self.codec.decode(
            self.layers[layer].slice(start, end), dtype=dtype, device=device, layer=layer
        )

    def record_agent_peak(self, peak_bytes: int, dtype: torch.dtype) -> None:
        """Called by agents after each generation with their measured peak working bytes."""
        self._peaks.record(peak_bytes, dtype)

    def record_batched_peak(
        self,
        n_agents: int,
        peak_bytes: int,
        document_bytes: int,
        backend: str = "torch",
        decode_backend: str = "torch",
        cuda_graph: bool = False,
    ) -> None:
        """Called by :meth:`generate` with the measured peak of the whole batch (all suffixes +
        the shared decoded layer), the document's share of it and the attention and prefix
        decode backends that ran."""
        with self._peaks.lock:
            self._peaks.batched = (
                n_agents,
                peak_bytes,
                document_bytes,
                backend,
                decode_backend,
                cuda_graph,
            )

    def generate(
        self, queries: Sequence[str], model: Any, tokenizer: Any, **kwargs: Any
    ) -> list[str]:
        """Answer every query about the document, all agents decoding together (one answer per
        query, in order). Keywords: ``max_new_tokens``, ``temperature``, ``eos_token_id``,
        ``seed``, ``backend``, ``chunk_tokens``, ``progress``, ``keep_decoded``,
        ``decode_backend``, ``cuda_graph``; see
        :func:`polykv_vllm.hf.generate.generate_batch_ids`."""
        from polykv_vllm.hf.generate import generate_batch

        return generate_batch(self, model, tokenizer, queries, **kwargs)

    def generate_ids(
        self, queries: Sequence[str], model: Any, tokenizer: Any, **kwargs: Any
    ) -> list[list[int]]:
        """Like :meth:`generate` but returns the new token ids (stop tokens included)."""
        from polykv_vllm.hf.generate import generate_batch_ids

        return generate_batch_ids(self, model, tokenizer, queries, **kwargs)

    def memory_summary(self, n_agents: int) -> MemorySummary:
        """Real bytes for ``n_agents`` agents on this document, see :class:`MemorySummary`.

        The agent figure is the largest peak measured so far by any agent of this pool (None
        until one has generated).
        """
        if not isinstance(n_agents, int) or isinstance(n_agents, bool) or n_agents < 1:
            raise ValueError(f"n_agents={n_agents!r} is invalid: use an integer >= 1.")
        with self._peaks.lock:
            peak, dtype = self._peaks.peak_bytes, self._peaks.working_dtype
            batched = self._peaks.batched
        return MemorySummary(
            n_agents=n_agents,
            tokens=self.num_tokens,
            num_layers=self.num_layers,
            kv_heads=self.layout.kv_heads,
            head_dim=self.layout.head_dim,
            preset=self.preset,
            private_bf16_bytes=n_agents * self.bf16_bytes,
            shared_bf16_bytes=self.bf16_bytes,
            pool_bytes=self.nbytes,
            token_id_bytes=self.token_ids.numel() * self.token_ids.element_size(),
            agent_peak_bytes=peak,
            agent_working_dtype=str(dtype).removeprefix("torch.") if dtype else None,
            batched_agents=batched[0] if batched else None,
            batched_peak_bytes=batched[1] if batched else None,
            batched_document_bytes=batched[2] if batched else None,
            batched_backend=batched[3] if batched else None,
            batched_decode_backend=batched[4] if batched else None,
            batched_cuda_graph=batched[5] if batched else None,
        )


@dataclass(frozen=True)
class MemorySummary:
    """Bytes of a document's KV cache for ``n_agents`` agents, each figure from tensors.

    - ``private_bf16_bytes``: ``n_agents`` private bf16 copies (what the PolyKV prototype
      compared against): ``n_agents`` times the measured bf16 copy.
    - ``shared_bf16_bytes``: one shared bf16 copy (what vLLM automatic prefix caching gives).
    - ``pool_bytes``: the compressed pool, the sum of ``PackedKV.nbytes``.
    - ``token_id_bytes``: the pool's token ids (int64).
    - ``agent_peak_bytes``: the largest per-agent working memory measured during a generation
      (suffix K/V of all layers + one layer's decoded buffer, in ``agent_working_dtype``), or
      None before any agent generated.
    - ``batched_peak_bytes``: the measured peak of the latest :meth:`SharedPool.generate` of
      ``batched_agents`` agents (all suffixes + one shared decoded layer), of which
      ``batched_document_bytes`` is the document's share; None before any batched run.
      ``batched_backend`` is the prefix-attention backend that run used (``torch`` or
      ``xformers``, after any fallback), ``batched_decode_backend`` how the prefix was
      decoded (``torch`` codec or ``triton`` kernel), ``batched_cuda_graph`` whether its
      decoding step ran as a CUDA graph.
    """

    n_agents: int
    tokens: int
    num_layers: int
    kv_heads: int
    head_dim: int
    preset: str
    private_bf16_bytes: int
    shared_bf16_bytes: int
    pool_bytes: int
    token_id_bytes: int
    agent_peak_bytes: int | None
    agent_working_dtype: str | None
    batched_agents: int | None = None
    batched_peak_bytes: int | None = None
    batched_document_bytes: int | None = None
    batched_backend: str | None = None
    batched_decode_backend: str | None = None
    batched_cuda_graph: bool | None = None

    @property
    def ratio_vs_shared_bf16(self) -> float:
        """How many times smaller the pool is than one bf16 copy."""
        return self.shared_bf16_bytes / self.pool_bytes

    @property
    def polykv_total_bytes(self) -> int | None:
        """Pool + token ids + ``n_agents`` agents all at their measured peak at once."""
        if self.agent_peak_bytes is None:
            return None
        return self.pool_bytes + self.token_id_bytes + self.n_agents * self.agent_peak_bytes

    def __str__(self) -> str:
        n = self.n_agents
        rows = [
            (f"{n} private bf16 copies (prototype baseline)", _mib(self.private_bf16_bytes), ""),
            ("1 shared bf16 copy (vLLM prefix caching)", _mib(self.shared_bf16_bytes), ""),
            (
                f"compressed pool ({self.preset})",
                _mib(self.pool_bytes),
                f"{self.ratio_vs_shared_bf16:.2f}x smaller than 1 bf16 copy",
            ),
            ("pool token ids (int64)", _mib(self.token_id_bytes), ""),
        ]
        if self.agent_peak_bytes is None:
            rows.append(("peak working memory per agent", "n/a", "no agent has generated yet"))
        else:
            total = self.polykv_total_bytes
            assert total is not None
            rows.append(
                (
                    "peak working memory per agent (measured)",
                    _mib(self.agent_peak_bytes),
                    f"suffix K/V + 1 decoded layer, {self.agent_working_dtype}",
                )
            )
            rows.append(
                (
                    f"polykv total, pool + {n} agents at peak",
                    _mib(total),
                    f"{n} private copies are {self.private_bf16_bytes / total:.2f}x this",
                )
            )
        if self.batched_peak_bytes is not None and self.batched_document_bytes is not None:
            rows.append(
                (
                    f"batched peak, {self.batched_agents} agents together (measured)",
                    _mib(self.batched_peak_bytes),
                    f"all suffixes + 1 shared decoded layer "
                    f"({_mib(self.batched_document_bytes)} of it the document), "
                    f"{self.batched_backend} backend, {self.batched_decode_backend} decode"
                    + (", CUDA graph" if self.batched_cuda_graph else ""),
                )
            )
        width = max(len(r[0]) for r in rows)
        head = (
            f"KV memory of a {self.tokens}-token document ({self.num_layers} layers, "
            f"{self.kv_heads} KV heads, head dim {self.head_dim}), {n} agents"
        )
        lines = [head] + [f"  {a:<{width}}  {b:>12}  {c}".rstrip() for a, b, c in rows]
        return "\n".join(lines)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3f} MiB"


def compress(
    model: Any,
    tokenizer: Any,
    document: str,
    preset: str = "polykv",
    *,
    config: CodecConfig | None = None,
    profile: str | CodecProfile | None = None,
    chat_template: bool | None = None,
) -> SharedPool:
    """Prefill ``document`` once and compress its KV cache per layer into a :class:`SharedPool`.

    ``preset`` names a codec preset (``polykv_vllm.core.PRESETS``); ``config`` overrides it with
    an explicit :class:`CodecConfig`, ``profile`` with a layer-wise profile made for this model
    by ``polykv-vllm calibrate`` (a :class:`CodecProfile` or its JSON path; a profile for
    another model raises :class:`~polykv_vllm.core.ProfileError`). ``chat_template=None``
    wraps the document in the tokenizer's chat template when it has one (the document opens
    the user turn, the query is appended to it by :meth:`Agent.generate`); ``False`` uses the
    raw document.

    The pool lives on the model's device (CPU, CUDA or MPS). The full-precision cache of the
    prefill is encoded layer by layer and dropped; the pool keeps no full-precision copy.
    Raises ``ValueError`` for an unknown preset, an empty document or one longer than the
    model's ``max_position_embeddings``, and :class:`UnsupportedModelError` for cache layouts the
    codec cannot hold.
    """
    if config is not None and profile is not None:
        raise ValueError("compress got both config= and profile=; pass only one of them.")
    if config is not None:
        codec_config, preset_name = config, "custom"
    else:
        codec_config, preset_name = get_preset(preset), preset
    if not isinstance(document, str):
        raise TypeError(f"document must be a str, got {type(document).__name__}.")
    if not document.strip():
        raise ValueError(
            f"document={document[:20]!r} is empty: pass the text the agents should share."
        )
    layout = ModelLayout.from_model(model)
    if profile is not None:
        codec = _profile_codec(model, layout, profile)
        preset_name = codec.identity
    else:
        codec = KVCodec(config=codec_config, num_layers=layout.num_layers, head_dim=layout.head_dim)
    layout.check_codec(codec)
    prompt = PromptFormat.build(tokenizer, document, chat_template)
    ids = prompt.prefix_ids(tokenizer)
    layout.check_positions(
        len(ids) + 1,
        f"a document of {len(ids)} tokens plus at least one query token",
        "shorten the document.",
    )
    token_ids = torch.tensor(ids, dtype=torch.int64)
    cache = _prefill(model, token_ids.to(layout.device))
    layers, bf16_bytes = _encode_layers(cache, codec, layout, len(ids))
    pool = SharedPool(
        layers=tuple(layers),
        token_ids=token_ids,
        codec=codec,
        preset=preset_name,
        layout=layout,
        prompt=prompt,
        bf16_bytes=bf16_bytes,
        weights=weight_sample(model),
    )
    logger.info(
        "compressed %s tokens x %s layers into %s bytes (bf16 copy %s bytes, preset %s)",
        pool.num_tokens,
        pool.num_layers,
        pool.nbytes,
        bf16_bytes,
        preset_name,
    )
    return pool


def _profile_codec(model: Any, layout: ModelLayout, profile: str | CodecProfile) -> KVCodec:
    """The codec of ``profile``, refused (naming both models) unless made for ``model``."""
    loaded = load_profile(profile)
    config = model.config
    loaded.check_model(
        ModelFingerprint(
            name=str(getattr(config, "_name_or_path", "") or type(model).__name__),
            architecture=str((getattr(config, "architectures", None) or [type(model).__name__])[0]),
            num_layers=layout.num_layers,
            kv_heads=layout.kv_heads,
            head_dim=layout.head_dim,
        )
    )
    return KVCodec(profile=loaded, num_layers=layout.num_layers, head_dim=layout.head_dim)


def _prefill(model: Any, token_ids: torch.Tensor) -> DynamicCache:
    kwargs: dict[str, Any] = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # the prefix's logits are not needed
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(
            input_ids=token_ids.unsqueeze(0), past_key_values=cache, use_cache=True, **kwargs
        )
    del out
    return cache


def _encode_layers(
    cache: DynamicCache, codec: KVCodec, layout: ModelLayout, tokens: int
) -> tuple[list[PackedKV], int]:
    if len(cache.layers) != layout.num_layers:
        raise UnsupportedModelError(
            f"model_type={layout.model_type!r} produced a cache of {len(cache.layers)} layers "
            f"but its config says num_hidden_layers={layout.num_layers}: models that share or "
            "skip KV layers are not supported."
        )
    expected = (1, layout.kv_heads, tokens, layout.head_dim)
    packed: list[PackedKV] = []
    bf16_bytes = 0
    for i, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if (
            type(layer) is not DynamicLayer
            or not isinstance(keys, torch.Tensor)
            or not isinstance(values, torch.Tensor)
            or tuple(keys.shape) != expected
            or tuple(values.shape) != expected
        ):
            raise UnsupportedModelError(
                f"model_type={layout.model_type!r} layer {i} caches {type(layer).__name__} with "
                f"keys {_shape(keys)} / values {_shape(values)}: only full-attention "
                f"DynamicLayer caches of [1, kv_heads, tokens, head_dim] = {list(expected)} are "
                "supported."
            )
        k, v = keys[0].transpose(0, 1), values[0].transpose(0, 1)  # [T, H, D] views
        packed.append(codec.encode(k, v, layer=i))
        bf16_bytes += sum(t.to(torch.bfloat16).nbytes for t in (k, v))
        layer.keys = layer.values = None  # drop the full-precision layer now
    return packed, bf16_bytes


def _shape(t: object) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else repr(t)
