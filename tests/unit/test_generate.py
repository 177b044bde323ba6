"""`mm_megatron.infer`: the KV-cache decode loop equals a no-cache greedy decode and does O(n)
work; prompts are formatted exactly as in training; streaming yields the answer."""

from __future__ import annotations

import os

import pytest
import torch

from mm_megatron.config.presets import get_preset
from mm_megatron.data.synthetic import write_synthetic_dataset
from mm_megatron.data.templates import TEMPLATE_NAMES, tokenize_conversation
from mm_megatron.data.tokenizer import load_tokenizer, prepare_tokenizer
from mm_megatron.infer.generate import Generator, build_prompt, stop_text
from mm_megatron.model.build import build_llava_model


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    write_synthetic_dataset(out, n_train=40, n_val=0, image_size=16, shard_size=40, vocab_size=512)
    return prepare_tokenizer(load_tokenizer(os.path.join(out, "tokenizer")))


@pytest.fixture
def model(single_rank):
    cfg = get_preset("debug-tiny")
    torch.manual_seed(0)
    return build_llava_model(cfg)


def _decoder_positions(model) -> list[int]:
    """Sequence positions each decoder call receives (counted outside the generator)."""
    seen: list[int] = []

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        seen.append(int(hidden.shape[0]))  # [s, b, h]

    model.language_model.decoder.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_kv_cache_equals_no_cache_greedy_and_does_linear_work(model, info):
    cfg = model.cfg
    gen = Generator(model, info, "vicuna_v1")
    gen.stop = None  # a random model: never stop early, decode all 24 tokens
    info_no_eos = type(info)(**{**info.__dict__, "eos_token_id": None})
    gen.info = info_no_eos
    prompt = build_prompt(info, "vicuna_v1", "What colour is the shape?", 1)
    image = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    seen = _decoder_positions(model)
    n = 24
    cached = gen.generate(image, prompt, max_new_tokens=n)
    calls_cached = list(seen)
    seen.clear()
    plain = gen.generate(image, prompt, max_new_tokens=n, use_cache=False)
    assert len(cached.token_ids) == n
    assert cached.token_ids == plain.token_ids
    s = model.plan(torch.tensor([prompt])).seq_len  # merged prompt (16 image tokens)
    # cached: the prompt once, then one position per new token
    assert calls_cached == [s] + [1] * (n - 1)
    assert cached.positions_computed == s + n - 1
    # no cache: the whole sequence at every step, O(n^2)
    assert plain.positions_computed == sum(s + i for i in range(n)) == sum(seen)


def test_cached_logits_match_full_recompute(model, info):
    cfg = model.cfg
    gen = Generator(model, info, "plain")
    prompt = build_prompt(info, "plain", "", 1)
    image = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    from megatron.core.inference.contexts import StaticInferenceContext

    model.eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        ctx = StaticInferenceContext(1, 64)
        logits, s = gen._prefill(image, ids, ctx)
        ctx.sequence_len_offset += s
        steps = [5, 9, 11]
        for token in steps:
            logits = gen._lm(gen._embed(token, ctx.sequence_len_offset), ctx)
            ctx.sequence_len_offset += 1
        full, _ = gen._prefill(image, torch.tensor([prompt + steps]), None)
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_prompt_is_the_training_format_up_to_the_answer(info, template):
    question, answer = "What colour is the shape?", "red"
    turns = [
        {"from": "human", "value": f"<image>\n{question}"},
        {"from": "gpt", "value": answer},
    ]
    full = tokenize_conversation(turns, info, template)
    prompt = build_prompt(info, template, question, 1)  # placeholder added in front
    assert full.input_ids[: len(prompt)] == prompt
    assert full.labels[len(prompt)] != -100  # the answer starts right after the prompt
    assert all(label == -100 for label in full.labels[: len(prompt)])
    assert prompt.count(info.image_token_id) == 1
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        build_prompt(info, template, "<image> <image>", 1)


def test_stop_texts():
    assert stop_text("plain") == "\n"  # LLaVA's preprocess_plain ends captions with a newline
    assert stop_text("vicuna_v1") is None  # eos id
    assert stop_text("llama3") == "<|eot_id|>"
    assert stop_text("chatml") == "<|im_end|>"


def test_streaming_pieces_add_up_to_the_answer(model, info):
    cfg = model.cfg
    gen = Generator(model, info, "vicuna_v1")
    pieces: list[str] = []
    image = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    prompt = build_prompt(info, "vicuna_v1", "Describe it.", 1)
    out = gen.generate(image, prompt, max_new_tokens=16, on_text=pieces.append)
    assert "".join(pieces) == out.text
    assert len(pieces) > 1
    sampled = gen.generate(image, prompt, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    again = gen.generate(image, prompt, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    assert sampled.token_ids == again.token_ids  # seeded
