"""The batch contract between the data pipeline and the model, and a checker for it.

What this file does: documents the keys, dtypes and shapes of one collated micro batch and checks a
batch against them (`validate_batch`). The model side imports it; the data side calls it in tests.
It has no dependency on the rest of `mm_megatron.data`.

What it does not do: build batches (`collate.py`), move them to a device, or expand image
placeholders (the model does that).

Contract (all CPU tensors; b = rows in the micro batch, s = text length after padding):

- `images` float32 [N_total, 3, H, W]: every image of the batch, in the order their placeholders
  appear when reading `input_ids` row-major; normalised. N_total may be 0 ([0, 3, H, W]).
- `num_images` int64 [b]: images per row; equals the count of `image_token_id` in that row of
  `input_ids` (0 for text-only rows).
- `input_ids` int64 [b, s]: ONE `image_token_id` per image; right-padded with the pad id.
- `labels` int64 [b, s]: UNSHIFTED (the model shifts): `labels[i, t] == input_ids[i, t]` where the
  loss applies (assistant turns and their end token; the caption + eos for `plain`), -100
  elsewhere. Placeholders and padding are always -100, and so is the first token of every
  (sub-)sequence, so the shift never puts loss across a packing boundary.
- `seq_lens` int64 [b, k]: only when packing is on: text lengths of the packed sub-sequences of
  each row, zero-padded on the right; each row sums to <= s. Absent without packing.
- `sample_keys` list[str]: webdataset `__key__` of every sample, row-major (one per row without
  packing, one per sub-sequence with packing).

The length the language model sees for a row is its expanded length:
`text_len - n_placeholders + n_images * tokens_per_image` (`expanded_length`).
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100
"""Label value meaning "no loss at this position" (torch's cross-entropy default)."""

REQUIRED_KEYS = ("images", "num_images", "input_ids", "labels", "sample_keys")
"""Keys every batch has; `seq_lens` is added when packing is on."""


class BatchContractError(ValueError):
    """A batch does not follow the contract in this module's docstring."""


def expanded_length(text_len: int, num_images: int, tokens_per_image: int) -> int:
    """Sequence length after the model replaces each placeholder by its image embeddings.

    Args:
        text_len: Number of text tokens, placeholders included.
        num_images: Number of image placeholders in the text.
        tokens_per_image: Embeddings the model inserts for one image.
    """
    return text_len - num_images + num_images * tokens_per_image


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise BatchContractError(message)


def _check_tensor(batch: dict[str, Any], key: str, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    value = batch[key]
    _check(isinstance(value, torch.Tensor), f"batch[{key!r}] must be a tensor, got {type(value)}")
    _check(value.dtype == dtype, f"batch[{key!r}] must be {dtype}, got {value.dtype}")
    _check(value.dim() == ndim, f"batch[{key!r}] must have {ndim} dims, got {tuple(value.shape)}")
    _check(value.device.type == "cpu", f"batch[{key!r}] must be on the CPU, got {value.device}")
    return value


def _check_seq_lens(batch: dict[str, Any], labels: torch.Tensor, keys: list[str]) -> None:
    seq_lens = _check_tensor(batch, "seq_lens", torch.long, 2)
    b, s = labels.shape
    _check(seq_lens.shape[0] == b, f"seq_lens has {seq_lens.shape[0]} rows, input_ids has {b}")
    _check(bool((seq_lens >= 0).all()), "seq_lens has negative entries")
    totals = seq_lens.sum(dim=1)
    _check(bool((totals <= s).all()), f"seq_lens rows sum to {totals.tolist()} > text length {s}")
    num_subsequences = 0
    for row in range(b):
        lengths = seq_lens[row].tolist()
        used = [n for n in lengths if n > 0]
        _check(lengths[: len(used)] == used, f"row {row}: seq_lens must be left-aligned: {lengths}")
        start = 0
        for n in used:
            _check(
                int(labels[row, start]) == IGNORE_INDEX,
                f"row {row}: the first token of the sub-sequence at {start} has a label",
            )
            start += n
        _check(
            bool((labels[row, start:] == IGNORE_INDEX).all()),
            f"row {row}: padding after the packed sub-sequences has labels",
        )
        num_subsequences += len(used)
    _check(
        len(keys) == num_subsequences,
        f"sample_keys has {len(keys)} entries for {num_subsequences} packed sub-sequences",
    )


def validate_batch(
    batch: dict[str, Any], image_token_id: int, *, image_size: int | None = None
) -> None:
    """Raise `BatchContractError` unless `batch` follows the contract in the module docstring.

    Args:
        batch: A collated micro batch.
        image_token_id: The id of the one-token image placeholder.
        image_size: If given, images must be `image_size` x `image_size`.
    """
    _check(isinstance(batch, dict), f"a batch must be a dict, got {type(batch)}")
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    _check(not missing, f"batch lacks keys {missing}; it has {sorted(batch)}")
    images = _check_tensor(batch, "images", torch.float32, 4)
    num_images = _check_tensor(batch, "num_images", torch.long, 1)
    input_ids = _check_tensor(batch, "input_ids", torch.long, 2)
    labels = _check_tensor(batch, "labels", torch.long, 2)
    b, _ = input_ids.shape
    _check(labels.shape == input_ids.shape, f"labels {labels.shape} != input_ids {input_ids.shape}")
    _check(num_images.shape == (b,), f"num_images must be [{b}], got {tuple(num_images.shape)}")
    _check(images.shape[1] == 3, f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    if image_size is not None:
        _check(
            tuple(images.shape[2:]) == (image_size, image_size),
            f"images must be {image_size}x{image_size}, got {tuple(images.shape[2:])}",
        )
    total = int(num_images.sum())
    _check(images.shape[0] == total, f"{images.shape[0]} images for num_images summing to {total}")
    _check(bool(torch.isfinite(images).all()), "images contain NaN or inf")

    is_placeholder = input_ids == image_token_id
    per_row = is_placeholder.sum(dim=1)
    _check(
        torch.equal(per_row, num_images),
        f"placeholders per row {per_row.tolist()} != num_images {num_images.tolist()}",
    )
    has_label = labels != IGNORE_INDEX
    _check(
        bool((labels[has_label] == input_ids[has_label]).all()),
        "labels must equal input_ids where they are not -100 (labels are unshifted)",
    )
    _check(not bool((has_label & is_placeholder).any()), "image placeholders must have label -100")

    keys = batch["sample_keys"]
    _check(
        isinstance(keys, list) and all(isinstance(k, str) for k in keys),
        "sample_keys must be a list of str",
    )
    if "seq_lens" in batch:
        _check_seq_lens(batch, labels, keys)
    else:
        _check(len(keys) == b, f"sample_keys has {len(keys)} entries for {b} rows")
        if b:
            _check(
                bool((labels[:, 0] == IGNORE_INDEX).all()), "the first token of a row has a label"
            )
