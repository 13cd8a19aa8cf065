"""HF fallback: bad inputs raise errors that name the value and what is allowed."""

from __future__ import annotations

import pytest
from test_hf_support import DOCUMENT, make_model, make_tokenizer
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from polykv_vllm.hf import UnsupportedModelError, compress, create_agents


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(chat=True)


@pytest.mark.parametrize("preset", ["polykv-ultra", "", "POLYKV"])
def test_unknown_preset(model, tok, preset):
    with pytest.raises(ValueError, match=r"unknown codec preset .*allowed presets are .*polykv"):
        compress(model, tok, DOCUMENT, preset=preset)


@pytest.mark.parametrize("document", ["", "   ", "\n\t"])
def test_empty_document(model, tok, document):
    with pytest.raises(ValueError, match="is empty"):
        compress(model, tok, document)


@pytest.mark.parametrize("document", [None, b"bytes", 3])
def test_document_not_a_string(model, tok, document):
    with pytest.raises(TypeError, match="document must be a str"):
        compress(model, tok, document)


@pytest.mark.parametrize("chat", [False, True])
def test_document_longer_than_context(chat):
    model, tok = make_model(max_positions=64), make_tokenizer(chat)
    with pytest.raises(ValueError, match=r"max_position_embeddings=64: allowed at most 64"):
        compress(model, tok, DOCUMENT)


def test_generation_past_the_context():
    model, tok = make_model(max_positions=300), make_tokenizer(chat=False)
    pool = compress(model, tok, DOCUMENT)
    agent = create_agents(pool, model, tok, 1)[0]
    with pytest.raises(ValueError, match=r"max_new_tokens=200.*max_position_embeddings=300"):
        agent.generate("Why?", max_new_tokens=200)
    assert agent.generate("Why?", max_new_tokens=2)  # a short answer still fits


@pytest.mark.parametrize("max_new_tokens", [0, -1, 2.5, True])
def test_bad_max_new_tokens(model, tok, max_new_tokens):
    pool = compress(model, tok, DOCUMENT)
    agent = create_agents(pool, model, tok, 1)[0]
    with pytest.raises(ValueError, match=f"max_new_tokens={max_new_tokens!r} is invalid"):
        agent.generate("Why?", max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("head_dim", [6, 4])
def test_head_dim_the_codec_refuses(tok, head_dim):
    model = make_model(head_dim=head_dim)
    with pytest.raises(UnsupportedModelError, match=f"head_dim={head_dim}.*allowed are even"):
        compress(model, tok, DOCUMENT)


SMALL = {
    "vocab_size": 260,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def test_sliding_window_model_is_refused(tok):
    model = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=32)).eval()
    with pytest.raises(UnsupportedModelError, match=r"sliding_window=32: only full-attention"):
        compress(model, tok, DOCUMENT)


def test_mixed_layer_types_are_refused(tok):
    config = Qwen2Config(
        **SMALL,
        use_sliding_window=True,
        sliding_window=32,
        layer_types=["full_attention", "sliding_attention"],
    )
    model = Qwen2ForCausalLM(config).eval()
    with pytest.raises(UnsupportedModelError, match=r"\['sliding_attention'\]: only 'full_at"):
        compress(model, tok, DOCUMENT)


def test_encoder_decoder_model_is_refused(tok):
    config = BartConfig(
        vocab_size=260,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
    )
    model = BartForConditionalGeneration(config).eval()
    with pytest.raises(UnsupportedModelError, match="encoder-decoder.*decoder-only"):
        compress(model, tok, DOCUMENT)


def test_not_a_model(tok):
    with pytest.raises(TypeError, match="must be a transformers generative model"):
        compress(object(), tok, DOCUMENT)


def test_chat_template_requested_without_one(model):
    with pytest.raises(ValueError, match="has no chat template"):
        compress(model, make_tokenizer(chat=False), DOCUMENT, chat_template=True)


@pytest.mark.parametrize("n", [0, -2, 1.5, "4"])
def test_bad_number_of_agents(model, tok, n):
    pool = compress(model, tok, DOCUMENT)
    with pytest.raises(ValueError, match=f"n={n!r} agents is invalid"):
        create_agents(pool, model, tok, n)


@pytest.mark.parametrize("n", [0, -1])
def test_bad_memory_summary_agents(model, tok, n):
    pool = compress(model, tok, DOCUMENT)
    with pytest.raises(ValueError, match=f"n_agents={n} is invalid"):
        pool.memory_summary(n)


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"layers": 3}, "num_layers"), ({"kv_heads": 4}, "kv_heads")]
)
def test_agents_need_the_pool_model(model, tok, kwargs, field):
    pool = compress(model, tok, DOCUMENT)
    other = make_model(**kwargs)
    with pytest.raises(ValueError, match=f"model {field}=.*pool was compressed with {field}="):
        create_agents(pool, other, tok, 2)


def test_pool_must_come_from_compress(model, tok):
    with pytest.raises(TypeError, match="pool must be a SharedPool"):
        create_agents({"layers": []}, model, tok, 1)
