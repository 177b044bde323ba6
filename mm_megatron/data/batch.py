"""The batch contract between the data pipeline and the model, and a checker for it.

What this file does: documents the keys, dtypes and shapes of one collated micro batch, checks a
batch against them (`validate_batch`), and defines `ImageGeometry`, the per-image facts that fix
an image's token count (`mm_megatron.model.image_tokens` turns a geometry into the count). The
loader's tests and `mm_megatron.model.image_tokens` import it. It has no dependency on the rest
of `mm_megatron.data`.

What it does not do: build batches (`collate.py`), move them to a device, or expand image
placeholders (the model does that).

Contract (all CPU tensors; b = rows in the micro batch, s = text length after padding):

- `images` float32 [N_tiles, 3, H, W]: every encoder tile of every image of the batch, images in
  the order their placeholders appear when reading `input_ids` row-major, each image's tiles
  consecutive; normalised. N_tiles may be 0 ([0, 3, H, W]).
- `num_images` int64 [b]: images per row; equals the count of `image_token_id` in that row of
  `input_ids` (0 for text-only rows).
- `num_tiles` int64 [N]: encoder tiles per image (1 without a tiling scheme); sums to N_tiles.
- `image_tokens` int64 [N]: embeddings each image's placeholder expands into, computed by the
  model's `ImageTokenCounter` from the image's `ImageGeometry`.
- `expanded_lens` int64 [n_samples]: each sample's length after expansion (`expanded_length`),
  row-major, one per `sample_keys` entry; computed once, in the sample processor.
- `input_ids` int64 [b, s]: ONE `image_token_id` per image; right-padded with the pad id.
- `labels` int64 [b, s]: UNSHIFTED (the model shifts): `labels[i, t] == input_ids[i, t]` where the
  loss applies (assistant turns and their end token; the caption + eos for `plain`), -100
  elsewhere. Placeholders and padding are always -100, and so is the first token of every
  (sub-)sequence, so the shift never puts loss across a packing boundary.
- `image_sizes` int64 [N, 2]: each image's original (height, width) in pixels (the anyres model
  unpads its tile grid by it). The data pipeline always adds it; hand-built batches without a
  tiling arrangement may leave it out.
- `seq_lens` int64 [b, k]: only when packing is on: text lengths of the packed sub-sequences of
  each row, zero-padded on the right; each row sums to <= s. Absent without packing.
- `sample_keys` list[str]: webdataset `__key__` of every sample, row-major (one per row without
  packing, one per sub-sequence with packing).

The length the language model sees for a sample is its expanded length:
`text_len - n_images + sum(image_tokens)` (`expanded_length`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
"""Label value meaning "no loss at this position" (torch's cross-entropy default)."""

REQUIRED_KEYS = (
    "images",
    "num_images",
    "num_tiles",
    "image_tokens",
    "input_ids",
    "labels",
    "expanded_lens",
    "sample_keys",
)
"""Keys every batch has; `seq_lens` is added when packing is on."""


class BatchContractError(ValueError):
    """A batch does not follow the contract in this module's docstring."""


@dataclass(frozen=True)
class ImageGeometry:
    """How one image reaches the encoder: what its token count depends on besides the model."""

    num_tiles: int = 1
    """Encoder passes (tiles) for this image; 1 without a tiling scheme."""

    newline_rows: int = 0
    """Row-separator embeddings the model appends (tiling schemes that mark grid rows)."""

    image_size: tuple[int, int] | None = None
    """Original (height, width) in pixels, for schemes whose count depends on it (anyres
    unpadding); None otherwise."""


def expanded_length(text_len: int, image_tokens: Sequence[int]) -> int:
    """Sequence length after the model replaces each placeholder by its image embeddings.

    Args:
        text_len: Number of text tokens, placeholders included.
        image_tokens: Embeddings the model inserts for each image of the sample.
    """
    return text_len - len(image_tokens) + sum(image_tokens)


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


def _check_expanded_lens(
    batch: dict[str, Any],
    is_placeholder: torch.Tensor,
    image_tokens: torch.Tensor,
    text_lens: torch.Tensor | None,
    num_samples: int,
) -> None:
    """`expanded_lens` must equal text length - placeholders + image tokens, per sample."""
    expanded = _check_tensor(batch, "expanded_lens", torch.long, 1)
    _check(
        expanded.shape == (num_samples,),
        f"expanded_lens must be [{num_samples}] (one per sample), got {tuple(expanded.shape)}",
    )
    b, s = is_placeholder.shape
    if text_lens is None:  # one sample per row
        ends = torch.full((b,), s, dtype=torch.long)
    else:
        ends = torch.cumsum(batch["seq_lens"], 1)[batch["seq_lens"] > 0]  # [n_samples]
    rows = torch.arange(b)[:, None].expand(b, s)
    cols = torch.arange(s)[None].expand(b, s)
    img_row, img_col = rows[is_placeholder], cols[is_placeholder]  # image order
    # sample index of every image: rows before it, plus sub-sequences of its row ending before it
    if text_lens is None:
        sample_of_image = img_row
    else:
        row_of_sample = rows[:, : batch["seq_lens"].shape[1]][batch["seq_lens"] > 0]
        before = (row_of_sample[None] < img_row[:, None]) | (
            (row_of_sample[None] == img_row[:, None]) & (ends[None] <= img_col[:, None])
        )
        sample_of_image = before.sum(1)
    extra = torch.zeros(num_samples, dtype=torch.long)
    extra.index_add_(0, sample_of_image, image_tokens - 1)
    implied_text = expanded - extra  # [n_samples]
    if text_lens is None:
        _check(
            bool(((implied_text >= 1) & (implied_text <= s)).all()),
            f"expanded_lens {expanded.tolist()} do not fit rows of {s} text tokens with image "
            f"tokens {image_tokens.tolist()}",
        )
    else:
        _check(
            torch.equal(implied_text, text_lens),
            f"expanded_lens {expanded.tolist()} != seq_lens {text_lens.tolist()} expanded by "
            f"image tokens {image_tokens.tolist()}",
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
    num_tiles = _check_tensor(batch, "num_tiles", torch.long, 1)
    image_tokens = _check_tensor(batch, "image_tokens", torch.long, 1)
    for key, value in (("num_tiles", num_tiles), ("image_tokens", image_tokens)):
        _check(value.shape == (total,), f"{key} must be [{total}], got {tuple(value.shape)}")
        _check(bool((value >= 1).all()), f"{key} must be >= 1, got {value.tolist()}")
    if "image_sizes" in batch:
        sizes = _check_tensor(batch, "image_sizes", torch.long, 2)
        _check(sizes.shape == (total, 2), f"image_sizes must be [{total}, 2], got {sizes.shape}")
        _check(bool((sizes >= 1).all()), f"image_sizes must be >= 1, got {sizes.tolist()}")
    tiles = int(num_tiles.sum())
    _check(
        images.shape[0] == tiles, f"{images.shape[0]} image tiles for num_tiles summing to {tiles}"
    )
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
        text_lens = batch["seq_lens"][batch["seq_lens"] > 0]  # [n_samples], row-major
    else:
        _check(len(keys) == b, f"sample_keys has {len(keys)} entries for {b} rows")
        if b:
            _check(
                bool((labels[:, 0] == IGNORE_INDEX).all()), "the first token of a row has a label"
            )
        text_lens = None
    _check_expanded_lens(batch, is_placeholder, image_tokens, text_lens, len(keys))
