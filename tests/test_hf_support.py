"""Tiny random Llama models and a byte-level tokenizer (with or without a chat template) for the
HF fallback tests; the tests at the end check the helpers themselves."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]

DOCUMENT = (
    "The with statement wraps the execution of a block with methods defined by a context "
    "manager. The expression is evaluated to obtain a context manager; its __enter__ method "
    "is called and its __exit__ method is loaded for later use."
)


def make_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: one token per byte (ids 0..255) plus ``SPECIALS`` (256..259)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in SPECIALS:
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        additional_special_tokens=SPECIALS[2:],
    )
    if chat:
        tok.chat_template = CHATML
    return tok


def make_model(
    seed: int = 0,
    layers: int = 2,
    head_dim: int = 16,
    kv_heads: int = 2,
    max_positions: int = 1024,
    logit_scale: float = 20.0,
    **overrides: Any,
) -> LlamaForCausalLM:
    """A random Llama decoder (fp32, CPU, eval) over the 260-token byte vocabulary.

    The LM head is scaled by ``logit_scale`` so that logits are peaked enough for greedy
    decoding to be meaningful (a random model's logits are otherwise near uniform); the rest keeps
    the standard ``initializer_range=0.02``, so attention stays smooth, like a trained model's.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256 + len(SPECIALS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=257,
        **overrides,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model


def stop_at_different_steps(pool, model, tok, queries, **kw):
    """A stop token that ends ``queries``' agents at different steps, and each agent's greedy
    tokens up to and including it (a free run of 12 tokens decoded eagerly); None when no
    generated token does that. Candidates: every generated token after the first, in order."""
    free = pool.generate_ids(
        queries, model, tok, max_new_tokens=12, eos_token_id=None, cuda_graph=False, **kw
    )
    for stop in (t for out in free for t in out[1:]):
        ends = [o.index(stop) + 1 if stop in o else len(o) for o in free]
        if len(set(ends)) > 1:
            return stop, [o[:e] for o, e in zip(free, ends, strict=True)]
    return None


@pytest.mark.parametrize("chat", [False, True])
def test_tokenizer_round_trips_text(chat: bool) -> None:
    tok = make_tokenizer(chat)
    ids = tok(DOCUMENT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(DOCUMENT.encode())
    assert tok.decode(ids) == DOCUMENT
    assert bool(tok.chat_template) is chat


def test_tokenizer_chat_template_renders_chatml() -> None:
    tok = make_tokenizer(chat=True)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_model_is_peaked_enough_for_greedy() -> None:
    model = make_model()
    ids = torch.tensor([list(DOCUMENT.encode())[:64]])
    with torch.no_grad():
        probs = model(ids).logits.softmax(-1)
    # A top-1 probability far above uniform (1/260) makes greedy comparisons meaningful.
    assert probs.max(-1).values.mean() > 20 / 260
