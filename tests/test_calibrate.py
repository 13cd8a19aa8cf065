"""``polykv-vllm calibrate`` on tiny random models: measurement, allocation, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from test_hf_support import make_model, make_tokenizer

from polykv_vllm.calibrate import allocate_greedy, allocate_knapsack, calibrate
from polykv_vllm.calibrate.allocate import Choice, check_target
from polykv_vllm.calibrate.command import main
from polykv_vllm.calibrate.measure import (
    _Runner,
    measure_sensitivity,
    model_fingerprint,
    prefill_windows,
)
from polykv_vllm.core import CodecProfile, KVCodec, LayerSetting, ProfileError

TEXT = " ".join(f"word{i % 97} is followed by word{(i * 7) % 97}." for i in range(400))


def _windows(tok, n: int, length: int) -> list[list[int]]:
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    return [ids[i * length : (i + 1) * length] for i in range(n)]


def test_partial_forward_matches_full_forward() -> None:
    model, tok = make_model(layers=3), make_tokenizer(chat=False)
    ids = torch.tensor(_windows(tok, 2, 41))
    runner = _Runner(model, ids, 32)
    full = model(input_ids=ids).logits[:, 32:-1]
    torch.testing.assert_close(runner.ref, torch.log_softmax(full, -1), atol=1e-4, rtol=1e-4)
    for start in range(3):
        torch.testing.assert_close(runner.logp(runner.kv, start), runner.ref)
    assert runner.kl(runner.ref) == pytest.approx(0.0, abs=1e-7)


def test_sensitivity_orders_bits() -> None:
    model, tok = make_model(layers=2, head_dim=32), make_tokenizer(chat=False)
    sens = measure_sensitivity(prefill_windows(model, _windows(tok, 2, 49), 40))
    for layer in range(2):
        assert (
            sens.keys[layer][(8, False)] < sens.keys[layer][(4, True)] < sens.keys[layer][(2, True)]
        )
        assert sens.values[layer][(4, True)] < sens.values[layer][(2, True)]


def _table(losses: list[list[tuple[int, float]]]) -> list[list[Choice]]:
    return [[Choice(LayerSetting(8, 3), b, x) for b, x in row] for row in losses]


def test_knapsack_beats_greedy_on_a_non_convex_layer() -> None:
    # layer 0: a big step saves 40 bytes for little loss; greedy takes the locally best rate
    table = _table([[(100, 0.0), (90, 0.5), (60, 0.6)], [(100, 0.0), (80, 0.3)]])
    exact, greedy = allocate_knapsack(table, 160), allocate_greedy(table, 160)
    assert sum(c.nbytes for c in exact) <= 160 and sum(c.nbytes for c in greedy) <= 160
    assert sum(c.loss for c in exact) == pytest.approx(0.6)
    assert sum(c.loss for c in exact) <= sum(c.loss for c in greedy)


def test_knapsack_is_optimal_by_brute_force() -> None:
    import itertools
    import random

    rng = random.Random(0)
    table = _table([[(b, rng.random()) for b in (92, 76, 60, 52, 36)] for _ in range(4)])
    for budget in (150, 200, 250, 300, 368):
        best = min(
            (sum(c.loss for c in combo), combo)
            for combo in itertools.product(*table)
            if sum(c.nbytes for c in combo) <= budget
        )
        got = allocate_knapsack(table, budget)
        assert sum(c.nbytes for c in got) <= budget
        assert sum(c.loss for c in got) == pytest.approx(best[0])


@pytest.mark.parametrize("ratio", [7.2, 100.0, 1.0, 0.5, float("nan"), "4"])
def test_unreachable_target_ratio_is_refused(ratio) -> None:
    table = _table([[(66 + 34, 0.0), (18 + 18, 1.0)]] * 3)
    with pytest.raises(ProfileError, match=rf"target ratio {ratio!r} cannot be reached: allowed"):
        check_target(ratio, table, 3 * 256)


def test_calibrate_writes_a_profile_the_codec_reads(tmp_path) -> None:
    model, tok = make_model(layers=3, head_dim=32), make_tokenizer(chat=False)
    profiles = calibrate(
        model, tok, [3.0, 5.0], corpus=("t", TEXT), windows=2, context=40, scored=8
    )
    for ratio, profile in profiles.items():
        assert profile.ratio >= ratio
        assert profile.model == model_fingerprint(model)
        figures = profile.calibration
        assert figures["measured_kl"]["knapsack"] >= 0
        assert figures["corpus"]["windows"][-1][1] == figures["corpus"]["tokens"]
        path = tmp_path / f"p{ratio}.json"
        profile.save(path)
        again = CodecProfile.load(path)
        assert again == profile and again.calibration == json.loads(path.read_text())["calibration"]
        codec = KVCodec(profile=path)
        assert [codec.layer_setting(i) for i in range(3)] == list(profile.layers)
    assert profiles[5.0].bytes_per_token_head < profiles[3.0].bytes_per_token_head


def test_corpus_too_short_is_refused() -> None:
    model, tok = make_model(layers=2), make_tokenizer(chat=False)
    with pytest.raises(ProfileError, match=r"corpus 'tiny' has 11 tokens, too short for 2 cal"):
        calibrate(model, tok, [4.0], corpus=("tiny", "hello world"), windows=2, context=40)


def test_command_reports_bad_ratio(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["embedded", "--target-ratio", "3", "4", "--out", "p.json"])
    assert e.value.code == 2
    assert "needs '{ratio}'" in capsys.readouterr().err


def test_polykv_vllm_cli_dispatches_calibrate(capsys) -> None:
    from polykv_vllm import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["calibrate", "embedded", "--target-ratio", "3", "4", "--out", "p.json"])
    assert e.value.code == 2
    assert "polykv-vllm calibrate" in capsys.readouterr().err


def test_hf_compress_with_a_profile_and_refusal_for_another_model(tmp_path) -> None:
    from test_hf_support import DOCUMENT

    from polykv_vllm.core import ModelFingerprint
    from polykv_vllm.hf import compress

    model, tok = make_model(layers=2, head_dim=32), make_tokenizer(chat=True)
    fp = model_fingerprint(model)
    profile = CodecProfile(fp, (LayerSetting(4, 2, True), LayerSetting(8, 4)))
    pool = compress(model, tok, DOCUMENT, profile=profile)
    assert pool.codec.identity == f"profile:{profile.digest}"
    assert pool.layers[0].key_bits == 4 and pool.layers[1].value_bits == 4
    other = CodecProfile(
        ModelFingerprint("other/model", fp.architecture, 2, fp.kv_heads, fp.head_dim),
        profile.layers,
    )
    with pytest.raises(ProfileError, match="cannot serve") as e:
        compress(model, tok, DOCUMENT, profile=other)
    assert "other/model" in str(e.value) and fp.describe() in str(e.value)
