"""Quality cost of a compressed document prefix, per codec preset, on the real embedded model.

What is measured (SmolLM2-135M-Instruct in fp32, on CPU unless ``--device``; text: Python's
own ``pydoc_data.topics``, English documentation not written by this project):

1. **Perplexity of a continuation given a compressed prefix.** The token stream is cut into
   seeded windows of ``context + continuation + 1`` tokens. The first ``context`` tokens (the
   "document") are prefilled in fp32; their per-layer K/V (post-RoPE keys, as in vLLM's paged
   cache) are round-tripped through a variant (``bf16`` cast, or a codec preset: encode, decode
   to ``--decode-dtype``, back to fp32), put into a transformers ``DynamicCache``, and the next
   ``continuation`` tokens are fed on top of it; each predicts the token after it. The
   reference is the untouched fp32 prefix. Per window the PPL delta is
   ``100 * (PPL_variant / PPL_ref - 1)``; the mean over windows gets a paired 95% CI (Student t
   interval and a seeded percentile bootstrap, both reported).
2. **Top-1 agreement.** (a) on the real continuation: argmax of the variant's logits vs the
   reference's at every continuation position; (b) greedy over ``--generate`` tokens: the
   reference greedily generates after the document (first input: the token following it);
   *teacher-forced*: the variant's argmax on the reference's greedy tokens;
   *free-running*: the variant generates greedily on its own, compared position by position.
3. **Needle retrieval.** A fact ("The access code for vault 17 is 4821.") is inserted at a
   given depth of a pydoc excerpt; the chat-templated prompt is split after the document, the
   document part (system header + excerpt) is the compressed prefix, the question part is
   computed; exact match of the first number in the greedy answer.
4. **Real bytes.** The sum of the stored tensors' bytes over layers (``PackedKV.nbytes`` for a
   codec, the cast tensors' bytes for bf16) vs the bytes of the same K/V in bf16.
5. **Behind an fp8 working cache** (``--cache-dtype fp8 [fp8_e5m2]``, issue 10; see
   ``quality_fp8``): the document is prefilled into a simulated vLLM fp8 cache (every K/V
   written is quantized with the layer's ``k_scale``/``v_scale``, attention reads the
   dequantized values, including the current tokens'); ``<dtype>`` is that cache alone;
   ``<dtype>+<preset>`` stores the dequantized fp8 prefix with the codec, decodes it and writes
   it into fp8 again (``quantize(decode(encode(dequant(fp8(kv)))))``), and the continuation
   runs on the fp8 cache. Both are compared with fp32 and ``<dtype>+<preset>`` also with
   ``<dtype>`` alone (paired per-window PPL delta with CI, top-1 and teacher-forced agreement
   on the fp8 cache's own greedy tokens).

Run ``python benchmarks/quality.py --help``. Writes ``<stem>.json`` (everything, per window),
``<stem>.csv`` (one row per variant) and ``<stem>.md`` (the README table) under ``--out``
(``--stem``, default ``quality``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import platform
import random
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from quality_fp8 import (
    FP8_CACHE_DTYPES,
    SCALE_MODES,
    Fp8Spec,
    LayerScales,
    cache_factory,
    fp8_nbytes,
)

from polykv_vllm.core import PRESETS, CodecConfig, KVCodec

logger = logging.getLogger("benchmarks.quality")

#: One layer's K/V in the transformers cache layout: ``(k, v)``, each ``[1, kv_heads, T, D]``.
LayerKV = tuple[torch.Tensor, torch.Tensor]

TARGETS = {
    # preset: (min real compression vs bf16, max mean PPL delta % vs fp32)
    "polykv": (2.78, 1.0),
    "polykv-lite": (4.5, 2.0),
}
#: preset: max mean PPL delta % of ``<fp8 cache>+<preset>`` vs the fp8 cache alone (issue 10).
FP8_TARGETS = {"polykv": 0.5}
MIN_AGREEMENT = 0.95


# --- variants: what is done to the prefix K/V -------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """A way of storing the document prefix.

    ``roundtrip(kv)`` takes the fp32 per-layer K/V (``[1, H, T, D]`` each) and returns the K/V
    the model will attend to (fp32, same shapes) and the bytes the stored form holds, measured
    from its tensors.

    ``working``: the working cache the document is prefilled into, the stored prefix is written
    back into and the continuation runs on (``None``: plain fp32, as before issue 10; an
    :class:`Fp8Spec`: every write goes through fp8, see ``quality_fp8``). ``roundtrip`` then
    gets the dequantized fp8 K/V. ``baseline``: the variant this one is compared with besides
    fp32 (PPL delta, top-1 and greedy agreement), which must come earlier in the list.
    """

    name: str
    roundtrip: Callable[[Sequence[LayerKV]], tuple[list[LayerKV], int]]
    config: dict[str, Any] = field(default_factory=dict)
    working: Fp8Spec | None = None
    baseline: str | None = None


def identity_roundtrip(kv: Sequence[LayerKV]) -> tuple[list[LayerKV], int]:
    """The fp32 prefix unchanged; bytes of the fp32 tensors."""
    return [(k, v) for k, v in kv], sum(k.nbytes + v.nbytes for k, v in kv)


def cast_roundtrip(dtype: torch.dtype) -> Callable[[Sequence[LayerKV]], tuple[list[LayerKV], int]]:
    """Cast the prefix to ``dtype`` (stored form) and back to the original dtype."""

    def roundtrip(kv: Sequence[LayerKV]) -> tuple[list[LayerKV], int]:
        out, nbytes = [], 0
        for k, v in kv:
            ks, vs = k.to(dtype), v.to(dtype)
            nbytes += ks.nbytes + vs.nbytes
            out.append((ks.to(k.dtype), vs.to(v.dtype)))
        return out, nbytes

    return roundtrip


def codec_roundtrip(
    codec: KVCodec, decode_dtype: torch.dtype
) -> Callable[[Sequence[LayerKV]], tuple[list[LayerKV], int]]:
    """Encode each layer with ``codec`` (``layer=i``), decode to ``decode_dtype``, back to fp32.

    Bytes: sum of ``PackedKV.nbytes`` over layers.
    """

    def roundtrip(kv: Sequence[LayerKV]) -> tuple[list[LayerKV], int]:
        out, nbytes = [], 0
        for layer, (k, v) in enumerate(kv):
            packed = codec.encode(to_codec_layout(k), to_codec_layout(v), layer=layer)
            nbytes += packed.nbytes
            k2, v2 = codec.decode(packed, dtype=decode_dtype, device=k.device, layer=layer)
            out.append((from_codec_layout(k2, k.dtype), from_codec_layout(v2, v.dtype)))
        return out, nbytes

    return roundtrip


def fp8_store_roundtrip(
    cache_dtype: str,
) -> Callable[[Sequence[LayerKV]], tuple[list[LayerKV], int]]:
    """The fp8 working cache alone: the (already dequantized) K/V unchanged; bytes of the fp8
    codes."""

    def roundtrip(kv: Sequence[LayerKV]) -> tuple[list[LayerKV], int]:
        return [(k, v) for k, v in kv], fp8_nbytes(kv, cache_dtype)

    return roundtrip


def to_codec_layout(x: torch.Tensor) -> torch.Tensor:
    """``[1, H, T, D]`` (transformers cache) -> ``[T, H, D]`` (codec), contiguous."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected a cache tensor [1, heads, tokens, dim], got {tuple(x.shape)}")
    return x[0].transpose(0, 1).contiguous()


