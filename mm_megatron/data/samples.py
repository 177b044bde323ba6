"""One raw webdataset sample -> a model-ready `Example`, or the reason it is bad.

What this file does: parses the sample's JSON record, tokenizes its conversation with a chat
template, checks that placeholders match images and that some token carries a loss (first, so
such samples cost no decoding), then decodes each image, cuts it into tiles with the model's
tiling scheme (`tiling.py`; `sample_tiler` picks the scheme's multi-image tiler, if it has one,
for a sample with several images), sizes it with the model's `ImageTokenCounter`, and checks
that the expanded length fits. Every failure that is the data's fault raises `BadSampleError`
with one of `BAD_REASONS`; the reader turns it into a `BadSample` that the loader counts and
logs.

What it does not do: read tar files, order samples, or batch them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from mm_megatron.config.model_config import TilingConfig
from mm_megatron.data.batch import IGNORE_INDEX, ImageGeometry, expanded_length
from mm_megatron.data.config import DataConfig
from mm_megatron.data.image import ImageDecodeError, ImageTransform, decode_image
from mm_megatron.data.shards import IMAGE_EXTENSIONS
from mm_megatron.data.templates import TemplateError, tokenize_conversation
from mm_megatron.data.tiling import PlaceholderImages, Tiler, build_tiler, sample_tiler

BAD_REASONS = (
    "broken_json",
    "broken_record",
    "empty_conversation",
    "placeholder_mismatch",
    "missing_image",
    "corrupt_image",
    "too_long",
    "no_loss_tokens",
    "unreadable_shard",
)
"""Names of the bad-sample counters."""


class BadSampleError(ValueError):
    """A sample the pipeline must skip; `reason` is one of `BAD_REASONS`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        """Counter name from `BAD_REASONS`."""
        self.detail = detail
        """Human-readable explanation."""


@dataclass
class Example:
    """A tokenized sample with its images, ready to batch.

    Arrays are numpy, not torch: DataLoader workers pickle them through the result pipe, which
    for one sample is far cheaper than torch's per-tensor shared-memory file descriptors.
    """

    key: str
    """webdataset `__key__`."""

    shard: str
    """Path of the shard it came from."""

    position: int
    """Position in this rank's sample stream (bad samples count too)."""

    input_ids: np.ndarray
    """int64 [s_text], one image token per image."""

    labels: np.ndarray
    """int64 [s_text], unshifted, -100 where no loss applies."""

    images: np.ndarray
    """uint8 [n_tiles, H, W, 3] (n_tiles may be 0): squared and resized, not yet normalised
    (`collate_rows` normalises them into the batch); each image's tiles are consecutive."""

    num_tiles: np.ndarray
    """int64 [n_images]: encoder tiles of each image (a tiling scheme with a text layout makes
    every tile its own placeholder, so n_images counts placeholders)."""

    image_tokens: np.ndarray
    """int64 [n_images]: embeddings each image's placeholder expands into (the model's count)."""

    expanded_len: int
    """Length after image expansion: s_text - n_images + sum(image_tokens)."""

    image_sizes: np.ndarray
    """int64 [n_images, 2]: original (height, width) of each image (anyres unpads by it)."""


@dataclass
class BadSample:
    """Marks a skipped sample so that the stream keeps its positions."""

    key: str
    """webdataset `__key__` (or `?` when unknown)."""

    shard: str
    """Path of the shard it came from."""

    position: int
    """Position in this rank's sample stream."""

    reason: str
    """One of `BAD_REASONS`."""

    detail: str
    """Human-readable explanation."""


def _record_images(record: dict[str, Any]) -> list[str]:
    images = record.get("images")
    if images is None:
        image = record.get("image")
        images = [] if image is None else [image]
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise BadSampleError("broken_record", f"`images` must be a list of str, got {images!r}")
    return images


