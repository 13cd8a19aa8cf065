"""``polykv-vllm calibrate MODEL --target-ratio R --out PROFILE.json [--corpus FILE]``.

Measures every layer's key and value sensitivity to every codec setting on real text
(:mod:`.measure`), picks one setting per layer minimising the summed measured loss under the
byte budget of ``R`` (:func:`.allocate.allocate_knapsack`, exact; the greedy allocation is
computed too and both are measured as whole profiles on the calibration windows), and writes a
:class:`~polykv_vllm.core.CodecProfile`. Several ratios share one measurement:
``--target-ratio 3 4 5 --out 'profile_{ratio}.json'``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from polykv_vllm.calibrate.allocate import (
    Choice,
    allocate_greedy,
    allocate_knapsack,
    check_target,
)
from polykv_vllm.calibrate.measure import (
    KEY_SETTINGS,
    VALUE_SETTINGS,
    Sensitivity,
    calibration_windows,
    default_corpus,
    measure_profile_loss,
    measure_sensitivity,
    model_fingerprint,
    prefill_windows,
    text_digest,
)
from polykv_vllm.core import CodecProfile, LayerSetting, ModelFingerprint, ProfileError

__all__ = ["build_parser", "calibrate", "choices", "main"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="polykv-vllm calibrate",
        description="Make a layer-wise codec profile for MODEL under a byte budget.",
    )
    p.add_argument("model", help="HF model id or folder ('embedded': the bundled SmolLM2-135M)")
    p.add_argument(
        "--target-ratio",
        type=float,
        nargs="+",
        required=True,
        metavar="R",
        help="compression vs bf16 in real bytes (scales and norms included); several ratios "
        "share one measurement and need '{ratio}' in --out",
    )
    p.add_argument("--out", required=True, help="profile JSON to write (may hold '{ratio}')")
    p.add_argument(
        "--corpus", type=Path, default=None, help="UTF-8 text file (default: pydoc_data.topics)"
    )
    p.add_argument("--windows", type=int, default=2, help="calibration windows (batched)")
    p.add_argument("--context", type=int, default=1024, help="document tokens per window")
    p.add_argument("--scored", type=int, default=64, help="scored tokens after the document")
    p.add_argument("--seed", type=int, default=0, help="codec seed (sign vectors)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device of the model (fp32)")
    return p


def choices(sens: Sensitivity, head_dim: int, seed: int) -> list[list[Choice]]:
    """Every (key, value, norm correction) setting of every layer with its bytes and the
    predicted loss (key loss + value loss)."""
    out = []
    for layer in range(len(sens.keys)):
        row = []
        for kb in sorted({b for b, _ in KEY_SETTINGS}):
            for vb in sorted({b for b, _ in VALUE_SETTINGS}):
                for nc in (False, True):
                    s = LayerSetting(kb, vb, nc)
                    row.append(
                        Choice(s, s.bytes_per_token_head(head_dim, seed), sens.layer_loss(layer, s))
                    )
        out.append(row)
    return out


def calibrate(
    model: Any,
    tokenizer: Any,
    ratios: Sequence[float],
    *,
    corpus: tuple[str, str] | None = None,
    windows: int = 2,
    context: int = 1024,
    scored: int = 64,
    seed: int = 0,
    fingerprint: ModelFingerprint | None = None,
) -> dict[float, CodecProfile]:
    """One profile per ratio in ``ratios`` (see the module docstring). Raises
    :class:`ProfileError` for an unreachable ratio or a corpus too short for the windows."""
    fp = fingerprint or model_fingerprint(model)
    corpus_name, text = corpus if corpus is not None else default_corpus()
    bf16 = fp.num_layers * 2 * fp.head_dim * 2
    # the ratios are checked before the (slow) measurement, from the bytes alone
    sizes = choices(_zero(fp.num_layers), fp.head_dim, seed)
    budgets = {r: check_target(r, sizes, bf16) for r in ratios}
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    length = context + scored + 1
    spans = calibration_windows(len(tokens), windows, length, repr(corpus_name))
    logger.info(
        "calibrating %s on %s (%d tokens): %d windows of %d+%d tokens at the end of it",
        fp.describe(),
        corpus_name,
        len(tokens),
        windows,
        context,
        scored,
    )
    ids = [tokens[a:b] for a, b in spans]
    runner = prefill_windows(model, ids, context)
    sens = measure_sensitivity(runner, seed, progress=logger.info)
    table = choices(sens, fp.head_dim, seed)
    profiles = {}
    for ratio, budget in budgets.items():
        t0 = time.time()
        exact = allocate_knapsack(table, budget)
        greedy = allocate_greedy(table, budget)
        measured = {"knapsack": measure_profile_loss(runner, [c.setting for c in exact], seed)}
        same = [c.setting for c in exact] == [c.setting for c in greedy]
        if not same:
            measured["greedy"] = measure_profile_loss(runner, [c.setting for c in greedy], seed)
        predicted = {
            "knapsack": round(sum(c.loss for c in exact), 7),
            "greedy": round(sum(c.loss for c in greedy), 7),
        }
        figures: dict[str, Any] = {
            "target_ratio": ratio,
            "budget_bytes_per_token_head": budget,
            "allocator": "knapsack",
            "loss": "mean KL(fp32 || codec) per scored token, nats; keys and values decoded to "
            "bf16; one layer's stream quantized at a time (predicted = sum) or all at once "
            "(measured)",
            "predicted_kl": predicted,
            "measured_kl": {k: round(v, 7) for k, v in measured.items()},
            "greedy_same_as_knapsack": same,
            "greedy_bytes_per_token_head": sum(c.nbytes for c in greedy),
            "corpus": {
                "name": corpus_name,
                "sha256": text_digest(text),
                "tokens": len(tokens),
                "windows": [list(s) for s in spans],
                "context": context,
                "scored": scored,
            },
            "sensitivity": sens.to_dict(),
        }
        profile = CodecProfile(fp, tuple(c.setting for c in exact), seed, figures)
        logger.info(
            "ratio %.2f: %.3fx real bytes (%d B per token-head over %d layers), predicted KL "
            "%.5f, measured %.5f (greedy: predicted %.5f%s) [%.0fs]; layers %s",
            ratio,
            profile.ratio,
            profile.bytes_per_token_head,
            fp.num_layers,
            predicted["knapsack"],
            measured["knapsack"],
            predicted["greedy"],
            "" if same else f", measured {measured['greedy']:.5f}",
            time.time() - t0,
            " ".join(s.label for s in profile.layers),
        )
        profiles[ratio] = profile
    return profiles


def _zero(layers: int) -> Sensitivity:
    zeros = [dict.fromkeys(KEY_SETTINGS, 0.0) for _ in range(layers)]
    return Sensitivity(zeros, [dict.fromkeys(VALUE_SETTINGS, 0.0) for _ in range(layers)], 0, 0)


def _load(model: str, device: str) -> tuple[Any, Any]:
    if model == "embedded":
        from polykv_vllm.embedded import load_embedded_model

        return load_embedded_model(device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m: Any = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    return m.to(device).eval(), AutoTokenizer.from_pretrained(model)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (2 for bad input, with the error printed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if len(args.target_ratio) > 1 and "{ratio}" not in args.out:
        parser.error(f"--out {args.out!r} needs '{{ratio}}' for several --target-ratio values")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    corpus = None
    if args.corpus is not None:
        try:
            corpus = (str(args.corpus), args.corpus.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"--corpus {str(args.corpus)!r} cannot be read as UTF-8 text: {e}")
    t0 = time.time()
    model, tokenizer = _load(args.model, args.device)
    try:
        profiles = calibrate(
            model,
            tokenizer,
            args.target_ratio,
            corpus=corpus,
            windows=args.windows,
            context=args.context,
            scored=args.scored,
            seed=args.seed,
        )
    except ProfileError as e:
        parser.error(str(e))
    for ratio, profile in profiles.items():
        out = Path(args.out.replace("{ratio}", f"{ratio:g}"))
        out.parent.mkdir(parents=True, exist_ok=True)
        profile.save(out)
        logger.info("wrote %s (%.3fx)", out, profile.ratio)
    logger.info("calibration took %.0fs", time.time() - t0)
    return 0