def from_codec_layout(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[T, H, D]`` (codec) -> ``[1, H, T, D]`` (transformers cache) in ``dtype``."""
    return x.transpose(0, 1).unsqueeze(0).to(dtype).contiguous()


def bf16_bytes(kv: Sequence[LayerKV]) -> int:
    """Bytes of the same K/V held in bf16, measured from cast tensors."""
    return sum(k.to(torch.bfloat16).nbytes + v.to(torch.bfloat16).nbytes for k, v in kv)


# --- model pieces -----------------------------------------------------------------------------


def make_cache(kv: Sequence[LayerKV], new_cache: Callable[[], Any] | None = None) -> Any:
    """A fresh cache from ``new_cache`` (default: transformers ``DynamicCache``) holding ``kv``,
    written through its ``update`` (an fp8 cache quantizes it). The tensors are not modified:
    ``DynamicLayer.update`` concatenates into new tensors."""
    from transformers import DynamicCache

    cache = (new_cache or DynamicCache)()
    for layer, (k, v) in enumerate(kv):
        cache.update(k, v, layer)
    return cache


@torch.inference_mode()
def prefill(
    model: Any, ids: Sequence[int], new_cache: Callable[[], Any] | None = None
) -> list[LayerKV]:
    """Run ``ids`` through ``model`` on an empty cache from ``new_cache`` (default
    ``DynamicCache``); return the per-layer K/V it holds, ``[1, H, T, D]`` (post-RoPE; for an
    fp8 cache the dequantized values, computed with fp8 attention all along)."""
    from transformers import DynamicCache

    cache = (new_cache or DynamicCache)()
    model(input_ids=_ids(model, ids), past_key_values=cache, use_cache=True)
    layers: list[Any] = list(cache.layers)
    return [(layer.keys, layer.values) for layer in layers]


@torch.inference_mode()
def logits_after(
    model: Any,
    kv: Sequence[LayerKV],
    ids: Sequence[int],
    new_cache: Callable[[], Any] | None = None,
) -> torch.Tensor:
    """Logits ``[len(ids), vocab]`` (fp32) of ``ids`` fed on top of the prefix ``kv`` (in a
    cache from ``new_cache``, see :func:`make_cache`)."""
    cache = make_cache(kv, new_cache)
    out = model(input_ids=_ids(model, ids), past_key_values=cache, use_cache=True)
    return out.logits[0].float()


def _ids(model: Any, ids: Sequence[int]) -> torch.Tensor:
    """``ids`` as a ``[1, N]`` int64 tensor on the model's device."""
    return torch.tensor([list(ids)], device=model.device)


def token_nll(logits: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """Negative log-likelihood ``[N]`` (fp64) of ``targets`` under ``logits`` ``[N, vocab]``."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    index = torch.tensor(list(targets), device=logits.device).unsqueeze(1)
    return -logp.gather(1, index)[:, 0].cpu()


def perplexity(nll: torch.Tensor) -> float:
    """``exp(mean NLL)``."""
    return math.exp(float(nll.mean()))


@torch.inference_mode()
def greedy(
    model: Any,
    kv: Sequence[LayerKV],
    first: int,
    n: int,
    eos: int | None = None,
    new_cache: Callable[[], Any] | None = None,
) -> list[int]:
    """Greedy tokens generated after the prefix ``kv`` with ``first`` as the first input.

    Free-running, one token per step, at most ``n`` tokens; stops after ``eos``.
    """
    cache = make_cache(kv, new_cache)
    out: list[int] = []
    nxt = first
    for _ in range(n):
        logits = model(input_ids=_ids(model, [nxt]), past_key_values=cache, use_cache=True)
        nxt = int(logits.logits[0, -1].argmax())
        out.append(nxt)
        if eos is not None and nxt == eos:
            break
    return out


@torch.inference_mode()
def greedy_prompt(
    model: Any,
    kv: Sequence[LayerKV],
    prompt: Sequence[int],
    n: int,
    eos: int | None,
    new_cache: Callable[[], Any] | None = None,
) -> list[int]:
    """Greedy answer to ``prompt`` (several tokens) fed after the prefix ``kv``."""
    cache = make_cache(kv, new_cache)
    logits = model(input_ids=_ids(model, prompt), past_key_values=cache, use_cache=True)
    nxt = int(logits.logits[0, -1].argmax())
    out = [nxt]
    while len(out) < n and nxt != eos:
        logits = model(input_ids=_ids(model, [nxt]), past_key_values=cache, use_cache=True)
        nxt = int(logits.logits[0, -1].argmax())
        out.append(nxt)
    return out


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of positions ``i < len(b)`` with ``a[i] == b[i]`` (missing ``a[i]`` disagree)."""
    if not b:
        raise ValueError("agreement needs a non-empty reference sequence")
    return sum(1 for i, t in enumerate(b) if i < len(a) and a[i] == t) / len(b)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int:
    """Index of the first position where ``a`` and ``b`` differ (``min`` length if none)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


# --- corpus and windows -----------------------------------------------------------------------


#: the second corpus (issue 14): the license texts Debian ships, each file once (the GPL,
#: LGPL and GFDL symlinks are skipped), in file-name order; text this project did not write
LICENSES_DIR = Path("/usr/share/common-licenses")


def corpus_text(path: Path | None = None, name: str = "pydoc") -> str:
    """Python's ``pydoc_data.topics`` (sorted by topic name), joined by blank lines; the
    license texts of :data:`LICENSES_DIR` (``name="licenses"``); or the text of ``path`` (e.g.
    that text saved from another Python version, for the same windows).
    """
    if path is not None:
        return path.read_text(encoding="utf-8")
    if name == "licenses":
        files = sorted(f for f in LICENSES_DIR.iterdir() if f.is_file() and not f.is_symlink())
        if not files:
            raise SystemExit(f"--corpus licenses: no license texts under {LICENSES_DIR}")
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def calibration_spans(profiles: dict[str, KVCodec], text: str) -> list[tuple[int, int]]:
    """The token spans ``[start, end)`` of ``text`` that any of ``profiles`` was calibrated on
    (none when it was calibrated on another text): evaluation windows must stay clear of them.
    """
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    spans: list[tuple[int, int]] = []
    for codec in profiles.values():
        assert codec.profile is not None
        corpus = codec.profile.calibration.get("corpus", {})
        if corpus.get("sha256") == digest:
            spans += [(int(a), int(b)) for a, b in corpus["windows"]]
    return sorted(set(spans))


def assert_disjoint(windows: Sequence[tuple[int, int]], calibration: Sequence[tuple[int, int]]):
    """No evaluation window ``[a, b)`` shares a token with a calibration window."""
    for a, b in windows:
        for c, d in calibration:
            assert b <= c or a >= d, f"evaluation window [{a}, {b}) overlaps calibration [{c}, {d})"


def choose_windows(n_tokens: int, n_windows: int, length: int, seed: int) -> list[int]:
    """Seeded start offsets of ``n_windows`` windows of ``length`` tokens in ``[0, n_tokens)``.

    Non-overlapping when they fit (the slack is spread at random); otherwise evenly spaced
    with a seeded jitter-free stride ``(n_tokens - length) // (n_windows - 1)`` (then windows
    overlap by ``length - stride`` tokens; the caller logs it). Sorted ascending.
    """
    if n_windows < 1 or length < 1:
        raise ValueError(f"need n_windows >= 1 and length >= 1, got {n_windows}, {length}")
    if length > n_tokens:
        raise ValueError(f"a window of {length} tokens does not fit in a corpus of {n_tokens}")
    slack = n_tokens - n_windows * length
    if slack >= 0:
        rng = random.Random(seed)
        cuts = sorted(rng.randint(0, slack) for _ in range(n_windows))
        return [c + i * length for i, c in enumerate(cuts)]
    if n_windows == 1:
        return [0]
    stride = (n_tokens - length) // (n_windows - 1)
    return [i * stride for i in range(n_windows)]


# --- needles ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Needle:
    """A fact to retrieve: ``sentence`` is inserted, ``question`` asks for ``answer``."""

    vault: int
    answer: str
    depth: float

    @property
    def sentence(self) -> str:
        return f"The access code for vault {self.vault} is {self.answer}."

    @property
    def question(self) -> str:
        return f"What is the access code for vault {self.vault}? Answer with the number only."


def make_needles(n: int, seed: int) -> list[Needle]:
    """``n`` needles with distinct vault numbers, 4-digit codes, depths evenly in [0.05, 0.95]."""
    rng = random.Random(seed)
    vaults = rng.sample(range(10, 100), n) if n <= 90 else rng.sample(range(100, 1000), n)
    depths = [0.05 + 0.9 * i / max(n - 1, 1) for i in range(n)]
    return [
        Needle(vault=v, answer=str(rng.randint(1000, 9999)), depth=round(d, 4))
        for v, d in zip(vaults, depths, strict=True)
    ]


def insert_needle(text: str, sentence: str, depth: float) -> tuple[str, int]:
    """Insert ``sentence`` as its own line at the line break nearest ``depth * len(text)``.

    Returns ``(new_text, index of the sentence in new_text)``. A text without line breaks gets
    the sentence at the space nearest the depth (or at the end).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} is not allowed: use a fraction in [0, 1]")
    target = round(depth * len(text))
    breaks = [m.start() for m in re.finditer("\n", text)] or [
        m.start() for m in re.finditer(" ", text)
    ]
    pos = min(breaks, key=lambda b: abs(b - target)) if breaks else len(text)
    new = text[:pos] + "\n" + sentence + text[pos:]
    return new, pos + 1


