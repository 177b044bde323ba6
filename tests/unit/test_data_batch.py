"""The batch contract checker: a valid batch passes, each kind of violation is named."""

from __future__ import annotations

import copy

import pytest
import torch

from mm_megatron.data.batch import BatchContractError, expanded_length, validate_batch

IMG = 9
PAD = 0


def _batch(packed: bool = False) -> dict:
    # Row 0: [bos, img, 5, 6, eos] with loss on 6, eos; row 1: text only, padded.
    input_ids = torch.tensor([[1, IMG, 5, 6, 2], [1, 7, 8, PAD, PAD]])
    labels = torch.tensor([[-100, -100, -100, 6, 2], [-100, -100, 8, -100, -100]])
    batch = {
        "images": torch.zeros(1, 3, 4, 4),
        "num_images": torch.tensor([1, 0]),
        "num_tiles": torch.tensor([1]),
        "image_tokens": torch.tensor([4]),
        "input_ids": input_ids,
        "labels": labels,
        "expanded_lens": torch.tensor([8, 3]),
        "sample_keys": ["a", "b"],
    }
    if packed:
        # Row 0 holds two sub-sequences [1, IMG] + [5, 6, 2]; row 1 one of length 3.
        batch["labels"] = torch.tensor([[-100, -100, -100, 6, 2], [-100, -100, 8, -100, -100]])
        batch["seq_lens"] = torch.tensor([[2, 3], [3, 0]])
        batch["sample_keys"] = ["a", "b", "c"]
        batch["expanded_lens"] = torch.tensor([5, 3, 3])
    return batch


@pytest.mark.parametrize("packed", [False, True])
def test_valid_batch_passes(packed):
    validate_batch(_batch(packed), IMG, image_size=4)


def _broken(packed: bool, edit) -> dict:
    batch = copy.deepcopy(_batch(packed))
    edit(batch)
    return batch


@pytest.mark.parametrize(
    "packed, edit, message",
    [
        (False, lambda b: b.pop("labels"), "lacks keys"),
        (False, lambda b: b.update(input_ids=b["input_ids"].int()), "must be torch.int64"),
        (False, lambda b: b.update(images=torch.zeros(2, 3, 4, 4)), "2 image tiles"),
        (False, lambda b: b.update(num_tiles=torch.tensor([2])), "num_tiles summing to 2"),
        (False, lambda b: b.update(image_tokens=torch.tensor([4, 4])), "image_tokens must be"),
        (False, lambda b: b.update(image_tokens=torch.tensor([0])), "must be >= 1"),
        (False, lambda b: b.update(expanded_lens=torch.tensor([8])), "one per sample"),
        (False, lambda b: b.update(expanded_lens=torch.tensor([9, 3])), "do not fit"),
        (True, lambda b: b.update(expanded_lens=torch.tensor([6, 3, 3])), "!= seq_lens"),
        (True, lambda b: b.update(image_tokens=torch.tensor([5])), "!= seq_lens"),
        (False, lambda b: b.update(num_images=torch.tensor([0, 1])), "placeholders per row"),
        (False, lambda b: b["labels"].__setitem__((0, 2), 99), "labels must equal input_ids"),
        (False, lambda b: b["labels"].__setitem__((0, 1), IMG), "placeholders must have label"),
        (False, lambda b: b["labels"].__setitem__((1, 0), 1), "first token of a row"),
        (False, lambda b: b.update(sample_keys=["a"]), "sample_keys has 1"),
        (False, lambda b: b["images"].__setitem__((0, 0, 0, 0), float("nan")), "NaN"),
        (True, lambda b: b.update(seq_lens=torch.tensor([[2, 4], [3, 0]])), "sum to"),
        (True, lambda b: b.update(seq_lens=torch.tensor([[0, 2], [3, 0]])), "left-aligned"),
        (True, lambda b: b.update(seq_lens=torch.tensor([[3, 2], [3, 0]])), "has a label"),
        (True, lambda b: b.update(sample_keys=["a", "b"]), "packed sub-sequences"),
    ],
)
def test_violations_are_named(packed, edit, message):
    with pytest.raises(BatchContractError, match=message):
        validate_batch(_broken(packed, edit), IMG, image_size=4)


def test_wrong_image_size_and_expanded_length():
    with pytest.raises(BatchContractError, match="must be 8x8"):
        validate_batch(_batch(), IMG, image_size=8)
    assert expanded_length(text_len=5, image_tokens=[576]) == 580
    assert expanded_length(text_len=9, image_tokens=[576, 144]) == 9 - 2 + 720
