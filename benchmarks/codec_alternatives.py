"""Key/value quantization alternatives measured on real SmolLM2-135M K/V (or synthetic data).

What it measures, per scheme, over every layer of one forward pass over ``pydoc_data.topics`` text
(keys are post-RoPE, as a KV cache holds them; queries are the model's real queries):

- ``rel_mse``: sum ||x - x'||^2 / sum ||x||^2 over all (token, head) vectors;
- ``logit_rmse``: RMS of (q.k - q.k')/sqrt(D) over causal (query, key) pairs, in logit units
  (nats), and ``logit_rel`` = that / RMS of the logits;
- ``attn_rel``: ||o - o'|| / ||o|| of the causal attention output when only that tensor is
  quantized (keys, or values) or both (``combos``);
- ``bytes_per_token_head``: from the tensors each scheme actually produces (``nbytes``);
- ``ppl``: perplexity of the model on the text with every layer's K/V passed through a preset
  (fake quantization inside attention) — a proxy for reading a compressed prefix.

It also reports each preset's measured bytes per token per head and ratio vs bf16 at D = 64 and
D = 128, averaged over a 30-layer model. Without the embedded model (``--synthetic``) keys are
Gaussian with outlier channels and queries Gaussian; say so when quoting the numbers.

Usage: ``python benchmarks/codec_alternatives.py [--tokens 2048] [--ppl-tokens 1024]``
writes ``benchmarks/results/codec_alternatives.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from polykv_vllm.core import PRESETS, CodecConfig, KVCodec
from polykv_vllm.core.hadamard import random_signs, rotate, unrotate
from polykv_vllm.core.quantizers import int8_decode, int8_encode

logger = logging.getLogger("codec_alternatives")

Layer = dict[str, torch.Tensor]  # q [Hq, T, D], k [Hkv, T, D], v [Hkv, T, D]
Scheme = Callable[[torch.Tensor], tuple[torch.Tensor, int]]  # x [T, H, D] -> (x', nbytes)
# (k, v [T, H, D], layer) -> (k', v'): fake quantization inside the model's attention
Quant = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


# --- data -----------------------------------------------------------------------------------


def real_layers(tokens: int) -> tuple[list[Layer], Any, Any, torch.Tensor]:
    """Run SmolLM2 over ``tokens`` tokens of pydoc_data.topics; capture q, k, v per layer."""
    from pydoc_data.topics import topics

    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from polykv_vllm.embedded import load_embedded_model

    model, tok = load_embedded_model()
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok(text, return_tensors="pt").input_ids[:, : max(tokens, 1)]
    captured: dict[int, Layer] = {}
    state: dict[str, Any] = {"quant": None, "capture": False}

    def attention(module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a: Any,
                  **kw: Any) -> Any:  # fmt: skip
        layer = module.layer_idx
        if state["capture"]:
            captured[layer] = {"q": q[0].detach(), "k": k[0].detach(), "v": v[0].detach()}
        quant = state["quant"]
        if quant is not None:
            k2, v2 = quant(k[0].transpose(0, 1), v[0].transpose(0, 1), layer)
            k, v = k2.transpose(0, 1)[None].to(k.dtype), v2.transpose(0, 1)[None].to(v.dtype)
        return sdpa_attention_forward(module, q, k, v, *a, **kw)

    AttentionInterface.register("polykv_bench", attention)
    AttentionMaskInterface.register("polykv_bench", sdpa_mask)
    model.set_attn_implementation("polykv_bench")
    state["capture"] = True
    with torch.no_grad():
        model(ids)
    state["capture"] = False
    layers = [add_reference(captured[i]) for i in sorted(captured)]

    def ppl(quant: Quant | None, n: int) -> float:
        state["quant"] = quant
        try:
            with torch.no_grad():
                out = model(ids[:, :n], labels=ids[:, :n])
        finally:
            state["quant"] = None
        return math.exp(float(out.loss))

    return layers, ppl, model.config, ids


def synthetic_layers(tokens: int, dim: int, layers: int, seed: int) -> list[Layer]:
    """Gaussian q/k/v; keys get 4 outlier channels (x15) and a per-channel offset, like RoPE'd
    keys of real models."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        k = torch.randn(3, tokens, dim, generator=gen)
        chans = torch.randperm(dim, generator=gen)[:4]
        k[..., chans] *= 15.0
        k += torch.randn(3, 1, dim, generator=gen) * 2.0
        q = torch.randn(9, tokens, dim, generator=gen)
        v = torch.randn(3, tokens, dim, generator=gen)
        out.append(add_reference({"q": q, "k": k, "v": v}))
    return out