def excerpt(tokenizer: Any, tokens: Sequence[int], start: int, length: int) -> str:
    """Text of ``tokens[start:start+length]`` without its partial first and last lines."""
    text = tokenizer.decode(list(tokens[start : start + length]))
    lines = text.split("\n")
    return "\n".join(lines[1:-1]).strip("\n") if len(lines) > 2 else text


def split_chat_prompt(tokenizer: Any, document: str, question: str) -> tuple[list[int], list[int]]:
    """The chat prompt for ``document + question``, split into (prefix ids, suffix ids).

    The prefix is everything up to the end of ``document`` (system header + document): that is
    what gets compressed. The suffix (question, end of turn, assistant header) is computed.
    """
    messages = [{"role": "user", "content": f"{document}\n\n{question}"}]
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    cut = full.index(document) + len(document)
    prefix = tokenizer(full[:cut], add_special_tokens=False)["input_ids"]
    suffix = tokenizer(full[cut:], add_special_tokens=False)["input_ids"]
    return list(prefix), list(suffix)


def extract_code(answer: str, vault: int) -> str | None:
    """The code an answer gives: its first run of digits that is not the vault number (the
    model often repeats the question: "The access code for vault 17 is 4821."), or None."""
    for m in re.finditer(r"\d+", answer):
        if m.group(0) != str(vault):
            return m.group(0)
    return None


# --- statistics -------------------------------------------------------------------------------


def t_quantile(p: float, df: int) -> float:
    """Quantile ``p`` (0.5 < p < 1) of Student's t with ``df`` degrees of freedom.

    CDF by Simpson integration of the density from 0, inverted by bisection (no scipy here).
    """
    if not 0.5 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(x: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(t: float, steps: int = 2000) -> float:
        h = t / steps
        s = pdf(0.0) + pdf(t) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, steps))
        return 0.5 + s * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(xs: Sequence[float], seed: int, resamples: int = 10_000) -> dict[str, float]:
    """Mean of ``xs`` with 95% CIs: Student t interval and seeded percentile bootstrap."""
    n = len(xs)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(xs) / n
    out = {"mean": mean, "n": float(n)}
    if n < 2:
        return out
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    rng = random.Random(seed)
    boots = sorted(sum(rng.choices(xs, k=n)) / n for _ in range(resamples))
    out.update(
        sd=sd,
        t_lo=mean - half,
        t_hi=mean + half,
        boot_lo=boots[int(0.025 * resamples)],
        boot_hi=boots[int(0.975 * resamples) - 1],
    )
    return out


# --- the measurement --------------------------------------------------------------------------


@dataclass
class WindowResult:
    """Per-window measurements of one variant (fields filled as measured)."""

    start: int
    ppl: float
    nll_sum: float
    tokens: int
    top1_real: float | None = None
    greedy_tf: float | None = None
    greedy_free: float | None = None
    first_div: int | None = None
    nbytes: int = 0
    bf16_nbytes: int = 0
    top1_vs_base: float | None = None
    greedy_tf_vs_base: float | None = None


