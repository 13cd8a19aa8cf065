"""Measure how much each layer's keys and values suffer from each codec setting, on real text.

For a few windows of the corpus (``context`` document tokens + ``scored`` tokens after it), the
document is prefilled once in fp32 and the scored tokens are run on top of it (the reference
logits). Then, for every layer and every setting of one stream (keys: K8 int8, rotated K4/K3/K2;
values: V4/V3/V2; each rotated one with and without norm correction), only that layer's keys (or
values) are round-tripped through the codec (decoded to bf16, as vLLM holds them) and the scored
tokens are run again; the loss is the mean KL divergence ``KL(ref || variant)`` per scored token,
in nats. Only the layers from the perturbed one on are recomputed: the earlier layers' inputs
are recorded once (forward pre-hooks on the decoder layers), since they cannot change.

Needs torch and transformers (a decoder-only model with ``model.model.layers``, ``model.model
.norm`` and ``model.lm_head``, e.g. Llama/Qwen/Mistral); imported only by ``polykv-vllm
calibrate``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from polykv_vllm.core import LayerSetting, ModelFingerprint, ProfileError
from polykv_vllm.core.layer_spec import make_layer_spec
from polykv_vllm.hf.layout import ModelLayout

__all__ = [
    "KEY_SETTINGS",
    "VALUE_SETTINGS",
    "Sensitivity",
    "calibration_windows",
    "default_corpus",
    "measure_profile_loss",
    "measure_sensitivity",
    "model_fingerprint",
    "prefill_windows",
]

logger = logging.getLogger(__name__)

#: (bits, norm_correction) tried for each stream; norm correction does not act on int8 keys.
KEY_SETTINGS: tuple[tuple[int, bool], ...] = (
    (8, False),
    (4, True),
    (4, False),
    (3, True),
    (3, False),
    (2, True),
    (2, False),
)
VALUE_SETTINGS: tuple[tuple[int, bool], ...] = (
    (4, True),
    (4, False),
    (3, True),
    (3, False),
    (2, True),
    (2, False),
)
#: bits the other stream is given while one stream is measured (only the layout needs it)
_OTHER_BITS = {"k": 3, "v": 8}


def default_corpus() -> tuple[str, str]:
    """``(name, text)``: Python's ``pydoc_data.topics`` in sorted topic order (English
    documentation that ships with Python; the corpus of ``benchmarks/quality.py``)."""
    from pydoc_data.topics import topics

    return "pydoc_data.topics", "\n\n".join(topics[name] for name in sorted(topics))


def model_fingerprint(model: Any) -> ModelFingerprint:
    """The :class:`ModelFingerprint` of an HF model (name: ``config._name_or_path``)."""
    layout = ModelLayout.from_model(model)
    config = model.config
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    return ModelFingerprint(
        name=str(getattr(config, "_name_or_path", "") or type(model).__name__),
        architecture=str(arch),
        num_layers=layout.num_layers,
        kv_heads=layout.kv_heads,
        head_dim=layout.head_dim,
    )


def calibration_windows(
    n_tokens: int, windows: int, length: int, corpus: str
) -> list[tuple[int, int]]:
    """``windows`` back-to-back ``[start, end)`` spans of ``length`` tokens at the END of the
    corpus (evaluations use the tokens before them: ``benchmarks/quality.py``). Raises
    :class:`ProfileError` when the corpus is too short."""
    need = windows * length
    if windows < 1 or need > n_tokens:
        raise ProfileError(
            f"corpus {corpus} has {n_tokens} tokens, too short for {windows} calibration windows "
            f"of {length} tokens (context + scored + 1) = {need}: allowed are at most "
            f"{n_tokens // length} windows of this length; pass --windows, --context or "
            "--scored smaller, or a longer --corpus."
        )
    first = n_tokens - need
    return [(first + i * length, first + (i + 1) * length) for i in range(windows)]


@dataclass
class Sensitivity:
    """Measured losses: ``keys[layer][(bits, nc)]`` and ``values[layer][(bits, nc)]`` (mean
    KL per scored token, nats, that stream of that layer alone quantized so)."""

    keys: list[dict[tuple[int, bool], float]]
    values: list[dict[tuple[int, bool], float]]
    seconds: float
    scored_tokens: int

    def layer_loss(self, layer: int, setting: LayerSetting) -> float:
        """Predicted loss of ``setting`` at ``layer``: its key loss + its value loss."""
        nc = setting.norm_correction
        k = self.keys[layer][(setting.key_bits, nc if setting.key_bits != 8 else False)]
        return k + self.values[layer][(setting.value_bits, nc)]

    def to_dict(self) -> dict[str, Any]:
        def rows(table: list[dict[tuple[int, bool], float]], s: str) -> list[dict[str, float]]:
            return [
                {f"{s}{b}{'n' if nc else ''}": round(x, 7) for (b, nc), x in t.items()}
                for t in table
            ]

        return {
            "keys": rows(self.keys, "K"),
            "values": rows(self.values, "V"),
            "seconds": round(self.seconds, 1),
            "scored_tokens": self.scored_tokens,
        }


class _Runner:
    """The scored tokens run on top of a prefix, from any decoder layer on."""

    def __init__(self, model: Any, ids: torch.Tensor, context: int) -> None:
        from transformers import DynamicCache

        self.model = model
        self.context = context
        with torch.inference_mode():
            cache = DynamicCache()
            model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True)
            layers_kv: list[Any] = list(cache.layers)
            self.kv = [(layer.keys.clone(), layer.values.clone()) for layer in layers_kv]
        self.scored = ids[:, context:-1]
        self.inputs: list[tuple[torch.Tensor, dict[str, Any]]] = []
        layers = model.model.layers
        hooks = [
            layer.register_forward_pre_hook(self._record, with_kwargs=True) for layer in layers
        ]
        try:
            self.ref = self.logp(self.kv)
        finally:
            for h in hooks:
                h.remove()
        if len(self.inputs) != len(layers):
            raise ProfileError(
                f"calibration could not record the inputs of {type(model).__name__}'s decoder "
                f"layers ({len(self.inputs)} of {len(layers)}): a decoder-only transformers model "
                "with model.model.layers is required."
            )

    def _record(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}
        self.inputs.append((hidden.detach().clone(), rest))

    @torch.inference_mode()
    def logp(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int = 0) -> torch.Tensor:
        """Log-probs ``[B, N, vocab]`` (fp32) of the scored tokens with prefix ``kv``, running
        decoder layers ``start..`` (the earlier ones' outputs are the recorded ones)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        if start == 0 and not self.inputs:
            out = self.model(input_ids=self.scored, past_key_values=cache, use_cache=True)
            return torch.log_softmax(out.logits.float(), dim=-1)
        hidden, _ = self.inputs[start]
        for i in range(start, len(self.inputs)):
            kwargs = dict(self.inputs[i][1], past_key_values=cache)
            out = self.model.model.layers[i](hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        logits = self.model.lm_head(self.model.model.norm(hidden))
        return torch.log_softmax(logits.float(), dim=-1)

    def kl(self, logp: torch.Tensor) -> float:
        """Mean over scored tokens of ``KL(ref || variant)``."""
        ref = self.ref
        return float((ref.exp() * (ref - logp)).sum(-1).mean())


def _roundtrip(x: torch.Tensor, stream: str, bits: int, nc: bool, seed: int) -> torch.Tensor:
    """``x`` ``[B, H, T, D]`` through one stream of the codec, decoded to bf16, back to fp32."""
    b, h, t, d = x.shape
    k_bits, v_bits = (bits, _OTHER_BITS["k"]) if stream == "k" else (_OTHER_BITS["v"], bits)
    spec = make_layer_spec(d, k_bits, v_bits, seed, nc).stream("k" if stream == "k" else "v")
    rows = x.permute(0, 2, 1, 3).reshape(b * t, h, d)
    out = spec.decode(*spec.encode(rows)).to(torch.bfloat16).to(x.dtype)
    return out.reshape(b, t, h, d).permute(0, 2, 1, 3).contiguous()


def prefill_windows(model: Any, windows: Sequence[Sequence[int]], context: int) -> _Runner:
    """Prefill ``windows`` (token id lists of ``context + scored + 1`` tokens each, batched
    together) once; the result is what :func:`measure_sensitivity` and
    :func:`measure_profile_loss` measure on."""
    ids = torch.tensor([list(w) for w in windows], device=model.device)
    return _Runner(model, ids, context)


def measure_sensitivity(
    runner: _Runner, seed: int = 0, progress: Callable[[str], None] | None = None
) -> Sensitivity:
    """Per-layer, per-stream losses of every setting (see the module docstring)."""
    t0 = time.time()
    n_layers = len(runner.kv)
    keys: list[dict[tuple[int, bool], float]] = []
    values: list[dict[tuple[int, bool], float]] = []
    for layer in range(n_layers):
        k, v = runner.kv[layer]
        row_k, row_v = {}, {}
        for bits, nc in KEY_SETTINGS:
            kv = list(runner.kv)
            kv[layer] = (_roundtrip(k, "k", bits, nc, seed), v)
            row_k[(bits, nc)] = runner.kl(runner.logp(kv, layer))
        for bits, nc in VALUE_SETTINGS:
            kv = list(runner.kv)
            kv[layer] = (k, _roundtrip(v, "v", bits, nc, seed))
            row_v[(bits, nc)] = runner.kl(runner.logp(kv, layer))
        keys.append(row_k)
        values.append(row_v)
        elapsed = time.time() - t0
        left = elapsed / (layer + 1) * (n_layers - layer - 1)
        if progress is not None:
            progress(
                f"layer {layer + 1}/{n_layers}: K8 {row_k[(8, False)]:.5f} K4n "
                f"{row_k[(4, True)]:.5f} V3n {row_v[(3, True)]:.5f} V2n {row_v[(2, True)]:.5f} "
                f"(KL nats/token; {elapsed:.0f}s, ~{left:.0f}s left)"
            )
    return Sensitivity(keys, values, time.time() - t0, int(runner.scored.numel()))


def measure_profile_loss(runner: _Runner, settings: Sequence[LayerSetting], seed: int = 0) -> float:
    """Measured mean KL per scored token with every layer encoded by ``settings`` at once
    (keys and values), decoded to bf16 — the joint figure the additive prediction is checked
    against."""
    kv = []
    for (k, v), s in zip(runner.kv, settings, strict=True):
        kn = s.norm_correction if s.key_bits != 8 else False
        kv.append(
            (
                _roundtrip(k, "k", s.key_bits, kn, seed),
                _roundtrip(v, "v", s.value_bits, s.norm_correction, seed),
            )
        )
    return runner.kl(runner.logp(kv, 0))


def text_digest(text: str) -> str:
    """sha256 (hex) of the corpus text, recorded in the profile."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