@dataclass(frozen=True)
class SampleProcessor:
    """Turns the members of one sample into an `Example` (see the module docstring)."""

    tokenizer_info: Any
    """A `TokenizerInfo`."""

    template: str
    """Chat template name."""

    image_transform: ImageTransform
    """Square/resize/normalise transform."""

    max_seq_len: int
    """Longest allowed expanded length."""

    image_tokens: Callable[[ImageGeometry], int]
    """The model's image-token count (`mm_megatron.model.image_tokens.ImageTokenCounter`)."""

    system_prompt: str | None = None
    """System prompt override (None: template default)."""

    tiler: Tiler | None = None
    """Cuts one image into tiles (`tiling.py`); None: one square tile per image."""

    def __post_init__(self):
        if self.tiler is None:
            object.__setattr__(self, "tiler", build_tiler(None, self.image_transform))

    @classmethod
    def from_config(
        cls,
        data_config: DataConfig,
        tokenizer_info: Any,
        image_tokens: Callable[[ImageGeometry], int],
        tiling: TilingConfig | None = None,
    ) -> SampleProcessor:
        """The processor of a data config, a prepared tokenizer and the model's image facts.

        Args:
            data_config: Template, image and length settings.
            tokenizer_info: A `TokenizerInfo`.
            image_tokens: The model's `ImageTokenCounter`.
            tiling: The model's tiling scheme (None: one square tile per image).
        """
        transform = ImageTransform(
            data_config.image_size, data_config.image_aspect, data_config.image_norm
        )
        return cls(
            tokenizer_info=tokenizer_info,
            template=data_config.chat_template,
            image_transform=transform,
            max_seq_len=data_config.max_seq_len,
            image_tokens=image_tokens,
            system_prompt=data_config.system_prompt,
            tiler=build_tiler(tiling, transform),
        )

    def __call__(
        self, available: Collection[str], read: Callable[[str], bytes]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]:
        """Build `Example`'s fields after `position` (input_ids, labels, images, num_tiles,
        image_tokens, expanded_len) or raise `BadSampleError`.

        Args:
            available: Member extensions of the sample, e.g. {"json", "0.jpg"}.
            read: Returns the bytes of the member with a given extension.
        """
        if "json" not in available:
            raise BadSampleError("broken_json", f"no json member (members: {sorted(available)})")
        try:
            record = json.loads(read("json").decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadSampleError("broken_json", str(e)) from e
        if not isinstance(record, dict):
            raise BadSampleError("broken_record", f"record is a {type(record).__name__}")
        image_names = _record_images(record)
        info = self.tokenizer_info
        try:
            tokens = tokenize_conversation(
                record.get("conversations"), info, self.template, system_prompt=self.system_prompt
            )
        except TemplateError as e:
            raise BadSampleError(e.reason, str(e)) from e
        num_images = len(image_names)
        num_placeholders = sum(1 for t in tokens.input_ids if t == info.image_token_id)
        if num_placeholders != num_images:
            raise BadSampleError(
                "placeholder_mismatch", f"{num_placeholders} placeholders for {num_images} images"
            )
        if all(label == IGNORE_INDEX for label in tokens.labels):
            raise BadSampleError("no_loss_tokens", "no token has a label")

        images = PlaceholderImages()
        tiler = sample_tiler(self.tiler, num_images)  # OneVision: 1 tile each if several
        for i in range(num_images):
            ext = next((f"{i}.{e}" for e in IMAGE_EXTENSIONS if f"{i}.{e}" in available), None)
            if ext is None:
                raise BadSampleError("missing_image", f"no member for image {i} ({image_names[i]})")
            try:
                img = decode_image(read(ext))
                tiled = tiler(img)
            except ImageDecodeError as e:
                raise BadSampleError("corrupt_image", f"image {i} ({image_names[i]}): {e}") from e
            images.add(img, tiled, self.image_tokens, info)
        ids, labels = images.splice(tokens.input_ids, tokens.labels, info.image_token_id)
        num_tiles, image_tokens, image_sizes = (
            images.num_tiles,
            images.image_tokens,
            images.image_sizes,
        )
        tiles = images.tiles
        total = expanded_length(len(ids), image_tokens)
        if total > self.max_seq_len:
            raise BadSampleError("too_long", f"expanded length {total} > {self.max_seq_len}")
        size = self.image_transform.size
        pixels = (  # [sum(num_tiles), H, W, 3]
            np.concatenate(tiles) if tiles else np.zeros((0, size, size, 3), dtype=np.uint8)
        )
        return (
            np.asarray(ids, dtype=np.int64),
            np.asarray(labels, dtype=np.int64),
            pixels,
            np.asarray(num_tiles, dtype=np.int64),
            np.asarray(image_tokens, dtype=np.int64),
            total,
            np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2),
        )