#: WindowResult fields written to JSON only when set (runs without a baseline keep their format).
_BASELINE_FIELDS = ("top1_vs_base", "greedy_tf_vs_base")


def window_dict(result: WindowResult) -> dict[str, Any]:
    """``result`` as a JSON object, without the unset baseline fields."""
    d = dataclasses.asdict(result)
    return {k: v for k, v in d.items() if not (k in _BASELINE_FIELDS and v is None)}


class WorkingCaches:
    """Per window (or needle): the document prefilled into each working cache a variant uses.

    ``get(None)`` is the fp32 prefill given at construction with plain caches; ``get(spec)``
    prefills the document into a fresh :class:`Fp8Cache` on first use (its per-layer scales are
    calibrated there and then shared by every later cache of this window) and returns
    ``(dequantized K/V, factory of caches with the same scales)``.
    """

    def __init__(self, model: Any, ids: Sequence[int], kv: list[LayerKV]) -> None:
        self.model, self.ids = model, list(ids)
        self.caches: dict[Fp8Spec | None, tuple[list[LayerKV], Callable[[], Any]]] = {}
        self.caches[None] = (kv, cache_factory(None))

    def get(self, spec: Fp8Spec | None) -> tuple[list[LayerKV], Callable[[], Any]]:
        if spec not in self.caches:
            new_cache = cache_factory(LayerScales(spec))
            self.caches[spec] = (prefill(self.model, self.ids, new_cache), new_cache)
        return self.caches[spec]


def check_baselines(variants: Sequence[Variant]) -> None:
    """Every ``baseline`` names an earlier variant (or fp32)."""
    seen = {"fp32"}
    for v in variants:
        if v.baseline is not None and v.baseline not in seen:
            raise ValueError(
                f"variant {v.name!r} has baseline={v.baseline!r}, which is not an earlier "
                f"variant (earlier: {sorted(seen)}); list the baseline first"
            )
        seen.add(v.name)


def measure_window(
    model: Any,
    variants: Sequence[Variant],
    ids: Sequence[int],
    context: int,
    generate: int,
    free_running: bool,
    start: int = 0,
) -> dict[str, WindowResult]:
    """All PPL/agreement measurements of one window ``ids`` (``context + continuation + 1``
    tokens) for the fp32 reference (key ``"fp32"``) and every variant.

    A variant with a ``baseline`` is also compared with it: top-1 on the real continuation and
    teacher-forced agreement on the baseline's own greedy tokens."""
    check_baselines(variants)
    ctx, cont = list(ids[:context]), list(ids[context:])
    if len(cont) < 2:
        raise ValueError(f"window of {len(ids)} tokens leaves no continuation after {context}")
    kv = prefill(model, ctx)
    working = WorkingCaches(model, ctx, kv)
    baselines = {v.baseline for v in variants if v.baseline is not None}
    bf16 = bf16_bytes(kv)
    inputs, targets = cont[:-1], cont[1:]

    ref_logits = logits_after(model, kv, inputs)
    ref_nll = token_nll(ref_logits, targets)
    ref_top1 = ref_logits.argmax(-1)
    ref_gen = greedy(model, kv, inputs[0], generate) if generate else []
    results = {
        "fp32": WindowResult(
            start=start,
            ppl=perplexity(ref_nll),
            nll_sum=float(ref_nll.sum()),
            tokens=len(targets),
            top1_real=1.0,
            greedy_tf=1.0 if generate else None,
            greedy_free=1.0 if generate and free_running else None,
            first_div=generate if generate and free_running else None,
            nbytes=identity_roundtrip(kv)[1],
            bf16_nbytes=bf16,
        )
    }
    top1s, gens = {"fp32": ref_top1}, {"fp32": ref_gen}
    for variant in variants:
        source, new_cache = working.get(variant.working)
        kv2, nbytes = variant.roundtrip(source)
        logits = logits_after(model, kv2, inputs, new_cache)
        nll = token_nll(logits, targets)
        top1 = top1s[variant.name] = logits.argmax(-1)
        res = WindowResult(
            start=start,
            ppl=perplexity(nll),
            nll_sum=float(nll.sum()),
            tokens=len(targets),
            top1_real=float((top1 == ref_top1).double().mean()),
            nbytes=nbytes,
            bf16_nbytes=bf16,
        )
        if generate:
            tf = logits_after(model, kv2, [inputs[0], *ref_gen[:-1]], new_cache).argmax(-1)
            res.greedy_tf = agreement(tf.tolist(), ref_gen)
            if free_running or variant.name in baselines:
                gen = gens[variant.name] = greedy(
                    model, kv2, inputs[0], generate, new_cache=new_cache
                )
            if free_running:
                res.greedy_free = agreement(gen, ref_gen)
                res.first_div = first_divergence(gen, ref_gen)
        if variant.baseline is not None:
            res.top1_vs_base = float((top1 == top1s[variant.baseline]).double().mean())
            if generate:
                base_gen = gens[variant.baseline]
                tf = logits_after(model, kv2, [inputs[0], *base_gen[:-1]], new_cache).argmax(-1)
                res.greedy_tf_vs_base = agreement(tf.tolist(), base_gen)
        results[variant.name] = res
    return results


def measure_needle(
    model: Any,
    tokenizer: Any,
    variants: Sequence[Variant],
    document: str,
    needle: Needle,
    max_new: int,
) -> dict[str, dict[str, Any]]:
    """Answer the needle's question from the full and from every variant's prefix (each on
    its working cache)."""
    text, _ = insert_needle(document, needle.sentence, needle.depth)
    prefix, suffix = split_chat_prompt(tokenizer, text, needle.question)
    kv = prefill(model, prefix)
    working = WorkingCaches(model, prefix, kv)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out: dict[str, dict[str, Any]] = {}
    runs: list[tuple[str, list[LayerKV], Callable[[], Any]]] = [("fp32", *working.get(None))]
    for v in variants:
        source, new_cache = working.get(v.working)
        runs.append((v.name, v.roundtrip(source)[0], new_cache))
    for name, kv2, new_cache in runs:
        answer = tokenizer.decode(greedy_prompt(model, kv2, suffix, max_new, eos, new_cache))
        answer = answer.replace("<|im_end|>", "").strip()
        out[name] = {
            "answer": answer,
            "correct": extract_code(answer, needle.vault) == needle.answer,
            "prefix_tokens": len(prefix),
        }
    return out


# --- summary and output -----------------------------------------------------------------------


