"""What the fallback needs to know about a transformers model, checked once: :class:`ModelLayout`.

Only standard decoder-only attention models are supported: every layer a full-attention layer
whose cache is ``[batch, kv_heads, tokens, head_dim]`` keys and values of the same head dim (Llama,
Mistral without sliding window, Qwen2/3, Phi-3, SmolLM, ...). Sliding-window, linear-attention,
MLA and encoder-decoder models are refused with an error that says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from polykv_vllm.core import KVCodec

__all__ = ["ModelLayout", "UnsupportedModelError", "weight_sample"]

logger = logging.getLogger(__name__)


class UnsupportedModelError(ValueError):
    """The model's cache layout is not one the fallback can compress."""


@dataclass(frozen=True)
class ModelLayout:
    """Cache geometry and placement of a decoder model.

    ``num_layers`` attention layers, each caching ``kv_heads`` heads of ``head_dim`` per token;
    ``max_positions`` is ``max_position_embeddings`` (None when the config has none); ``device``
    and ``dtype`` are those of the model's parameters (the pool lives on ``device``).
    """

    model_type: str
    num_layers: int
    kv_heads: int
    head_dim: int
    max_positions: int | None
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def from_model(cls, model: Any) -> ModelLayout:
        """Read and check ``model.config``; raise :class:`UnsupportedModelError` if unsupported."""
        config = getattr(model, "config", None)
        if config is None or not callable(getattr(model, "generate", None)):
            raise TypeError(
                f"model must be a transformers generative model (e.g. AutoModelForCausalLM), got "
                f"{type(model).__name__}, which has no .config or no .generate."
            )
        model_type = str(getattr(config, "model_type", type(model).__name__))
        if getattr(config, "is_encoder_decoder", False):
            raise UnsupportedModelError(
                f"model_type={model_type!r} is an encoder-decoder model: only decoder-only "
                "attention models (Llama, Mistral, Qwen, SmolLM, ...) are supported."
            )
        text = config.get_text_config(decoder=True)
        if getattr(text, "kv_lora_rank", None):
            raise UnsupportedModelError(
                f"model_type={model_type!r} uses multi-head latent attention "
                f"(kv_lora_rank={text.kv_lora_rank}): only standard K/V caches of "
                "[batch, kv_heads, tokens, head_dim] are supported."
            )
        layer_types = getattr(text, "layer_types", None)
        if layer_types is not None:
            other = sorted({t for t in layer_types if t != "full_attention"})
            if other:
                raise UnsupportedModelError(
                    f"model_type={model_type!r} has layer_types {other}: only 'full_attention' "
                    "layers are supported (sliding-window, chunked and linear-attention caches "
                    "are not)."
                )
        elif getattr(text, "sliding_window", None) is not None and getattr(
            text, "use_sliding_window", True
        ):
            raise UnsupportedModelError(
                f"model_type={model_type!r} uses sliding_window={text.sliding_window}: only "
                "full-attention models are supported; disable the sliding window in the config."
            )
        num_layers = _positive_int(text, "num_hidden_layers", model_type)
        heads = _positive_int(text, "num_attention_heads", model_type)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        max_positions = getattr(text, "max_position_embeddings", None)
        param = next(iter(model.parameters()), None)
        if param is None:
            raise TypeError(f"model {type(model).__name__} has no parameters to place a pool by.")
        return cls(
            model_type=model_type,
            num_layers=num_layers,
            kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            max_positions=int(max_positions) if max_positions else None,
            device=param.device,
            dtype=param.dtype,
        )

    def check_codec(self, codec: KVCodec) -> None:
        """Raise :class:`UnsupportedModelError` if ``codec`` refuses this head dim or layers."""
        try:
            for layer in range(self.num_layers):
                codec.layer_spec(layer, self.head_dim)
        except ValueError as err:
            raise UnsupportedModelError(
                f"model_type={self.model_type!r} has head_dim={self.head_dim}, "
                f"num_layers={self.num_layers}, which the codec refuses: {err}"
            ) from err

    def check_positions(self, tokens: int, what: str, fix: str) -> None:
        """Raise ``ValueError`` if ``tokens`` positions do not fit ``max_position_embeddings``."""
        if self.max_positions is not None and tokens > self.max_positions:
            raise ValueError(
                f"{what} needs {tokens} positions but the model's max_position_embeddings="
                f"{self.max_positions}: allowed at most {self.max_positions}; {fix}"
            )


def weight_sample(model: Any) -> torch.Tensor | None:
    """A few input-embedding weights, float32 ``[<=4, <=16]`` on the CPU: tells another
    checkpoint of the same shape from the model the pool was built with (None when the model has
    no readable input embeddings)."""
    try:
        weight = model.get_input_embeddings().weight
        return weight[:4, :16].detach().float().cpu().clone()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None


def same_weights(sample: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether two :func:`weight_sample` results come from one checkpoint, allowing for a cast
    to bf16 / fp16 (relative 1e-2 of the sample's largest magnitude)."""
    if sample.shape != other.shape:
        return False
    tol = 1e-2 * float(sample.abs().max()) + 1e-12
    return bool(((sample - other).abs() <= tol).all())


def _positive_int(config: Any, name: str, model_type: str) -> int:
    value = getattr(config, name, None)
    if not isinstance(value, int) or value < 1:
        raise UnsupportedModelError(
            f"model_type={model_type!r} config has {name}={value!r}: a standard attention "
            f"decoder with an integer {name} >= 1 is required."
        )
    return value
