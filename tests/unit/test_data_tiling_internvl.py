"""InternVL dynamic tiling against transformers' PIL image processor (GotOcr2ImageProcessorPil).

Same tiles in the same order (the thumbnail last), normalised pixels within 1e-5, for images of
several aspect ratios and min/max tile counts; plus the grid choice's tie-break on its own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mm_megatron.config.model_config import TilingConfig
from mm_megatron.data.image import ImageTransform
from mm_megatron.data.tiling import build_tiler
from mm_megatron.data.tiling_internvl import candidate_grids, choose_grid

SIZE = 28
"""Tile side: small, so that the reference processor runs fast."""


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _reference(img, min_patches, max_patches):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )

    proc = GotOcr2ImageProcessorPil(
        size={"height": SIZE, "width": SIZE},
        crop_to_patches=True,
        min_patches=min_patches,
        max_patches=max_patches,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    out = proc(images=[img], return_tensors="pt")
    return out["pixel_values"], int(out["num_patches"][0])


@pytest.mark.parametrize(
    ("width", "height", "min_patches", "max_patches"),
    [
        (100, 40, 1, 12),  # wide: 2.5 -> a 5x2 grid + thumbnail
        (30, 90, 1, 12),  # tall
        (64, 64, 1, 6),  # square: the tie-break picks more tiles while the image is large
        (20, 20, 1, 12),  # small square: one tile, no thumbnail
        (90, 50, 2, 4),  # min_patches forbids 1x1
        (70, 30, 1, 1),  # max_patches 1: one resized tile
    ],
)
def test_tiles_match_transformers(width, height, min_patches, max_patches):
    img = _image(width, height, seed=width * height)
    transform = ImageTransform(SIZE, norm="imagenet")
    tiler = build_tiler(
        TilingConfig(type="internvl_dynamic", min_patches=min_patches, max_patches=max_patches),
        transform,
    )
    tiled = tiler(img)
    want, n = _reference(img, min_patches, max_patches)
    assert tiled.geometry.num_tiles == tiled.tiles.shape[0] == n == want.shape[0]
    got = torch.from_numpy(transform.normalize_pixels(tiled.tiles))  # [t, 3, S, S]
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


def test_grid_choice_and_tie_break():
    assert candidate_grids(1, 4)[:3] == ((1, 1), (1, 2), (2, 1))
    assert choose_grid(100, 40, 28, 1, 12) == (5, 2)
    # 1:1 ties between 1x1 and 2x2: a large image takes 2x2, one under half its area keeps 1x1
    assert choose_grid(64, 64, 28, 1, 4) == (2, 2)
    assert choose_grid(39, 39, 28, 1, 4) == (1, 1)
    assert choose_grid(40, 40, 28, 1, 4) == (2, 2)


def test_bad_tile_counts_name_the_field():
    with pytest.raises(ValueError, match="min_patches=5, max_patches=4"):
        build_tiler(
            TilingConfig(type="internvl_dynamic", min_patches=5, max_patches=4),
            ImageTransform(SIZE),
        )
