"""Cutting one image into encoder tiles: the registry of tiling schemes.

What this file does: defines what a tiling scheme hands the rest of the pipeline (`TiledImage`:
uint8 tiles plus the `ImageGeometry` the model's `ImageTokenCounter` needs), the registry that
finds a scheme by `TilingConfig.type` (`@register_tiler`, `build_tiler`), and the `none` scheme:
one square tile per image, squared by `ImageTransform` (pad, resize or crop).

A scheme is a factory `(tiling: TilingConfig, transform: ImageTransform) -> tiler`, where the
tiler maps one RGB pillow image to a `TiledImage`. Tilers run in DataLoader workers, so they must
be picklable (a frozen dataclass with `__call__`, not a closure). Every tile of a batch has the
transform's size: `collate_rows` stacks them. Schemes that cut images into grids (anyres,
dynamic tiles, slices) live in their own modules and register here by import.

What it does not do: decode bytes, normalise (tiles stay uint8 until `collate_rows`), or count
tokens (`mm_megatron.model.image_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mm_megatron.config.model_config import TilingConfig
from mm_megatron.config.registry import Registry
from mm_megatron.data.batch import ImageGeometry
from mm_megatron.data.image import ImageTransform


@dataclass(frozen=True)
class TiledImage:
    """One image as the encoder sees it."""

    tiles: np.ndarray
    """uint8 [t, H, W, 3], not normalised, in the order the model consumes them."""

    geometry: ImageGeometry
    """What the image's token count depends on (tiles, row separators, ...)."""


Tiler = Callable[[Image.Image], TiledImage]
"""RGB pillow image -> `TiledImage`."""

TilerFactory = Callable[[TilingConfig, ImageTransform], Tiler]

TILERS: Registry[TilerFactory] = Registry("model.tiling.type")
"""`TilingConfig.type` -> factory of its tiler."""


def register_tiler(name: str) -> Callable[[TilerFactory], TilerFactory]:
    """Decorator adding a tiler factory under `name`."""
    return TILERS.register(name)


def build_tiler(tiling: TilingConfig | None, transform: ImageTransform) -> Tiler:
    """The tiler of `tiling` (None: `none`); ValueError lists the registered schemes."""
    tiling = tiling or TilingConfig()
    return TILERS.lookup(tiling.type)(tiling, transform)


@dataclass(frozen=True)
class SingleTile:
    """One square tile per image (LLaVA-1.5)."""

    transform: ImageTransform
    """Squares and resizes the image."""

    def __call__(self, img: Image.Image) -> TiledImage:
        tile = np.asarray(self.transform.square(img))  # [H, W, 3]
        return TiledImage(tiles=tile[None], geometry=ImageGeometry(num_tiles=1))


@register_tiler("none")
def single_tile(tiling: TilingConfig, transform: ImageTransform) -> Tiler:
    """Every image becomes one tile of the encoder's size."""
    del tiling
    return SingleTile(transform)
