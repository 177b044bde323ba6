"""Cutting one image into encoder tiles: the registry of tiling schemes.

What this file does: defines what a tiling scheme hands the rest of the pipeline (`TiledImage`:
uint8 tiles plus the `ImageGeometry` the model's `ImageTokenCounter` needs), the registry that
finds a scheme by `TilingConfig.type` (`@register_tiler`, `build_tiler`), and the `none` scheme:
one square tile per image, squared by `ImageTransform` (pad, resize or crop).

A scheme is a factory `(tiling: TilingConfig, transform: ImageTransform) -> tiler`, where the
tiler maps one RGB pillow image to a `TiledImage`. Tilers run in DataLoader workers, so they must
be picklable (a frozen dataclass with `__call__`, not a closure). Every tile of a batch has the
transform's size: `collate_rows` stacks them. Schemes that cut images into grids (anyres,
dynamic tiles, slices) live in their own modules and register here by import. A scheme that
puts separator tokens between its tiles returns a text `layout`, one that puts text around an
image's tokens a `wrap`; `PlaceholderImages` collects a
sample's tiled images per placeholder and splices the layouts into its token ids, for training
and generation alike.

Multi-image samples: a tiler may carry a `multi_image` attribute, the tiler for every image of a
sample with more than one image. `build_tiler` gives one when `TilingConfig.
multi_image_single_tile` is set (LLaVA-OneVision: one square tile, padded with the mean colour as
`ImageTransform(aspect="pad")` does, whatever `data.image_aspect` says), and `sample_tiler` picks
it; `SampleProcessor` and `infer.generate.model_image_inputs` both call `sample_tiler`.

What it does not do: decode bytes, normalise (tiles stay uint8 until `collate_rows`), or count
tokens (`mm_megatron.model.image_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from mm_megatron.config.model_config import TilingConfig
from mm_megatron.config.registry import Registry
from mm_megatron.data.batch import IGNORE_INDEX, ImageGeometry
from mm_megatron.data.image import ImageTransform
from mm_megatron.data.templates import encode_texts


@dataclass(frozen=True)
class TiledImage:
    """One image as the encoder sees it."""

    tiles: np.ndarray
    """uint8 [t, H, W, 3], not normalised, in the order the model consumes them."""

    geometry: ImageGeometry
    """What the image's token count depends on (tiles, row separators, ...)."""

    layout: tuple[str | None, ...] | None = None
    """Text that replaces the image's placeholder, for schemes with separator tokens between
    tiles (MiniCPM-V's slices): each string is tokenized into the prompt (no loss), each None is
    one tile's own placeholder (one per tile, in tile order), counted as a one-tile image. None:
    the image keeps its one placeholder for all its tiles."""

    wrap: tuple[str, str] | None = None
    """Text put before and after the image's one placeholder, which keeps all its tiles
    (InternVL's ``<img>`` ... ``</img>``); tokenized into the prompt with no loss. None: none."""


Tiler = Callable[[Image.Image], TiledImage]
"""RGB pillow image -> `TiledImage`."""

TilerFactory = Callable[[TilingConfig, ImageTransform], Tiler]

TILERS: Registry[TilerFactory] = Registry("model.tiling.type")
"""`TilingConfig.type` -> factory of its tiler."""


def register_tiler(name: str) -> Callable[[TilerFactory], TilerFactory]:
    """Decorator adding a tiler factory under `name`."""
    return TILERS.register(name)


def build_tiler(tiling: TilingConfig | None, transform: ImageTransform) -> Tiler:
    """The tiler of `tiling` (None: `none`); ValueError lists the registered schemes.

    With `tiling.multi_image_single_tile` it is a `MultiImageTiler` (see `sample_tiler`).
    """
    tiling = tiling or TilingConfig()
    tiler = TILERS.lookup(tiling.type)(tiling, transform)
    if tiling.multi_image_single_tile:
        padded = ImageTransform(transform.size, "pad", transform.norm)
        return MultiImageTiler(single=tiler, multi_image=SingleTile(padded))
    return tiler


def sample_tiler(tiler: Tiler, num_images: int) -> Tiler:
    """The tiler for each image of a sample with `num_images` images.

    `tiler.multi_image` when the sample has more than one image and the tiler has that
    attribute, else `tiler` itself.
    """
    multi = getattr(tiler, "multi_image", None)
    return multi if num_images > 1 and multi is not None else tiler


