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


# Arrangements register themselves on import (one line per scheme).
import mm_megatron.model.anyres  # noqa: E402,F401