# --- key schemes ----------------------------------------------------------------------------


def int8_token(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    codes, scale = int8_encode(x)
    return int8_decode(codes, scale), codes.nbytes + scale.nbytes


def int8_channel(block: int) -> Scheme:
    """Symmetric int8 with one fp16 scale per (block of ``block`` tokens, head, channel)."""

    def scheme(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        t, h, d = x.shape
        nb = -(-t // block)
        xp = F.pad(x.float(), (0, 0, 0, 0, 0, nb * block - t)).reshape(nb, block, h, d)
        scale = (xp.abs().amax(dim=1, keepdim=True) / 127).to(torch.float16)
        s = scale.float()
        safe = torch.where(s > 0, s, torch.ones_like(s))
        codes = torch.where(s > 0, (xp / safe).round().clamp(-127, 127), 0).to(torch.int8)
        out = (codes.float() * s).reshape(nb * block, h, d)[:t]
        return out, t * h * d + scale.nbytes

    return scheme


def int8_rotated(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Random-sign Hadamard rotation, then int8 per (token, head); decode rotates back."""
    signs = random_signs(x.shape[-1], seed=1)
    codes, scale = int8_encode(rotate(x.float(), signs))
    return unrotate(int8_decode(codes, scale), signs), codes.nbytes + scale.nbytes


def codec_keys(key_bits: int) -> Scheme:
    cfg = CodecConfig(key_bits=key_bits, key_mode="rotated", value_bits=2)
    codec = KVCodec(config=cfg)

    def scheme(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        p = codec.encode(x, x)
        return codec.decode(p, dtype=torch.float32)[0], p.k_codes.nbytes + p.k_scale.nbytes

    return scheme


def codec_values(value_bits: int, norm_correction: bool) -> Scheme:
    codec = KVCodec(config=CodecConfig(value_bits=value_bits, norm_correction=norm_correction))

    def scheme(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        p = codec.encode(x, x)
        return codec.decode(p, dtype=torch.float32)[1], p.v_codes.nbytes + p.v_norm.nbytes

    return scheme


# --- metrics --------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]


def add_reference(layer: Layer) -> Layer:
    """Add the unquantized causal attention output ``o`` [Hq, T, D] (float32)."""
    layer = {name: t.float() for name, t in layer.items()}
    layer["o"] = attention(layer["q"], layer["k"], layer["v"])
    return layer


LOGIT_QUERIES = 256


def logit_error(q: torch.Tensor, k: torch.Tensor, k2: torch.Tensor) -> tuple[float, float, int]:
    """(sum of squared logit errors, sum of squared logits, pairs) over the causal pairs of
    the last ``LOGIT_QUERIES`` queries (all their keys)."""
    rep = q.shape[0] // k.shape[0]
    d = q.shape[-1]
    t = q.shape[1]
    first = max(t - LOGIT_QUERIES, 0)
    q = q[:, first:]
    k, k2 = k.repeat_interleave(rep, 0), k2.repeat_interleave(rep, 0)
    mask = torch.ones(t, t, dtype=torch.bool).tril()[first:]
    lg = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    err = (q @ (k2 - k).transpose(-1, -2)) / math.sqrt(d)
    pairs = int(mask.sum()) * q.shape[0]
    return float((err**2)[:, mask].sum()), float((lg**2)[:, mask].sum()), pairs


def measure(layers: list[Layer], schemes: dict[str, Scheme], which: str) -> dict[str, Any]:
    """Quantize ``which`` ('k' or 'v') of every layer with each scheme; aggregate metrics."""
    results = {}
    for name, scheme in schemes.items():
        se = ref = lse = lref = aerr = aref = 0.0
        nbytes = vectors = pairs = 0
        for lay in layers:
            x = lay[which].transpose(0, 1).float()  # [T, H, D]
            x2, nb = scheme(x)
            nbytes += nb
            vectors += x.shape[0] * x.shape[1]
            se += float(((x - x2) ** 2).sum())
            ref += float((x**2).sum())
            x2h = x2.transpose(0, 1)
            k2 = x2h if which == "k" else lay["k"]
            v2 = x2h if which == "v" else lay["v"]
            o = lay["o"]
            o2 = attention(lay["q"], k2, v2)
            aerr += float(((o - o2) ** 2).sum())
            aref += float((o**2).sum())
            if which == "k":
                a, b, n = logit_error(lay["q"], lay["k"], k2)
                lse += a
                lref += b
                pairs += n
        r: dict[str, Any] = {
            "bytes_per_token_head": nbytes / vectors,
            "rel_mse": se / ref,
            "attn_rel": math.sqrt(aerr / aref),
        }
        if which == "k":
            r["logit_rmse"] = math.sqrt(lse / pairs)
            r["logit_rel"] = math.sqrt(lse / lref)
        results[name] = r
        logger.info("%s %s: %s", which, name, r)
    return results


def measure_combos(layers: list[Layer], combos: dict[str, CodecConfig]) -> dict[str, Any]:
    """Attention output error with keys and values both through the codec (one config)."""
    out = {}
    for name, cfg in combos.items():
        codec = KVCodec(config=cfg.replace(keep_layers=()))
        aerr = aref = 0.0
        for lay in layers:
            p = codec.encode(lay["k"].transpose(0, 1), lay["v"].transpose(0, 1))
            k2, v2 = codec.decode(p, dtype=torch.float32)
            o = lay["o"]
            o2 = attention(lay["q"], k2.transpose(0, 1), v2.transpose(0, 1))
            aerr += float(((o - o2) ** 2).sum())
            aref += float((o**2).sum())
        bph = codec.encode(lay["k"].transpose(0, 1), lay["v"].transpose(0, 1)).nbytes
        out[name] = {
            "attn_rel": math.sqrt(aerr / aref),
            "bytes_per_token_head": bph / (lay["k"].shape[0] * lay["k"].shape[1]),
        }
        logger.info("combo %s: %s", name, out[name])
    return out


def preset_bytes(num_layers: int = 30) -> dict[str, Any]:
    """Bytes per token per head from ``packed.nbytes``, averaged over ``num_layers`` layers."""
    out: dict[str, Any] = {}
    for name in sorted(PRESETS):
        codec = KVCodec(name, num_layers=num_layers)
        for dim in (64, 128):
            k = torch.randn(16, 2, dim)
            per_layer = [codec.encode(k, k, layer).nbytes / 32 for layer in range(num_layers)]
            avg = sum(per_layer) / num_layers
            out[f"{name}/D{dim}"] = {
                "bytes_per_token_head_avg": avg,
                "bytes_per_token_head_layers": sorted(set(per_layer)),
                "bf16_bytes": 4 * dim,
                "ratio_vs_bf16": 4 * dim / avg,
            }
    return out


COMBOS = {
    "K8V3 (polykv)": CodecConfig(),
    "K8V2": CodecConfig(value_bits=2),
    "K4V3": CodecConfig(key_bits=4, key_mode="rotated", value_bits=3),
    "K4V2": CodecConfig(key_bits=4, key_mode="rotated", value_bits=2),
    "K3V3": CodecConfig(key_bits=3, key_mode="rotated", value_bits=3),
    "K3V2": CodecConfig(key_bits=3, key_mode="rotated", value_bits=2),
}


def codec_quant(codec: KVCodec) -> Quant:
    def quant(k: torch.Tensor, v: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return codec.decode(codec.encode(k, v, layer), dtype=torch.float32)

    return quant


def hadamard_int8_keys(codec: KVCodec) -> Quant:
    """Values through ``codec``; keys Hadamard-rotated then int8 per (token, head)."""

    def quant(k: torch.Tensor, v: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, v2 = codec.decode(codec.encode(k, v, layer), dtype=torch.float32)
        return int8_rotated(k.float())[0], v2

    return quant


def ppl_variants(num_layers: int) -> dict[str, Quant]:
    lite = PRESETS["polykv-lite"]
    out: dict[str, Quant] = {
        "polykv (K8 int8, V3)": codec_quant(KVCodec("polykv")),
        "polykv with Hadamard+int8 keys": hadamard_int8_keys(KVCodec("polykv")),
        "polykv-lite": codec_quant(KVCodec("polykv-lite", num_layers=num_layers)),
    }
    for cname, cfg in COMBOS.items():
        if cfg.key_bits == 8 and cfg.value_bits == 3:
            continue
        out[cname + " all layers"] = codec_quant(KVCodec(config=cfg))
        kept = cfg.replace(keep_layers=(0, -1))
        out[cname + " keep first/last K8V3"] = codec_quant(
            KVCodec(config=kept, num_layers=num_layers)
        )
    out["K4V2 keep 0,1,last"] = codec_quant(
        KVCodec(config=COMBOS["K4V2"].replace(keep_layers=(0, 1, -1)), num_layers=num_layers)
    )
    out["K4V2 without norm correction, keep first/last"] = codec_quant(
        KVCodec(config=lite.replace(norm_correction=False), num_layers=num_layers)
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of text for the K/V dump")
    ap.add_argument(
        "--ppl-tokens", type=int, default=1024, help="tokens for the PPL check (0: skip)"
    )
    ap.add_argument("--synthetic", action="store_true", help="skip the model, use synthetic data")
    ap.add_argument("--dims", type=int, nargs="+", default=[128], help="synthetic head dims")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/codec_alternatives.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    t0 = time.time()
    key_schemes: dict[str, Scheme] = {
        "int8 per (token, head)": int8_token,
        "int8 per channel, 16-token blocks": int8_channel(16),
        "int8 per channel, 128-token blocks": int8_channel(128),
        "hadamard + int8 per (token, head)": int8_rotated,
        "rotated Lloyd-Max 4-bit": codec_keys(4),
        "rotated Lloyd-Max 3-bit": codec_keys(3),
        "rotated Lloyd-Max 2-bit": codec_keys(2),
    }
    value_schemes: dict[str, Scheme] = {
        f"rotated Lloyd-Max {b}-bit{' + norm correction' if nc else ''}": codec_values(b, nc)
        for b in (2, 3, 4)
        for nc in (False, True)
    }
    datasets: dict[str, Any] = {}
    if not args.synthetic:
        layers, ppl, config, _ = real_layers(args.tokens)
        name = f"SmolLM2-135M-Instruct pydoc_data.topics, {layers[0]['k'].shape[1]} tokens, D=64"
        entry: dict[str, Any] = {
            "keys": measure(layers, key_schemes, "k"),
            "values": measure(layers, value_schemes, "v"),
            "combos_all_layers_no_keep": measure_combos(layers, COMBOS),
        }
        if args.ppl_tokens:
            n = config.num_hidden_layers
            pp: dict[str, float] = {"fp32 baseline (no quantization)": ppl(None, args.ppl_tokens)}
            for cname, quant in ppl_variants(n).items():
                pp[cname] = ppl(quant, args.ppl_tokens)
                logger.info("ppl %s: %.4f", cname, pp[cname])
            entry["ppl"] = {"tokens": args.ppl_tokens, "values": pp}
        datasets[name] = entry
    for dim in args.dims:
        layers = synthetic_layers(min(args.tokens, 1024), dim, 4, args.seed)
        datasets[f"synthetic Gaussian + 4 outlier channels x15, D={dim}"] = {
            "keys": measure(layers, key_schemes, "k"),
            "values": measure(layers, value_schemes, "v"),
            "combos_all_layers_no_keep": measure_combos(layers, COMBOS),
        }
    result = {
        "command": " ".join(["python", *sys.argv]),
        "config": {k: str(v) for k, v in vars(args).items()},
        "host": {"torch": torch.__version__, "machine": platform.machine()},
        "seconds": round(time.time() - t0, 1),
        "presets": preset_bytes(),
        "datasets": datasets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s in %.1f s", args.out, time.time() - t0)


if __name__ == "__main__":
    main()
