"""Collation: rows of `Example`s -> one batch dict following `batch.py`'s contract.

What this file does: concatenates the samples of each row (one sample per row without packing),
right-pads input_ids with the pad id and labels with -100 to the longest row, a fixed `pad_to`,
and/or a multiple, concatenates the images in row-major placeholder order and normalises them
(workers hand over uint8 pixels), carries every image's tile and token counts and every sample's
expanded length, and adds `seq_lens` when packing.

What it does not do: choose which samples share a row (`packing.py`) or check the result
(`batch.validate_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mm_megatron.data.batch import IGNORE_INDEX
from mm_megatron.data.image import ImageTransform
from mm_megatron.data.samples import Example


def padded_length(longest: int, pad_to: int | None, pad_to_multiple_of: int) -> int:
    """Text length of the batch: `pad_to` (or the longest row) rounded up to the multiple.

    Args:
        longest: Longest row, in text tokens.
        pad_to: Fixed length, or None to use `longest`.
        pad_to_multiple_of: Round up to a multiple of this.
    """
    if pad_to is not None and longest > pad_to:
        raise ValueError(f"a row has {longest} text tokens, more than pad_to={pad_to}")
    length = longest if pad_to is None else pad_to
    return -(-length // pad_to_multiple_of) * pad_to_multiple_of


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def collate_rows(
    rows: Sequence[Sequence[Example]],
    *,
    pad_token_id: int,
    image_transform: ImageTransform,
    packed: bool,
    pad_to: int | None = None,
    pad_to_multiple_of: int = 1,
) -> dict:
    """Build a batch from rows of examples.

    Args:
        rows: One list of examples per row (exactly one example each when not packed).
        pad_token_id: Id that right-pads input_ids.
        image_transform: Normalises the examples' uint8 images (and gives the image size).
        packed: Add `seq_lens` (and allow several examples per row).
        pad_to: Fixed text length, or None for the longest row.
        pad_to_multiple_of: Round the text length up to a multiple of this.
    """
    if not packed and any(len(row) != 1 for row in rows):
        raise ValueError("without packing every row holds exactly one example")
    row_lengths = [sum(len(ex.input_ids) for ex in row) for row in rows]
    seq_len = padded_length(max(row_lengths, default=0), pad_to, pad_to_multiple_of)
    b = len(rows)
    input_ids = np.full((b, seq_len), pad_token_id, dtype=np.int64)  # [b, s]
    labels = np.full((b, seq_len), IGNORE_INDEX, dtype=np.int64)  # [b, s]
    num_images = np.zeros(b, dtype=np.int64)  # [b]
    num_tiles: list[np.ndarray] = []  # per example: [n_images]
    image_tokens: list[np.ndarray] = []  # per example: [n_images]
    image_sizes: list[np.ndarray] = [np.zeros((0, 2), dtype=np.int64)]  # per example: [n, 2]
    expanded_lens: list[int] = []  # per example
    seq_lens = np.zeros((b, max((len(row) for row in rows), default=0)), dtype=np.int64)  # [b, k]
    images: list[np.ndarray] = []
    keys: list[str] = []
    for r, row in enumerate(rows):
        start = 0
        for k, ex in enumerate(row):
            n = len(ex.input_ids)
            input_ids[r, start : start + n] = ex.input_ids
            labels[r, start : start + n] = ex.labels
            seq_lens[r, k] = n
            start += n
            num_images[r] += ex.image_tokens.shape[0]
            if ex.images.shape[0]:
                images.append(ex.images)
            num_tiles.append(ex.num_tiles)
            image_tokens.append(ex.image_tokens)
            image_sizes.append(ex.image_sizes)
            expanded_lens.append(ex.expanded_len)
            keys.append(ex.key)
    # numpy throughout: single-threaded copies, no torch intra-op thread contention.
    size = image_transform.size
    pixels = np.concatenate(images) if images else np.zeros((0, size, size, 3), dtype=np.uint8)
    batch = {
        "images": torch.from_numpy(image_transform.normalize_pixels(pixels)),  # [N, 3, H, W]
        "num_images": torch.from_numpy(num_images),
        "num_tiles": torch.from_numpy(_concat(num_tiles)),
        "image_tokens": torch.from_numpy(_concat(image_tokens)),
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "expanded_lens": torch.tensor(expanded_lens, dtype=torch.long),
        "image_sizes": torch.from_numpy(np.concatenate(image_sizes)),  # [N, 2]
        "sample_keys": keys,
    }
    if packed:
        batch["seq_lens"] = torch.from_numpy(seq_lens)
    return batch
