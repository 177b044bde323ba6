"""How many language-model embeddings one image becomes: the single source of that number.

An image reaches the LM as ``num_tiles`` encoder passes (one for a plain LLaVA-1.5 image; more
for tiling schemes), each giving ``vision.num_output_tokens`` features that the projector turns
into ``Projector.num_output_tokens(...)`` embeddings, plus ``newline_rows`` learned separator
embeddings (one per tile-grid row, for schemes that mark rows). :class:`ImageTokenCounter` is that
formula. The data pipeline calls it (through the callable the trainer hands to
``build_dataloader``) for every image to size its sample, and the model calls the same object to
expand placeholders when a batch does not carry the counts; so data and model cannot disagree.

A tiling scheme whose count depends on more than the tile count (anyres unpads its grid to the
image's aspect ratio) registers an *arrangement* with ``@register_arrangement("tiling type")``:
an object with ``num_tokens(geometry) -> int`` and ``arrange(...)`` (the model's reassembly of
one image's tile features). The counter then asks it; the model calls the same object.

What it does not do: decide how an image is tiled (the data pipeline does, and reports the result
as an :class:`~mm_megatron.data.batch.ImageGeometry`), or build anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.config.registry import Registry
from mm_megatron.data.batch import ImageGeometry
from mm_megatron.model.projector import projector_class

ONE_TILE = ImageGeometry()
"""A plain image: one encoder pass, no row separators."""

ARRANGEMENTS: Registry[Callable[[LlavaConfig], Any]] = Registry("model.tiling.type")
"""tiling type -> factory ``(cfg) -> arrangement`` for schemes that reassemble tile features."""


def register_arrangement(tiling_type: str):
    """Decorator adding an arrangement factory for ``tiling.type == tiling_type``."""
    return ARRANGEMENTS.register(tiling_type)


def tile_arrangement(cfg: LlavaConfig) -> Any:
    """The arrangement of ``cfg.tiling.type``, or None when tiles are used as they come."""
    factory = ARRANGEMENTS.get(cfg.tiling.type)
    return None if factory is None else factory(cfg)


@dataclass(frozen=True)
class ImageTokenCounter:
    """``counter(geometry) -> embeddings for that image`` (picklable: data workers call it).

    Build it with :meth:`from_config`; the fields are the model's per-tile facts.
    """

    tokens_per_tile: int
    """LM embeddings from one encoder pass (after the projector)."""

    arrangement: Any = None
    """The tiling scheme's arrangement (see the module docstring), or None: then the count is
    tiles x ``tokens_per_tile`` + row separators."""

    @classmethod
    def from_config(cls, cfg: LlavaConfig) -> ImageTokenCounter:
        """The counter of model ``cfg`` (ValueError if its projector does not fit its encoder)."""
        proj = projector_class(cfg.projector.type)
        tokens_in = cfg.vision.num_output_tokens
        proj.check(cfg.projector, tokens_in)
        return cls(
            tokens_per_tile=proj.num_output_tokens(cfg.projector, tokens_in),
            arrangement=tile_arrangement(cfg),
        )

    def __call__(self, geometry: ImageGeometry = ONE_TILE) -> int:
        if self.arrangement is not None:
            return self.arrangement.num_tokens(geometry)
        return geometry.num_tiles * self.tokens_per_tile + geometry.newline_rows


def image_token_count(cfg: LlavaConfig, geometry: ImageGeometry = ONE_TILE) -> int:
    """Embeddings one image of ``geometry`` becomes in model ``cfg``."""
    return ImageTokenCounter.from_config(cfg)(geometry)


@dataclass(frozen=True)
class RepresentativeImage:
    """The image that benchmarks, the planner and ``model flops`` size a model by.

    A square RGB image of ``side`` pixels, cut by the model's own tiling scheme and counted by its
    own ``ImageTokenCounter``, laid out per placeholder as the data pipeline does (a scheme with
    separator text gives every tile its own placeholder; the separators count as text).
    """

    side: int
    """Side of the square image in pixels."""
    tile_size: int
    """Side of one encoder tile in pixels."""
    tiles_per_placeholder: tuple[int, ...]
    """Encoder tiles behind each placeholder the image puts into the text."""
    tokens_per_placeholder: tuple[int, ...]
    """LM embeddings each of those placeholders expands into."""

    @property
    def tiles(self) -> int:
        """Encoder passes for the image."""
        return sum(self.tiles_per_placeholder)

    @property
    def placeholders(self) -> int:
        """Placeholders the image puts into the text."""
        return len(self.tokens_per_placeholder)

    @property
    def tokens(self) -> int:
        """LM embeddings of the whole image."""
        return sum(self.tokens_per_placeholder)


def representative_image(cfg: LlavaConfig, side: int | None = None) -> RepresentativeImage:
    """The model's representative image (default side: the input size without a tiling scheme,
    twice it with one, e.g. 672 px for LLaVA-NeXT: a 2x2 grid plus the base image)."""
    from PIL import Image

    from mm_megatron.data.image import ImageTransform
    from mm_megatron.data.tiling import build_tiler

    size = cfg.vision.input_image_size
    side = side or (size if cfg.tiling.type == "none" else 2 * size)
    tiled = build_tiler(cfg.tiling, ImageTransform(size))(Image.new("RGB", (side, side)))
    count = ImageTokenCounter.from_config(cfg)
    n = tiled.tiles.shape[0]
    if tiled.layout is None:
        tiles, tokens = (n,), (count(tiled.geometry),)
    else:
        tiles, tokens = (1,) * n, (count(ImageGeometry(num_tiles=1)),) * n
    return RepresentativeImage(side, int(tiled.tiles.shape[1]), tiles, tokens)


# Arrangements register themselves on import (one line per scheme).
import mm_megatron.model.anyres  # noqa: E402,F401
