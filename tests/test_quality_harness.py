"""The pieces of ``benchmarks/quality.py`` on tiny random Llama models: PPL arithmetic, the
cached-prefix path against a full forward, variants and their bytes, needles, windows, stats
and the written outputs; the simulated fp8 working cache of ``benchmarks/quality_fp8.py``."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from polykv_vllm.core import KVCodec

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"
sys.path.insert(0, str(_PATH.parent))  # quality.py imports its sibling quality_fp8
import quality_fp8  # noqa: E402

_SPEC = importlib.util.spec_from_file_location("benchmarks_quality", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
quality = importlib.util.module_from_spec(_SPEC)
sys.modules["benchmarks_quality"] = quality
_SPEC.loader.exec_module(quality)

VOCAB = 97


def make_model(head_dim: int = 16, layers: int = 2, kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def random_ids(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


# --- PPL arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize("n,vocab", [(1, 5), (7, 11), (64, 97)])
def test_perplexity_is_exp_of_mean_nll_computed_by_hand(n, vocab):
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(n, vocab, generator=g) * 3
    targets = torch.randint(0, vocab, (n,), generator=g).tolist()
    by_hand = []
    for row, t in zip(logits.tolist(), targets, strict=True):
        z = sum(math.exp(x) for x in row)
        by_hand.append(-math.log(math.exp(row[t]) / z))
    nll = quality.token_nll(logits, targets)
    assert nll.shape == (n,)
    assert nll.tolist() == pytest.approx(by_hand, rel=1e-9, abs=1e-9)
    assert quality.perplexity(nll) == pytest.approx(math.exp(sum(by_hand) / n), rel=1e-9)


@pytest.mark.parametrize("context", [1, 9, 40])
@pytest.mark.parametrize("head_dim", [16, 24])
def test_cached_prefix_logits_equal_full_forward(context, head_dim):
    """Prefill, take the cache tensors, build a fresh cache: the continuation's logits are
    those of one forward over the whole sequence (positions and mask are right)."""
    model = make_model(head_dim=head_dim)
    ids = random_ids(context + 12)
    kv = quality.prefill(model, ids[:context])
    assert len(kv) == model.config.num_hidden_layers
    assert kv[0][0].shape == (1, model.config.num_key_value_heads, context, head_dim)
    got = quality.logits_after(model, kv, ids[context:])
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0, context:].float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_make_cache_does_not_modify_the_prefix_tensors():
    model = make_model()
    ids = random_ids(20)
    kv = quality.prefill(model, ids[:10])
    before = [(k.clone(), v.clone()) for k, v in kv]
    quality.greedy(model, kv, ids[10], 5)
    quality.logits_after(model, kv, ids[10:])
    for (k, v), (k0, v0) in zip(kv, before, strict=True):
        assert k.shape == k0.shape and torch.equal(k, k0) and torch.equal(v, v0)


# --- variants ---------------------------------------------------------------------------------


def _variants(model):
    codec = KVCodec(preset="polykv", num_layers=model.config.num_hidden_layers)
    return [
        quality.Variant("identity", quality.identity_roundtrip),
        quality.Variant("bf16", quality.cast_roundtrip(torch.bfloat16)),
        quality.Variant("polykv", quality.codec_roundtrip(codec, torch.bfloat16)),
        quality.Variant("zeros", lambda kv: ([(k * 0, v * 0) for k, v in kv], 1)),
    ]


def test_identity_variant_gives_zero_delta_and_full_agreement():
    model = make_model()
    ids = random_ids(30 + 16 + 1, seed=3)
    res = quality.measure_window(model, _variants(model), ids, 30, 6, True, start=5)
    ref, ident = res["fp32"], res["identity"]
    assert ident.ppl == ref.ppl and ident.nll_sum == ref.nll_sum
    assert ident.top1_real == 1.0 and ident.greedy_tf == 1.0 and ident.greedy_free == 1.0
    assert ident.first_div == 6 and ident.tokens == 16 and ident.start == 5
    # A prefix replaced by zeros must change the continuation: the harness can see damage.
    assert res["zeros"].ppl != ref.ppl
    summary = quality.summarize(list(res), [res], [], seed=0)
    assert summary["identity"]["delta_vs_fp32"]["mean"] == 0.0
    assert summary["zeros"]["delta_vs_fp32"]["mean"] != 0.0


@pytest.mark.parametrize("tokens", [1, 13, 64])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_codec_roundtrip_bytes_layout_and_error(tokens, head_dim):
    layers, heads = 3, 2
    g = torch.Generator().manual_seed(tokens)
    kv = [
        (
            torch.randn(1, heads, tokens, head_dim, generator=g),
            torch.randn(1, heads, tokens, head_dim, generator=g),
        )
        for _ in range(layers)
    ]
    codec = KVCodec(preset="polykv", num_layers=layers)
    out, nbytes = quality.codec_roundtrip(codec, torch.float32)(kv)
    want_bytes = 0
    for i, ((k, v), (k2, v2)) in enumerate(zip(kv, out, strict=True)):
        packed = codec.encode(k[0].transpose(0, 1), v[0].transpose(0, 1), layer=i)
        want_bytes += packed.nbytes
        dk, dv = codec.decode(packed, dtype=torch.float32)
        assert k2.shape == k.shape and k2.dtype == torch.float32
        torch.testing.assert_close(k2, dk.transpose(0, 1)[None])
        torch.testing.assert_close(v2, dv.transpose(0, 1)[None])
        # int8 keys are close, 3-bit values are not exact but correlated
        assert (k2 - k).abs().max() <= k.abs().amax() / 127 + 1e-6
        assert torch.nn.functional.cosine_similarity(v2.flatten(), v.flatten(), dim=0) > 0.9
    assert nbytes == want_bytes
    bf16 = quality.bf16_bytes(kv)
    assert bf16 == layers * 2 * heads * tokens * head_dim * 2
    assert quality.identity_roundtrip(kv)[1] == 2 * bf16
    assert quality.cast_roundtrip(torch.bfloat16)(kv)[1] == bf16


def test_codec_layout_round_trip_is_exact():
    x = torch.randn(1, 3, 5, 8)
    y = quality.to_codec_layout(x)
    assert y.shape == (5, 3, 8) and torch.equal(y[2, 1], x[0, 1, 2])
    assert torch.equal(quality.from_codec_layout(y, torch.float32), x)
    with pytest.raises(ValueError, match="1, heads, tokens, dim"):
        quality.to_codec_layout(torch.randn(2, 3, 5, 8))


# --- greedy agreement -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a,b,agree,div",
    [([1, 2, 3], [1, 2, 3], 1.0, 3), ([1, 2, 4], [1, 2, 3], 2 / 3, 2), ([9], [1, 2], 0.0, 0)],
)
def test_agreement_and_first_divergence(a, b, agree, div):
    assert quality.agreement(a, b) == pytest.approx(agree)
    assert quality.first_divergence(a, b) == div


def test_greedy_matches_step_by_step_argmax_of_full_forward():
    model = make_model()
    ids = random_ids(15)
    gen = quality.greedy(model, quality.prefill(model, ids[:-1]), ids[-1], 4)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert gen == seq[len(ids) :]


# --- needles ----------------------------------------------------------------------------------

TEXT = "First line of text.\nSecond line here.\nThird line.\nFourth and last line."


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_insert_needle_puts_the_fact_on_its_own_line(depth):
    sentence = "The access code for vault 17 is 4821."
    new, at = quality.insert_needle(TEXT, sentence, depth)
    assert new.count(sentence) == 1 and new[at : at + len(sentence)] == sentence
    assert new[at - 1] == "\n"
    assert new.replace("\n" + sentence, "", 1) == TEXT
    # at a line break, and the nearest one to the requested depth
    breaks = [i for i, c in enumerate(TEXT) if c == "\n"]
    assert at - 1 == min(breaks, key=lambda b: abs(b - depth * len(TEXT)))


def test_insert_needle_rejects_bad_depth_and_handles_one_line():
    with pytest.raises(ValueError, match="depth"):
        quality.insert_needle(TEXT, "x", 1.5)
    new, at = quality.insert_needle("no breaks", "FACT", 0.9)
    assert new[at:].startswith("FACT") and "FACT" in new


def test_make_needles_distinct_and_spread():
    needles = quality.make_needles(20, seed=0)
    assert len({n.vault for n in needles}) == 20
    assert all(len(n.answer) == 4 and n.answer.isdigit() for n in needles)
    assert needles[0].depth == pytest.approx(0.05) and needles[-1].depth == pytest.approx(0.95)
    assert str(needles[3].vault) in needles[3].sentence and needles[3].answer in needles[3].sentence
    assert quality.make_needles(20, seed=0) == needles != quality.make_needles(20, seed=1)


@pytest.mark.parametrize(
    "answer,code",
    [
        ("The access code for vault 17 is 4821.", "4821"),
        ("4821", "4821"),
        ("Vault 17: 1234", "1234"),
        ("I do not know about vault 17.", None),
        ("", None),
    ],
)
def test_extract_code(answer, code):
    assert quality.extract_code(answer, 17) == code


class CharTokenizer:
    """A character tokenizer with a ChatML-like template and two special tokens."""

    specials = {"<|im_start|>": 95, "<|im_end|>": 96}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize
        body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return body + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            for s, t in self.specials.items():
                if text.startswith(s, i):
                    ids.append(t)
                    i += len(s)
                    break
            else:
                ids.append(ord(text[i]) % 90)
                i += 1
        return {"input_ids": ids}

    def decode(self, ids):
        inv = {t: s for s, t in self.specials.items()}
        return "".join(inv.get(i, chr(i) if i >= 32 else "?") for i in ids)

    def convert_tokens_to_ids(self, token):
        return self.specials[token]


def test_split_chat_prompt_cuts_right_after_the_document():
    tok = CharTokenizer()
    prefix, suffix = quality.split_chat_prompt(tok, "DOC TEXT", "Question?")
    full = tok(
        tok.apply_chat_template([{"role": "user", "content": "DOC TEXT\n\nQuestion?"}], False, True)
    )["input_ids"]
    assert prefix + suffix == full
    assert prefix[-8:] == tok("DOC TEXT")["input_ids"]
    assert suffix[:2] == tok("\n\n")["input_ids"]


def test_measure_needle_runs_every_variant_and_identity_matches_fp32():
    model = make_model()
    needle = quality.Needle(vault=17, answer="4821", depth=0.5)
    out = quality.measure_needle(model, CharTokenizer(), _variants(model), TEXT, needle, 5)
    assert set(out) == {"fp32", "identity", "bf16", "polykv", "zeros"}
    assert out["identity"]["answer"] == out["fp32"]["answer"]
    assert out["fp32"]["correct"] == (quality.extract_code(out["fp32"]["answer"], 17) == "4821")
    assert out["fp32"]["prefix_tokens"] > len(TEXT)


# --- windows, statistics, outputs -------------------------------------------------------------


@pytest.mark.parametrize("n_tokens,n,length", [(1000, 5, 100), (1000, 10, 100), (1000, 12, 100)])
def test_choose_windows(n_tokens, n, length):
    starts = quality.choose_windows(n_tokens, n, length, seed=7)
    assert starts == quality.choose_windows(n_tokens, n, length, seed=7)
    assert len(starts) == n and starts == sorted(starts)
    assert starts[0] >= 0 and starts[-1] + length <= n_tokens
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    if n * length <= n_tokens:
        assert min(gaps) >= length
    else:
        assert len(set(gaps)) == 1
    if n * length < n_tokens:
        assert starts != quality.choose_windows(n_tokens, n, length, seed=8)


def test_choose_windows_rejects_impossible():
    with pytest.raises(ValueError, match="does not fit"):
        quality.choose_windows(10, 1, 11, 0)


@pytest.mark.parametrize(
    "df,q", [(1, 12.7062), (5, 2.5706), (10, 2.2281), (49, 2.0096), (1000, 1.9623)]
)
def test_t_quantile_matches_tables(df, q):
    assert quality.t_quantile(0.975, df) == pytest.approx(q, abs=2e-4)


def test_mean_ci():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    ci = quality.mean_ci(xs, seed=0, resamples=2000)
    half = 2.7764 * math.sqrt(2.5) / math.sqrt(5)
    assert ci["mean"] == 3.0
    assert ci["t_lo"] == pytest.approx(3 - half, abs=1e-3)
    assert ci["t_hi"] == pytest.approx(3 + half, abs=1e-3)
    assert 1.0 <= ci["boot_lo"] < 3.0 < ci["boot_hi"] <= 5.0
    const = quality.mean_ci([2.0] * 4, seed=0, resamples=100)
    assert const["t_lo"] == const["t_hi"] == const["boot_lo"] == const["boot_hi"] == 2.0


def test_outputs_written_and_consistent(tmp_path):
    model = make_model()
    variants = _variants(model)
    windows = [
        quality.measure_window(model, variants, random_ids(20 + 8 + 1, seed=s), 20, 4, s == 0, s)
        for s in range(3)
    ]
    needle = quality.Needle(vault=17, answer="4821", depth=0.5)
    needles = [quality.measure_needle(model, CharTokenizer(), variants, TEXT, needle, 4)]
    names = ["fp32"] + [v.name for v in variants]
    summary = quality.summarize(names, windows, needles, seed=0)
    meta = {
        "command": "python benchmarks/quality.py --windows 3",
        "python": "3.11",
        "config": {
            "windows": 3,
            "context": 20,
            "continuation": 8,
            "needles": 1,
            "needle_context": 40,
            "decode_dtype": "bfloat16",
            "generate": 4,
            "free_running_windows": 1,
        },
    }
    quality.write_outputs(tmp_path, meta, summary, windows, needles)
    doc = json.loads((tmp_path / "quality.json").read_text())
    assert doc["command"] == meta["command"] and len(doc["windows"]) == 3
    s = doc["summary"]["polykv"]
    assert s["ratio_vs_bf16"] == pytest.approx(s["bf16_nbytes"] / s["nbytes"])
    assert s["ratio_vs_bf16"] > 2.0 and doc["summary"]["bf16"]["ratio_vs_bf16"] == 1.0
    assert s["greedy_free"]["n"] == 1 and s["greedy_tf"]["n"] == 3
    rows = list(csv.DictReader((tmp_path / "quality.csv").open()))
    assert [r["variant"] for r in rows] == names
    poly = next(r for r in rows if r["variant"] == "polykv")
    assert float(poly["delta_vs_fp32"]) == pytest.approx(s["delta_vs_fp32"]["mean"])
    assert float(poly["delta_vs_fp32_t_lo"]) == pytest.approx(s["delta_vs_fp32"]["t_lo"])
    md = (tmp_path / "quality.md").read_text()
    assert meta["command"] in md and "| polykv |" in md and f"{s['ratio_vs_bf16']:.2f}x" in md


def test_parse_custom_config(tmp_path):
    name, cfg = quality.parse_custom_config('{"name": "k4", "key_bits": 4, "key_mode": "rotated"}')
    assert name == "k4" and cfg.key_bits == 4 and cfg.value_bits == 3
    f = tmp_path / "c.json"
    f.write_text('{"name": "v4", "value_bits": 4, "keep_layers": [0, -1]}')
    name, cfg = quality.parse_custom_config(f"@{f}")
    assert name == "v4" and cfg.value_bits == 4 and cfg.keep_layers == (0, -1)
    with pytest.raises(SystemExit, match="name"):
        quality.parse_custom_config('{"key_bits": 4}')
    with pytest.raises(ValueError, match="unknown codec config"):
        quality.parse_custom_config('{"name": "x", "bits": 4}')


def test_rerender_rewrites_tables_with_notes_and_extra_runs(tmp_path):
    model = make_model()
    variants = _variants(model)[:2]
    windows = [
        quality.measure_window(model, variants, random_ids(29, seed=s), 20, 0, False, s)
        for s in range(2)
    ]
    names = ["fp32"] + [v.name for v in variants]
    summary = quality.summarize(names, windows, [], seed=0)
    cfg = {
        "windows": 2,
        "context": 20,
        "continuation": 8,
        "needles": 0,
        "needle_context": 40,
        "decode_dtype": "bfloat16",
        "generate": 0,
        "free_running_windows": 0,
    }
    meta = {"command": "python q.py --main", "python": "3.11", "config": cfg}
    quality.write_outputs(tmp_path / "a", meta, summary, windows, [])
    quality.write_outputs(
        tmp_path / "b", {**meta, "command": "python q.py --extra"}, summary, windows, []
    )
    out = tmp_path / "out"
    argv = [
        "--rerender",
        str(tmp_path / "a" / "quality.json"),
        str(tmp_path / "b" / "quality.json"),
        "--note",
        "ran on host X",
        "--out",
        str(out),
    ]
    assert quality.main(argv) == 0
    md = (out / "quality.md").read_text()
    assert md.index("python q.py --main") < md.index("ran on host X") < md.index("q.py --extra")
    assert md.count("| identity |") == 2
    doc = json.loads((out / "quality.json").read_text())
    assert (
        doc["notes"] == ["ran on host X"]
        and doc["summary"] == json.loads((tmp_path / "a" / "quality.json").read_text())["summary"]
    )
    assert [r["variant"] for r in csv.DictReader((out / "quality.csv").open())] == names


# --- fp8 working cache (issue 10) ---------------------------------------------------------------

FP8 = [("fp8", torch.float8_e4m3fn, 448.0), ("fp8_e5m2", torch.float8_e5m2, 57344.0)]


@pytest.mark.parametrize("name,dtype,fmax", FP8)
@pytest.mark.parametrize("scale", [1.0, 0.37, 3.0])
def test_fp8_quantize_is_torch_cast_of_x_over_scale_saturated(name, dtype, fmax, scale):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 50, 16, generator=g) * 40
    q = quality_fp8.quantize_fp8(x, scale, name)
    assert q.dtype == dtype and q.shape == x.shape
    inside = (x / scale).abs() <= fmax
    # In range: torch's own float8 cast (round to nearest even) of x / scale, bit for bit.
    want = (x / scale).to(dtype)
    assert torch.equal(q[inside].view(torch.uint8), want[inside].view(torch.uint8))
    # Out of range torch gives NaN/inf; vLLM's __NV_SATFINITE gives the largest finite value.
    big = torch.tensor([fmax * 10, -fmax * 10, float("inf")]) * scale
    assert quality_fp8.quantize_fp8(big, scale, name).float().tolist() == [fmax, -fmax, fmax]
    # Reading back: codes times scale, in the input's dtype; a second write changes nothing.
    back = quality_fp8.fp8_roundtrip(x, scale, name)
    assert back.dtype == x.dtype
    assert torch.equal(back, q.float() * scale)
    assert torch.equal(quality_fp8.fp8_roundtrip(back, scale, name), back)
    err = (back - x).abs()[inside].max() / (x.abs()[inside].max())
    assert 0 < err < (0.07 if name == "fp8" else 0.13)


def test_fp8_spec_and_scales_reject_bad_values():
    with pytest.raises(ValueError, match="cache_dtype='int8'.*allowed"):
        quality_fp8.Fp8Spec("int8")
    with pytest.raises(ValueError, match="scales='amax'.*allowed"):
        quality_fp8.Fp8Spec("fp8", "amax")
    with pytest.raises(ValueError, match="k_scale_constant"):
        quality_fp8.Fp8Spec("fp8", "calculated", k_scale_constant=0.0)
    scales = quality_fp8.LayerScales(quality_fp8.Fp8Spec("fp8", "calculated"))
    with pytest.raises(ValueError, match="not finite positive"):
        scales.get(0, torch.zeros(3), torch.ones(3))


def test_calculated_scales_are_vllm_amax_over_constants_set_once_per_layer():
    scales = quality_fp8.LayerScales(quality_fp8.Fp8Spec("fp8", "calculated"))
    k, v = torch.tensor([1.0, -50.0, 3.0]), torch.tensor([-2.0, 0.5, 7.0])
    assert scales.get(3, k, v) == (50.0 / 200.0, 7.0 / 100.0)
    assert scales.get(3, k * 100, v * 100) == (50.0 / 200.0, 7.0 / 100.0)  # fixed after first
    unit = quality_fp8.LayerScales(quality_fp8.Fp8Spec("fp8_e5m2"))
    assert unit.get(0, k, v) == (1.0, 1.0)


@pytest.mark.parametrize("mode", ["unit", "calculated"])
def test_fp8_cache_prefill_then_continuation_equals_one_fp8_forward(mode):
    """The prefix written back into a fresh fp8 cache (same scales) and the continuation on
    top give the logits of one forward over everything on an fp8 cache; the cache holds
    values on the fp8 grid; and fp8 attention differs from fp32."""
    model = make_model()
    ids = random_ids(40)
    scales = quality_fp8.LayerScales(quality_fp8.Fp8Spec("fp8", mode))
    new_cache = quality_fp8.cache_factory(scales)
    kv = quality.prefill(model, ids[:25], new_cache)
    for layer, (k, v) in enumerate(kv):
        ks, vs = scales.scales[layer]
        assert torch.equal(quality_fp8.fp8_roundtrip(k, ks, "fp8"), k)
        assert torch.equal(quality_fp8.fp8_roundtrip(v, vs, "fp8"), v)
    got = quality.logits_after(model, kv, ids[25:], new_cache)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), past_key_values=new_cache(), use_cache=True)
    torch.testing.assert_close(got, out.logits[0, 25:].float(), rtol=1e-4, atol=1e-4)
    plain = quality.logits_after(model, quality.prefill(model, ids[:25]), ids[25:])
    assert not torch.allclose(got, plain, atol=1e-5)


def _fp8_variants(model, spec):
    codec = KVCodec(preset="polykv", num_layers=model.config.num_hidden_layers)
    name = spec.cache_dtype
    return [
        quality.Variant(name, quality.fp8_store_roundtrip(name), working=spec),
        quality.Variant(
            f"{name}+identity", quality.identity_roundtrip, working=spec, baseline=name
        ),
        quality.Variant(
            f"{name}+polykv",
            quality.codec_roundtrip(codec, torch.bfloat16),
            working=spec,
            baseline=name,
        ),
    ]


@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
def test_fp8_plus_polykv_is_finite_and_differs_from_fp8_alone(name):
    model = make_model()
    spec = quality_fp8.Fp8Spec(name)
    ids = random_ids(30 + 16 + 1, seed=4)
    res = quality.measure_window(model, _fp8_variants(model, spec), ids, 30, 6, True, start=2)
    ref, fp8, ident, poly = res["fp32"], res[name], res[f"{name}+identity"], res[f"{name}+polykv"]
    assert math.isfinite(fp8.ppl) and math.isfinite(poly.ppl)
    assert fp8.ppl != ref.ppl and poly.ppl != fp8.ppl
    # fp8 codes: one byte per element, half of bf16; the codec's packed bytes are fewer.
    assert fp8.nbytes * 2 == fp8.bf16_nbytes and poly.nbytes < fp8.nbytes
    # The identity store behind fp8 is the fp8 cache alone: equal PPL, full agreement with it.
    assert ident.ppl == fp8.ppl and ident.top1_vs_base == 1.0 and ident.greedy_tf_vs_base == 1.0
    assert fp8.top1_vs_base is None and 0.0 <= poly.top1_vs_base <= 1.0
    assert 0.0 <= poly.greedy_tf_vs_base <= 1.0


def test_baseline_must_come_first():
    model = make_model()
    spec = quality_fp8.Fp8Spec("fp8")
    variants = _fp8_variants(model, spec)[::-1]
    with pytest.raises(ValueError, match="baseline='fp8'.*list the baseline first"):
        quality.measure_window(model, variants, random_ids(29), 20, 0, False)


def _result(start, ppl, tokens=8):
    return quality.WindowResult(
        start=start, ppl=ppl, nll_sum=tokens * math.log(ppl), tokens=tokens, nbytes=1
    )


def test_delta_vs_baseline_is_paired_per_window():
    """Per-window ratios, averaged: not a ratio of averages (which would be 0 here)."""
    windows = [
        {"fp32": _result(s, 10.0), "fp8": _result(s, b), "fp8+polykv": _result(s, p)}
        for s, b, p in [(0, 10.0, 12.0), (9, 20.0, 18.0)]
    ]
    roles = {
        "fp8": {"working_cache": "fp8"},
        "fp8+polykv": {"working_cache": "fp8", "baseline": "fp8"},
    }
    s = quality.summarize(["fp32", "fp8", "fp8+polykv"], windows, [], 0, roles)["fp8+polykv"]
    assert s["baseline"] == "fp8" and s["working_cache"] == "fp8"
    assert s["delta_vs_baseline"]["mean"] == pytest.approx((20.0 + -10.0) / 2)
    assert s["delta_vs_fp32"]["mean"] == pytest.approx((20.0 + 80.0) / 2)
    assert quality.paired_deltas(windows, "fp8+polykv", "fp8") == pytest.approx([20.0, -10.0])
    windows[1]["fp8"] = _result(5, 20.0)
    with pytest.raises(ValueError, match="not paired"):
        quality.paired_deltas(windows, "fp8+polykv", "fp8")


@pytest.mark.parametrize("delta,verdict", [(0.4, "MET"), (0.7, "MISSED")])
def test_fp8_target_verdict(delta, verdict):
    summary = {
        "fp8+polykv": {"baseline": "fp8", "delta_vs_baseline": {"mean": delta, "t_hi": 0.9}},
        "fp8+polykv-lite": {"baseline": "fp8", "delta_vs_baseline": {"mean": 5.0}},
    }
    lines = quality.check_targets(summary)
    assert lines == [
        f"fp8+polykv: PPL delta vs fp8 alone {delta:+.2f}%, CI upper +0.90% (target <= +0.5%): "
        f"{verdict}"
    ]


def test_fp8_outputs_and_unchanged_format_without_fp8(tmp_path):
    model = make_model()
    spec = quality_fp8.Fp8Spec("fp8", "calculated")
    variants = _variants(model)[1:3] + _fp8_variants(model, spec)
    windows = [
        quality.measure_window(model, variants, random_ids(29, seed=s), 20, 3, False, s)
        for s in range(3)
    ]
    names = ["fp32"] + [v.name for v in variants]
    roles = {
        v.name: {"working_cache": "fp8"} | ({"baseline": v.baseline} if v.baseline else {})
        for v in variants
        if v.working
    }
    summary = quality.summarize(names, windows, [], seed=0, roles=roles)
    cfg = {
        "windows": 3,
        "context": 20,
        "continuation": 8,
        "needles": 0,
        "needle_context": 40,
        "decode_dtype": "bfloat16",
        "generate": 3,
        "free_running_windows": 0,
        "kv_scales": "calculated",
    }
    meta = {"command": "python q.py --cache-dtype fp8", "python": "3.11", "config": cfg}
    quality.write_outputs(tmp_path, meta, summary, windows, [], stem="quality_fp8")
    doc = json.loads((tmp_path / "quality_fp8.json").read_text())
    assert doc["windows"][0]["fp8+polykv"]["top1_vs_base"] is not None
    assert "top1_vs_base" not in doc["windows"][0]["polykv"]
    rows = {r["variant"]: r for r in csv.DictReader((tmp_path / "quality_fp8.csv").open())}
    poly = summary["fp8+polykv"]
    assert rows["fp8+polykv"]["baseline"] == "fp8"
    assert float(rows["fp8+polykv"]["delta_vs_baseline"]) == poly["delta_vs_baseline"]["mean"]
    assert float(rows["fp8+polykv"]["delta_vs_baseline_t_hi"]) == poly["delta_vs_baseline"]["t_hi"]
    assert rows["polykv"]["baseline"] == "" and rows["fp8"]["working_cache"] == "fp8"
    md = (tmp_path / "quality_fp8.md").read_text()
    assert "fp8 working cache (issue 10)" in md and "scales: calculated" in md
    assert "| fp8+polykv | fp8 |" in md and "fp8+polykv: PPL delta vs fp8 alone" in md
    # Without a working cache: the columns and window keys of before issue 10.
    plain = quality.summarize(names[:3], windows, [], seed=0)
    quality.write_outputs(
        tmp_path, meta, plain, [{k: w[k] for k in names[:3]} for w in windows], []
    )
    header = next(csv.reader((tmp_path / "quality.csv").open()))
    assert header[-2:] == ["retrieval_acc", "retrieval_n"] and "baseline" not in header
    assert "fp8 working cache" not in (tmp_path / "quality.md").read_text()


def test_build_variants_orders_fp8_cache_before_its_codecs():
    args = quality.build_parser().parse_args(
        ["--cache-dtype", "fp8", "fp8_e5m2", "--kv-scales", "calculated", "--no-bf16"]
    )
    configs = {"polykv": quality.PRESETS["polykv"], "polykv-lite": quality.PRESETS["polykv-lite"]}
    variants = quality.build_variants(args, configs, 2, torch.bfloat16)
    assert [(v.name, v.baseline) for v in variants] == [
        ("polykv", None),
        ("polykv-lite", None),
        ("fp8", None),
        ("fp8+polykv", "fp8"),
        ("fp8+polykv-lite", "fp8"),
        ("fp8_e5m2", None),
        ("fp8_e5m2+polykv", "fp8_e5m2"),
        ("fp8_e5m2+polykv-lite", "fp8_e5m2"),
    ]
    assert variants[2].working == quality_fp8.Fp8Spec("fp8", "calculated")
    args.no_fp32_codecs = True
    assert [v.name for v in quality.build_variants(args, configs, 2, torch.bfloat16)][:1] == ["fp8"]