def summarize(
    names: Sequence[str],
    windows: Sequence[dict[str, WindowResult]],
    needles: Sequence[dict[str, Any]],
    seed: int,
    roles: dict[str, dict[str, str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-variant summary: bytes, ratio, PPL deltas vs fp32 and bf16 with CIs, agreements,
    retrieval accuracy.

    ``roles[name]`` (optional): ``{"working_cache": ..., "baseline": ...}``, copied into the
    summary; with a ``baseline``, ``delta_vs_baseline`` is the paired per-window PPL delta vs
    that variant (same windows, same CI) and ``top1_vs_base`` / ``greedy_tf_vs_base`` the
    agreements with it."""
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        rows = [w[name] for w in windows]
        role = (roles or {}).get(name, {})
        s: dict[str, Any] = {
            **role,
            "nbytes": sum(r.nbytes for r in rows),
            "bf16_nbytes": sum(r.bf16_nbytes for r in rows),
            "ppl_mean": sum(r.ppl for r in rows) / len(rows),
            "ppl_corpus": math.exp(sum(r.nll_sum for r in rows) / sum(r.tokens for r in rows)),
        }
        s["ratio_vs_bf16"] = s["bf16_nbytes"] / s["nbytes"]
        for base in ("fp32", "bf16"):
            if base in windows[0] and base != name:
                deltas = [100.0 * (w[name].ppl / w[base].ppl - 1.0) for w in windows]
                s[f"delta_vs_{base}"] = mean_ci(deltas, seed)
                ref_corpus = math.exp(
                    sum(w[base].nll_sum for w in windows) / sum(w[base].tokens for w in windows)
                )
                s[f"corpus_delta_vs_{base}"] = 100.0 * (s["ppl_corpus"] / ref_corpus - 1.0)
        if "baseline" in role:
            deltas = paired_deltas(windows, name, role["baseline"])
            s["delta_vs_baseline"] = mean_ci(deltas, seed)
            base_rows = [w[role["baseline"]] for w in windows]
            s["corpus_delta_vs_baseline"] = 100.0 * (
                s["ppl_corpus"]
                / math.exp(sum(r.nll_sum for r in base_rows) / sum(r.tokens for r in base_rows))
                - 1.0
            )
        for key in ("top1_real", "greedy_tf", "greedy_free", "first_div", *_BASELINE_FIELDS):
            vals = [getattr(r, key) for r in rows if getattr(r, key) is not None]
            if vals:
                s[key] = mean_ci([float(x) for x in vals], seed)
        if needles:
            correct = [n[name]["correct"] for n in needles]
            s["retrieval_acc"] = sum(correct) / len(correct)
            s["retrieval_n"] = len(correct)
        summary[name] = s
    return summary


def paired_deltas(windows: Sequence[dict[str, WindowResult]], name: str, base: str) -> list[float]:
    """Per-window PPL delta % of ``name`` vs ``base``: ``100 * (PPL / PPL_base - 1)``, each
    window against itself (raises if a window's two results are not from the same start)."""
    out = []
    for w in windows:
        a, b = w[name], w[base]
        if a.start != b.start or a.tokens != b.tokens:
            raise ValueError(
                f"{name} and {base} results are not paired: start {a.start} vs {b.start}, "
                f"tokens {a.tokens} vs {b.tokens}"
            )
        out.append(100.0 * (a.ppl / b.ppl - 1.0))
    return out


def check_targets(summary: dict[str, dict[str, Any]]) -> list[str]:
    """Human-readable verdicts on the issue's targets, from the measured summary."""
    lines = []
    for preset, (min_ratio, max_delta) in TARGETS.items():
        if preset not in summary:
            continue
        s = summary[preset]
        ratio, delta = s["ratio_vs_bf16"], s["delta_vs_fp32"]["mean"]
        ok = ratio >= min_ratio and delta <= max_delta
        lines.append(
            f"{preset}: {ratio:.2f}x (target >= {min_ratio}x), PPL delta {delta:+.2f}% "
            f"(target <= +{max_delta}%): {'MET' if ok else 'MISSED'}"
        )
    for name, s in summary.items():
        base, _, preset = name.partition("+")
        if s.get("baseline") != base or preset not in FP8_TARGETS:
            continue
        delta, limit = s["delta_vs_baseline"], FP8_TARGETS[preset]
        hi = f", CI upper {delta['t_hi']:+.2f}%" if "t_hi" in delta else ""
        lines.append(
            f"{name}: PPL delta vs {base} alone {delta['mean']:+.2f}%{hi} (target <= "
            f"+{limit}%): {'MET' if delta['mean'] <= limit else 'MISSED'}"
        )
    for name, s in summary.items():
        if name in ("fp32",) or "greedy_tf" not in s:
            continue
        tf = s["greedy_tf"]["mean"]
        verdict = "MET" if tf >= MIN_AGREEMENT else "MISSED"
        lines.append(
            f"{name}: teacher-forced greedy agreement {tf:.3f} (target >= {MIN_AGREEMENT}): "
            f"{verdict}"
        )
        if "greedy_tf_vs_base" in s:
            tf = s["greedy_tf_vs_base"]["mean"]
            verdict = "MET" if tf >= MIN_AGREEMENT else "MISSED"
            lines.append(
                f"{name}: teacher-forced greedy agreement with {s['baseline']} {tf:.3f} "
                f"(target >= {MIN_AGREEMENT}): {verdict}"
            )
    return lines


def _fmt_ci(d: dict[str, float] | None, pct: bool = True) -> str:
    if not d:
        return "—"
    unit = "%" if pct else ""
    if "t_lo" not in d:
        return f"{d['mean']:+.2f}{unit}"
    return f"{d['mean']:+.2f}{unit} [{d['t_lo']:+.2f}, {d['t_hi']:+.2f}]"


def _fmt_mean(d: dict[str, float] | None, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f}" if d else "—"


def markdown(
    summary: dict[str, dict[str, Any]],
    meta: dict[str, Any],
    targets: list[str],
    extras: Sequence[tuple[dict[str, Any], dict[str, dict[str, Any]]]] = (),
) -> str:
    """The README table fragment (with the command that produced it above it); ``extras``:
    further ``(meta, summary)`` runs appended as their own tables."""
    cfg = meta["config"]
    working = working_cache_section(summary, cfg)
    device = meta.get("model_device", "cpu")
    source = meta.get("corpus", {}).get("source", "pydoc_data.topics")
    lines = [
        "Measured with:",
        "",
        "```",
        meta["command"],
        "```",
        "",
        *[f"{note}\n" for note in meta.get("notes", [])],
        f"SmolLM2-135M-Instruct in fp32 on `{device}` (no TF32), text {source}; "
        f"{cfg['windows']} windows of {cfg['context']} prefix tokens + {cfg['continuation']} "
        f"scored continuation tokens; {cfg['needles']} needles in ~{cfg['needle_context']}-token "
        f"excerpts; codec output decoded to {cfg['decode_dtype']}. PPL delta: mean over windows "
        "of the per-window relative change, 95% paired Student-t CI in brackets (bootstrap CI "
        f"in {cfg.get('stem', 'quality')}.json). Top-1 (real text): argmax agreement with fp32 "
        "on the continuation. "
        f"Greedy over {cfg['generate']} tokens after the document: teacher-forced on the fp32 "
        "greedy tokens (TF), and free-running (position-wise agreement; first divergence = "
        f"mean tokens before the first differing one; first {cfg['free_running_windows']} "
        "windows). Bytes: sum of `PackedKV.nbytes` over layers vs the same K/V in bf16.",
        "",
        *markdown_table(summary),
        "",
        "Targets (issues 3 and 10):" if working else "Targets (issue 3):",
        "",
        *[f"- {t}" for t in targets],
        "",
        *working,
    ]
    for extra_meta, extra_summary in extras:
        lines += [
            "Further codec settings, same windows and reference (exploration for the aggressive "
            "preset):",
            "",
            "```",
            extra_meta["command"],
            "```",
            "",
            *markdown_table(extra_summary),
            "",
        ]
    return "\n".join(lines)


def markdown_table(summary: dict[str, dict[str, Any]]) -> list[str]:
    """Rows of the per-variant markdown table."""
    lines = [
        "| variant | bytes vs bf16 | PPL | ΔPPL vs fp32 | ΔPPL vs bf16 | top-1 (real text) "
        "| greedy TF | greedy free | first divergence | needles (exact) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in summary.items():
        acc = (
            f"{s['retrieval_acc'] * s['retrieval_n']:.0f}/{s['retrieval_n']}"
            if "retrieval_acc" in s
            else "—"
        )
        lines.append(
            f"| {name} | {s['ratio_vs_bf16']:.2f}x | {s['ppl_mean']:.3f} "
            f"| {_fmt_ci(s.get('delta_vs_fp32'))} | {_fmt_ci(s.get('delta_vs_bf16'))} "
            f"| {_fmt_mean(s.get('top1_real'))} | {_fmt_mean(s.get('greedy_tf'))} "
            f"| {_fmt_mean(s.get('greedy_free'))} | {_fmt_mean(s.get('first_div'), 1)} "
            f"| {acc} |"
        )
    return lines


def working_cache_section(summary: dict[str, dict[str, Any]], cfg: dict[str, Any]) -> list[str]:
    """The fp8 working-cache table (issue 10), or nothing when no variant has a working cache."""
    rows = {name: s for name, s in summary.items() if "working_cache" in s}
    if not rows:
        return []
    lines = [
        "fp8 working cache (issue 10), same windows: the document is prefilled into the fp8 "
        f"cache (scales: {cfg.get('kv_scales', 'unit')}); `fp8 + preset` stores the "
        "dequantized fp8 prefix with the codec, decodes it and writes it into fp8 again; the "
        "continuation runs on the fp8 cache. ΔPPL vs baseline: paired per-window delta vs "
        "the fp8 cache alone, 95% Student-t CI; agreements vs baseline use the fp8 cache "
        "alone's argmax and its own greedy tokens.",
        "",
        "| variant | baseline | bytes vs bf16 | PPL | ΔPPL vs fp32 | ΔPPL vs baseline "
        "| top-1 vs fp32 | top-1 vs baseline | greedy TF vs fp32 | greedy TF vs baseline "
        "| needles (exact) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in rows.items():
        acc = (
            f"{s['retrieval_acc'] * s['retrieval_n']:.0f}/{s['retrieval_n']}"
            if "retrieval_acc" in s
            else "—"
        )
        lines.append(
            f"| {name} | {s.get('baseline', 'fp32')} | {s['ratio_vs_bf16']:.2f}x "
            f"| {s['ppl_mean']:.3f} | {_fmt_ci(s.get('delta_vs_fp32'))} "
            f"| {_fmt_ci(s.get('delta_vs_baseline'))} | {_fmt_mean(s.get('top1_real'))} "
            f"| {_fmt_mean(s.get('top1_vs_base'))} | {_fmt_mean(s.get('greedy_tf'))} "
            f"| {_fmt_mean(s.get('greedy_tf_vs_base'))} | {acc} |"
        )
    return [*lines, ""]


def write_outputs(
    out_dir: Path,
    meta: dict[str, Any],
    summary: dict[str, dict[str, Any]],
    windows: Sequence[dict[str, WindowResult]],
    needles: Sequence[dict[str, Any]],
    stem: str = "quality",
) -> None:
    """``<stem>.json`` (all), ``<stem>.csv`` (one row per variant), ``<stem>.md`` (README
    table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = check_targets(summary)
    doc = {
        **meta,
        "summary": summary,
        "targets": targets,
        "windows": [{k: window_dict(v) for k, v in w.items()} for w in windows],
        "needles": list(needles),
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_tables(out_dir, meta, summary, stem=stem)


def write_tables(
    out_dir: Path,
    meta: dict[str, Any],
    summary: dict[str, dict[str, Any]],
    extras: Sequence[tuple[dict[str, Any], dict[str, dict[str, Any]]]] = (),
    stem: str = "quality",
) -> None:
    """``<stem>.csv`` (one row per variant) and ``<stem>.md`` (README table) from the summary;
    ``extras`` (further runs) only add tables to the markdown."""
    targets = check_targets(summary)
    cols = [
        "variant",
        "nbytes",
        "bf16_nbytes",
        "ratio_vs_bf16",
        "ppl_mean",
        "ppl_corpus",
        "delta_vs_fp32",
        "delta_vs_fp32_t_lo",
        "delta_vs_fp32_t_hi",
        "delta_vs_fp32_boot_lo",
        "delta_vs_fp32_boot_hi",
        "delta_vs_bf16",
        "delta_vs_bf16_t_lo",
        "delta_vs_bf16_t_hi",
        "top1_real",
        "greedy_tf",
        "greedy_free",
        "first_div",
        "retrieval_acc",
        "retrieval_n",
    ]
    if any("working_cache" in s for s in summary.values()):
        cols += [
            "working_cache",
            "baseline",
            "delta_vs_baseline",
            "delta_vs_baseline_t_lo",
            "delta_vs_baseline_t_hi",
            "delta_vs_baseline_boot_lo",
            "delta_vs_baseline_boot_hi",
            "top1_vs_base",
            "greedy_tf_vs_base",
        ]
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for name, s in summary.items():
            row: list[Any] = [name]
            for c in cols[1:]:
                base, _, part = c.partition("_t_") if "_t_" in c else c.partition("_boot_")
                if c in s and not isinstance(s[c], dict):
                    row.append(s[c])
                elif c in s:
                    row.append(s[c]["mean"])
                elif part and base in s:
                    row.append(s[base].get(("t_" if "_t_" in c else "boot_") + part, ""))
                else:
                    row.append("")
            w.writerow(row)
    (out_dir / f"{stem}.md").write_text(markdown(summary, meta, targets, extras))


# --- command line -----------------------------------------------------------------------------


def parse_custom_config(text: str) -> tuple[str, CodecConfig]:
    """``--config`` value: a JSON object (or ``@file.json``) with a ``"name"`` key plus
    :class:`CodecConfig` fields (optionally ``"preset"`` to start from)."""
    raw = Path(text[1:]).read_text() if text.startswith("@") else text
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SystemExit(
            f"--config {text!r} is not valid JSON ({e}); e.g. "
            '\'{"name": "k4v3", "key_bits": 4, "key_mode": "rotated"}\''
        ) from e
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise SystemExit(f'--config {text!r} needs a JSON object with a "name" string')
    name = data.pop("name")
    return name, CodecConfig.from_dict(data)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="*", default=sorted(PRESETS), help="codec presets")
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="JSON",
        help='extra codec config as JSON (or @file): {"name": ..., <CodecConfig fields>}',
    )
    p.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="a layer-wise codec profile (polykv-vllm calibrate) as variant NAME; evaluation "
        "windows never overlap its calibration windows (asserted)",
    )
    p.add_argument(
        "--corpus",
        choices=["pydoc", "licenses"],
        default="pydoc",
        help="pydoc: Python's pydoc_data.topics; licenses: /usr/share/common-licenses",
    )
    p.add_argument("--windows", type=int, default=50, help="number of PPL windows")
    p.add_argument("--context", type=int, default=2048, help="document prefix tokens")
    p.add_argument("--continuation", type=int, default=256, help="scored continuation tokens")
    p.add_argument("--generate", type=int, default=64, help="greedy tokens per window (0: off)")
    p.add_argument(
        "--free-running-windows",
        type=int,
        default=None,
        help="free-running greedy on the first N windows (default: all)",
    )
    p.add_argument("--needles", type=int, default=20, help="needle retrieval questions (0: off)")
    p.add_argument("--needle-context", type=int, default=2048, help="tokens of pydoc per needle")
    p.add_argument("--answer-tokens", type=int, default=24, help="max answer tokens per needle")
    p.add_argument(
        "--decode-dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="dtype the codec decodes to (vLLM keeps bf16), then cast to fp32 for the model",
    )
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 round-trip baseline")
    p.add_argument(
        "--cache-dtype",
        nargs="+",
        default=[],
        choices=sorted(FP8_CACHE_DTYPES),
        help="also measure these fp8 working caches (vLLM --kv-cache-dtype names): the cache "
        "alone and '<dtype>+<preset>' for every codec, compared with the cache alone",
    )
    p.add_argument(
        "--kv-scales",
        choices=SCALE_MODES,
        default="unit",
        help="fp8 k_scale/v_scale: unit (vLLM's default 1.0) or calculated (vLLM's "
        "calculate_kv_scales: per layer amax / constant on the document's prefill)",
    )
    p.add_argument("--k-scale-constant", type=float, default=200.0, help="vLLM K_SCALE_CONSTANT")
    p.add_argument("--v-scale-constant", type=float, default=100.0, help="vLLM V_SCALE_CONSTANT")
    p.add_argument(
        "--no-fp32-codecs",
        action="store_true",
        help="skip the codec variants on the plain fp32 cache (keep them only behind fp8)",
    )
    p.add_argument("--stem", default="quality", help="output file names: <stem>.json/.csv/.md")
    p.add_argument(
        "--first-windows",
        type=int,
        default=None,
        help="measure only the first K of the chosen windows (cross-checks on slow machines)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="S",
        help="stop starting new windows after S seconds and report the windows measured so far "
        "(recorded in the JSON; for a shared, slow CPU)",
    )
    p.add_argument("--note", action="append", default=[], help="a line for quality.md")
    p.add_argument(
        "--rerender",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="only rewrite quality.csv/.md under --out from this quality.json (+ --note lines); "
        "further JSONs add their tables to quality.md",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 wastes least on a shared, oversubscribed CPU)",
    )
    p.add_argument("--device", default="cpu", help="torch device of the model (fp32 throughout)")
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="HF folder of the model (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--corpus-file",
        type=Path,
        default=None,
        help="read the text from this file instead of this Python's pydoc_data.topics",
    )
    p.add_argument(
        "--dump-corpus",
        type=Path,
        default=None,
        help="write this Python's pydoc_data.topics text to this file and exit",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output dir")
    return p


def load_model(model_dir: Path | None, device: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in fp32, eval mode, on ``device``: the embedded SmolLM2 model, or
    the HF folder ``model_dir``."""
    if model_dir is None:
        from polykv_vllm.embedded import load_embedded_model

        return load_embedded_model(device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(model_dir)


def _versions() -> dict[str, str]:
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    core = Path(__file__).resolve().parent.parent / "polykv_vllm" / "core"
    digest = hashlib.sha256()
    for src in sorted(core.glob("*.py")):
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": commit,
        # The working tree may hold uncommitted codec changes: this names the code that ran.
        "codec_sources_sha256": digest.hexdigest(),
        "platform": platform.platform(),
    }


def build_variants(
    args: argparse.Namespace,
    configs: dict[str, CodecConfig],
    num_layers: int,
    decode_dtype: torch.dtype,
    profiles: dict[str, KVCodec] | None = None,
) -> list[Variant]:
    """bf16 (unless ``--no-bf16``), every codec on the fp32 cache (unless ``--no-fp32-codecs``),
    then per ``--cache-dtype``: the fp8 cache alone and ``<dtype>+<codec>`` behind it.
    ``profiles``: layer-wise profile codecs, after the presets."""
    codecs = {name: KVCodec(config=cfg, num_layers=num_layers) for name, cfg in configs.items()}
    described: dict[str, dict[str, Any]] = {n: dataclasses.asdict(c) for n, c in configs.items()}
    for name, codec in (profiles or {}).items():
        assert codec.profile is not None
        codecs[name] = codec
        described[name] = {
            "profile": codec.profile.source,
            "digest": codec.profile.digest,
            "layers": [s.label for s in codec.profile.layers],
        }
    variants = [] if args.no_bf16 else [Variant("bf16", cast_roundtrip(torch.bfloat16))]
    if not args.no_fp32_codecs:
        variants += [
            Variant(name, codec_roundtrip(codec, decode_dtype), described[name])
            for name, codec in codecs.items()
        ]
    for dtype in args.cache_dtype:
        spec = Fp8Spec(dtype, args.kv_scales, args.k_scale_constant, args.v_scale_constant)
        variants.append(Variant(dtype, fp8_store_roundtrip(dtype), working=spec))
        variants += [
            Variant(
                f"{dtype}+{name}",
                codec_roundtrip(codec, decode_dtype),
                described[name],
                working=spec,
                baseline=dtype,
            )
            for name, codec in codecs.items()
        ]
    return variants


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    decode_dtype = getattr(torch, args.decode_dtype)

    if args.rerender is not None:
        main_json, *extra_jsons = args.rerender
        doc = json.loads(main_json.read_text())
        doc["notes"] = [n for n in doc.get("notes", []) if n not in args.note] + args.note
        args.out.mkdir(parents=True, exist_ok=True)
        if main_json.resolve() != (args.out / f"{args.stem}.json").resolve():
            (args.out / f"{args.stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
        extras = [json.loads(p.read_text()) for p in extra_jsons]
        write_tables(
            args.out, doc, doc["summary"], [(e, e["summary"]) for e in extras], stem=args.stem
        )
        return 0
    if args.dump_corpus is not None:
        args.dump_corpus.write_text(corpus_text(), encoding="utf-8")
        return 0
    # fp32 everywhere: no TF32 on GPUs either.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, tokenizer = load_model(args.model_dir, args.device)
    num_layers = model.config.num_hidden_layers

    configs: dict[str, CodecConfig] = {}
    for name in args.presets:
        if name not in PRESETS:
            raise SystemExit(f"--presets: unknown preset {name!r}; allowed: {sorted(PRESETS)}")
        configs[name] = PRESETS[name]
    for text in args.config:
        name, cfg = parse_custom_config(text)
        if name in configs or name in ("fp32", "bf16", *FP8_CACHE_DTYPES) or "+" in name:
            raise SystemExit(f"--config name {name!r} is taken or has a '+'; choose another")
        configs[name] = cfg
    profiles: dict[str, KVCodec] = {}
    for text in args.profile:
        name, sep, path = text.partition("=")
        if not sep or not name or name in configs or name in profiles or "+" in name:
            raise SystemExit(f"--profile {text!r}: use NAME=FILE with a new NAME (no '+')")
        profiles[name] = KVCodec(profile=path, num_layers=num_layers)
    variants = build_variants(args, configs, num_layers, decode_dtype, profiles)
    roles = {
        v.name: {"working_cache": v.working.cache_dtype}
        | ({"baseline": v.baseline} if v.baseline else {})
        for v in variants
        if v.working is not None
    }

    text = corpus_text(args.corpus_file, args.corpus)
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    length = args.context + args.continuation + 1
    calibration = calibration_spans(profiles, text)
    usable = min([len(tokens), *(a for a, _ in calibration)])
    starts = choose_windows(usable, args.windows, length, args.seed)
    if args.first_windows is not None:
        starts = starts[: args.first_windows]
    overlap = max(
        0, length - min((b - a for a, b in zip(starts, starts[1:], strict=False)), default=length)
    )
    logger.info(
        "corpus %s tokens, %s windows of %s (overlap %s)", len(tokens), len(starts), length, overlap
    )
    assert_disjoint([(s, s + length) for s in starts], calibration)
    free_n = args.windows if args.free_running_windows is None else args.free_running_windows

    t0 = time.time()
    windows = []
    for i, s in enumerate(starts):
        if args.time_budget is not None and time.time() - t0 > args.time_budget:
            logger.warning(
                "--time-budget %.0fs spent: stopping after %s of %s windows",
                args.time_budget,
                i,
                len(starts),
            )
            starts = starts[:i]
            break
        res = measure_window(
            model, variants, tokens[s : s + length], args.context, args.generate, i < free_n, s
        )
        windows.append(res)
        logger.info(
            "window %s/%s @%s: %s (%.0fs)",
            i + 1,
            len(starts),
            s,
            " ".join(f"{k}={v.ppl:.3f}" for k, v in res.items()),
            time.time() - t0,
        )

    needles_out: list[dict[str, Any]] = []
    rng = random.Random(args.seed + 1)
    for j, needle in enumerate(make_needles(args.needles, args.seed)):
        start = rng.randrange(0, usable - args.needle_context)
        assert_disjoint([(start, start + args.needle_context)], calibration)
        document = excerpt(tokenizer, tokens, start, args.needle_context)
        answers = measure_needle(model, tokenizer, variants, document, needle, args.answer_tokens)
        needles_out.append({"needle": dataclasses.asdict(needle), "start": start, **answers})
        logger.info(
            "needle %s/%s depth %.2f code %s: %s",
            j + 1,
            args.needles,
            needle.depth,
            needle.answer,
            " ".join(f"{k}={v['answer']!r}" for k, v in answers.items()),
        )

    names = ["fp32"] + [v.name for v in variants]
    summary = summarize(names, windows, needles_out, args.seed, roles)
    meta = {
        "notes": args.note,
        "command": "python "
        + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(time.time() - t0, 1),
        "python": platform.python_version(),
        "versions": _versions(),
        "model": "SmolLM2-135M-Instruct (embedded, fp32, CPU)",
        "model_device": str(model.device),
        "corpus": {
            "source": (
                f"license texts of {LICENSES_DIR} (each file once)"
                if args.corpus == "licenses" and not args.corpus_file
                else "pydoc_data.topics of Python "
                + ("3.11 (saved, --corpus-file)" if args.corpus_file else platform.python_version())
            ),
            "chars": len(text),
            "tokens": len(tokens),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "calibration_windows_excluded": calibration,
            "usable_tokens": usable,
        },
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "free_running_windows": free_n,
            "window_starts": starts,
            "window_overlap_tokens": overlap,
            "codecs": {v.name: v.config for v in variants if v.config},
            "working_caches": {
                v.name: dataclasses.asdict(v.working) for v in variants if v.working is not None
            },
            "ci": "95% paired Student-t interval over windows (t_lo/t_hi) and percentile "
            "bootstrap with 10000 seeded resamples (boot_lo/boot_hi)",
            "greedy": "teacher-forced on the fp32 greedy tokens (greedy_tf) and free-running "
            "position-wise agreement (greedy_free, first_div)",
        },
    }
    write_outputs(args.out, meta, summary, windows, needles_out, stem=args.stem)
    for line in check_targets(summary):
        logger.info("%s", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
