"""Chat templates: exact token layout and loss masks, decoded; tokenizer placeholder handling."""

from __future__ import annotations

import os

import pytest

from mm_megatron.data.batch import IGNORE_INDEX
from mm_megatron.data.synthetic import write_synthetic_dataset
from mm_megatron.data.templates import (
    VICUNA_SYSTEM,
    TemplateError,
    encode_texts,
    tokenize_conversation,
)
from mm_megatron.data.tokenizer import (
    TokenizerSetupError,
    load_tokenizer,
    prepare_tokenizer,
    train_tiny_tokenizer,
)

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat colour is the shape?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "What shape is it?"},
    {"from": "gpt", "value": "circle"},
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synth"))
    write_synthetic_dataset(out, n_train=40, n_val=0, image_size=16, shard_size=40, seed=1)
    return os.path.join(out, "tokenizer")


@pytest.fixture
def info(tokenizer_dir):
    return prepare_tokenizer(load_tokenizer(tokenizer_dir))


def _label_spans(tokens, tokenizer) -> list[str]:
    """Decoded runs of consecutive positions that carry a label."""
    spans, current = [], []
    for token, label in zip(tokens.input_ids, tokens.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(label)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def _check_common(tokens, info):
    assert len(tokens.input_ids) == len(tokens.labels)
    assert tokens.labels[0] == IGNORE_INDEX
    assert tokens.input_ids.count(info.image_token_id) == tokens.num_placeholders == 1
    at_image = tokens.input_ids.index(info.image_token_id)
    assert tokens.labels[at_image] == IGNORE_INDEX


def test_vicuna_v1(info):
    tokens = tokenize_conversation(CONVERSATION, info, "vicuna_v1")
    _check_common(tokens, info)
    tok = info.tokenizer
    assert tok.decode(tokens.input_ids) == (
        f"<s>{VICUNA_SYSTEM} USER: <image>\nWhat colour is the shape? ASSISTANT: red</s>"
        "USER: What shape is it? ASSISTANT: circle</s>"
    )
    assert tokens.input_ids[0] == info.bos_token_id
    assert _label_spans(tokens, tok) == [" red</s>", " circle</s>"]
    assert tokens.labels[-1] == info.eos_token_id


def test_llama3_markers_as_text_when_not_special(info):
    tokens = tokenize_conversation(CONVERSATION, info, "llama3")
    _check_common(tokens, info)
    tok = info.tokenizer
    assert tok.decode(tokens.input_ids) == (
        "<s><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat colour is the shape?"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat shape is it?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\ncircle<|eot_id|>"
    )
    assert _label_spans(tokens, tok) == ["red<|eot_id|>", "circle<|eot_id|>"]
    eot_pieces = encode_texts(tok, ["<|eot_id|>"])[0]
    assert len(eot_pieces) > 1  # spelled out: the tiny tokenizer has no such special token


def test_llama3_uses_special_tokens_when_present(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    markers = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer.add_tokens(markers, special_tokens=True)
    info = prepare_tokenizer(tokenizer)
    tokens = tokenize_conversation(CONVERSATION, info, "llama3")
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert tokens.input_ids.count(eot) == 4
    assert tokens.input_ids.count(tokenizer.convert_tokens_to_ids("<|start_header_id|>")) == 4
    # Each assistant turn ends with its one eot id, which carries a label.
    assert [tokens.labels[i] for i, t in enumerate(tokens.input_ids) if t == eot] == [
        IGNORE_INDEX,
        eot,
        IGNORE_INDEX,
        eot,
    ]
    assert _label_spans(tokens, tokenizer) == ["red<|eot_id|>", "circle<|eot_id|>"]


def test_chatml(info):
    tokens = tokenize_conversation(CONVERSATION, info, "chatml", system_prompt="Be brief.")
    _check_common(tokens, info)
    tok = info.tokenizer
    assert tok.decode(tokens.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWhat colour is the "
        "shape?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n<|im_start|>user\nWhat shape is "
        "it?<|im_end|>\n<|im_start|>assistant\ncircle<|im_end|>\n"
    )
    assert _label_spans(tokens, tok) == ["red<|im_end|>", "circle<|im_end|>"]
    assert tokens.labels[-1] == IGNORE_INDEX  # the newline after <|im_end|> has no loss


def test_plain_keeps_only_placeholders_and_caption(info):
    conversation = [
        {"from": "human", "value": "Describe the image briefly.\n<image>"},
        {"from": "gpt", "value": "a red circle on the left"},
    ]
    tokens = tokenize_conversation(conversation, info, "plain")
    _check_common(tokens, info)
    assert tokens.input_ids[:2] == [info.bos_token_id, info.image_token_id]
    assert info.tokenizer.decode(tokens.input_ids) == "<s><image>a red circle on the left\n"
    assert _label_spans(tokens, info.tokenizer) == ["a red circle on the left\n"]


def test_record_system_turn_and_multi_image(info):
    conversation = [
        {"from": "system", "value": "Answer in one word."},
        {"from": "human", "value": "<image>\n<image>\nSame colour?"},
        {"from": "gpt", "value": "no"},
    ]
    tokens = tokenize_conversation(conversation, info, "vicuna_v1")
    text = info.tokenizer.decode(tokens.input_ids)
    assert text.startswith("<s>Answer in one word. USER: <image>\n<image>\nSame colour?")
    assert tokens.num_placeholders == 2
    assert _label_spans(tokens, info.tokenizer) == [" no</s>"]


@pytest.mark.parametrize(
    "conversation, reason",
    [
        ([], "empty_conversation"),
        ([{"from": "human", "value": "hi"}], "empty_conversation"),
        ([{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}], "broken_record"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], "broken_record"),
        (
            [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>"}],
            "placeholder_mismatch",
        ),
    ],
)
def test_bad_conversations_raise_template_errors(info, conversation, reason):
    with pytest.raises(TemplateError) as e:
        tokenize_conversation(conversation, info, "vicuna_v1")
    assert e.value.reason == reason


def test_unknown_template_is_a_setup_error(info):
    with pytest.raises(ValueError, match="unknown chat template"):
        tokenize_conversation(CONVERSATION, info, "alpaca")


def test_backend_encoding_matches_tokenizer_call(info):
    texts = ["USER: What colour?", " red", "<|im_start|>user\n", "ünï <image> x"]
    expected = [info.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert encode_texts(info.tokenizer, texts) == expected


def test_image_token_is_added_when_missing(tmp_path):
    path = str(tmp_path / "tok")
    train_tiny_tokenizer(["a red circle", "what colour"] * 5, path, vocab_size=300)
    tokenizer = load_tokenizer(path)
    info = prepare_tokenizer(tokenizer, image_token="<img>")
    assert info.added_image_token
    assert info.vocab_size == len(tokenizer)
    assert tokenizer("a<img>b", add_special_tokens=False)["input_ids"].count(info.image_token_id)
    assert info.image_token_id == len(tokenizer) - 1


def test_missing_tokenizer_path_fails_clearly(tmp_path):
    with pytest.raises(TokenizerSetupError, match="not a directory"):
        load_tokenizer(str(tmp_path / "nope"))