@dataclass(frozen=True)
class SingleTile:
    """One square tile per image (LLaVA-1.5)."""

    transform: ImageTransform
    """Squares and resizes the image."""

    def __call__(self, img: Image.Image) -> TiledImage:
        tile = np.asarray(self.transform.square(img))  # [H, W, 3]
        return TiledImage(tiles=tile[None], geometry=ImageGeometry(num_tiles=1))


@dataclass(frozen=True)
class MultiImageTiler:
    """A scheme's tiler plus the one for images of multi-image samples (picklable)."""

    single: Tiler
    """Tiles an image that is alone in its sample (and any image when called directly)."""

    multi_image: Tiler
    """Tiles each image of a sample with more than one image."""

    def __call__(self, img: Image.Image) -> TiledImage:
        return self.single(img)


@register_tiler("none")
def single_tile(tiling: TilingConfig, transform: ImageTransform) -> Tiler:
    """Every image becomes one tile of the encoder's size."""
    del tiling
    return SingleTile(transform)


def layout_token_ids(layout: tuple[str | None, ...], tokenizer_info: Any) -> list[int]:
    """A `TiledImage.layout` as token ids: its texts encoded, each None the placeholder id.

    Raises:
        ValueError: a text of the layout encodes to the placeholder id itself.
    """
    placeholder = tokenizer_info.image_token_id
    texts = iter(encode_texts(tokenizer_info.tokenizer, [p for p in layout if p is not None]))
    ids: list[int] = []
    for piece in layout:
        if piece is None:
            ids.append(placeholder)
            continue
        encoded = next(texts)
        if placeholder in encoded:
            raise ValueError(f"tiling marker {piece!r} contains the image placeholder token")
        ids += encoded
    return ids


@dataclass
class PlaceholderImages:
    """A sample's tiled images as the batch carries them: one entry per placeholder.

    Training (`SampleProcessor`) and generation (`infer.generate.model_image_inputs`) both fill
    one with `add` and put the layouts into their token ids with `splice`, so a prompt is laid out
    and counted exactly as a training sample.
    """

    tiles: list[np.ndarray] = field(default_factory=list)
    """Per image: uint8 [t, H, W, 3]."""
    num_tiles: list[int] = field(default_factory=list)
    """Per placeholder (a layout gives every tile its own placeholder)."""
    image_tokens: list[int] = field(default_factory=list)
    """Per placeholder: embeddings it expands into (the model's count)."""
    image_sizes: list[list[int]] = field(default_factory=list)
    """Per placeholder: original (height, width) of its image."""
    layouts: list[list[int] | None] = field(default_factory=list)
    """Per image: the layout's token ids, or None (the image keeps its one placeholder)."""

    def add(
        self,
        img: Image.Image,
        tiled: TiledImage,
        count: Callable[[ImageGeometry], int],
        tokenizer_info: Any,
    ) -> None:
        """Append one image (`tiled` is `img` through the tiler; `count` the model's counter)."""
        n = tiled.tiles.shape[0]
        self.tiles.append(tiled.tiles)
        if tiled.layout is None:
            self.num_tiles.append(n)
            self.image_tokens.append(count(tiled.geometry))
            self.image_sizes.append([img.height, img.width])
            wrap = tiled.wrap
            self.layouts.append(
                None if wrap is None else layout_token_ids((wrap[0], None, wrap[1]), tokenizer_info)
            )
        else:  # separator tokens between the tiles: one placeholder per tile
            self.num_tiles += [1] * n
            self.image_tokens += [count(ImageGeometry(num_tiles=1))] * n
            self.image_sizes += [[img.height, img.width]] * n
            self.layouts.append(layout_token_ids(tiled.layout, tokenizer_info))

    def splice(
        self, input_ids: list[int], labels: list[int], placeholder: int
    ) -> tuple[list[int], list[int]]:
        """The i-th placeholder replaced by the i-th image's layout (labels -100), if it has one."""
        if all(layout is None for layout in self.layouts):
            return input_ids, labels
        out_ids: list[int] = []
        out_labels: list[int] = []
        images = iter(self.layouts)
        for token, label in zip(input_ids, labels):
            layout = next(images) if token == placeholder else None
            if layout is None:
                out_ids.append(token)
                out_labels.append(label)
            else:
                out_ids += layout
                out_labels += [IGNORE_INDEX] * len(layout)
        return out_ids, out_labels


# Schemes in their own modules register on import (one line each).
from mm_megatron.data import (  # noqa: E402
    tiling_anyres,  # noqa: F401
    tiling_internvl,  # noqa: F401
    tiling_minicpm,  # noqa: F401
)
