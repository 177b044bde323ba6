"""Anyres tiling against transformers' PIL image processors (the behavioural reference).

LLaVA-NeXT's ``LlavaNextImageProcessorPil`` and LLaVA-OneVision's
``LlavaOnevisionImageProcessorPil`` (transformers also ships torchvision "fast" processors; the
PIL ones are the reference here): same tile count, normalised pixels within 1e-5, for images of
several aspect ratios, at a tiny tile size and at LLaVA-NeXT's real 336 px settings.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from mm_megatron.config.model_config import TilingConfig
from mm_megatron.config.presets_llava_next import LLAVA_NEXT_PINPOINTS
from mm_megatron.data.batch import ImageGeometry
from mm_megatron.data.image import ImageTransform
from mm_megatron.data.tiling import build_tiler

PINS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
SIZES = [(50, 90), (120, 40), (70, 70), (33, 101), (20, 30), (200, 64)]  # (height, width)


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _ours(img, pins, size, norm):
    transform = ImageTransform(size, "pad", norm)
    tiled = build_tiler(TilingConfig(type="anyres", grid_pinpoints=pins), transform)(img)
    return transform.normalize_pixels(tiled.tiles), tiled.geometry


def test_llava_next_processor_agreement():
    proc = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINS
    )
    worst = 0.0
    for i, (h, w) in enumerate(SIZES):
        img = _image(h, w, i)
        ref = proc(img, return_tensors="np")["pixel_values"][0]  # [t, 3, 32, 32]
        got, geometry = _ours(img, PINS, 32, "clip")
        assert got.shape == ref.shape, (h, w)
        assert geometry == ImageGeometry(num_tiles=ref.shape[0], image_size=(h, w))
        worst = max(worst, float(np.abs(got - ref).max()))
    assert worst <= 1e-5, worst


def test_llava_next_processor_agreement_at_336():
    proc = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
    )
    img = _image(600, 800, 7)  # best fit 672x672: base + 2x2
    ref = proc(img, return_tensors="np")["pixel_values"][0]
    got, _ = _ours(img, LLAVA_NEXT_PINPOINTS, 336, "clip")
    assert got.shape == ref.shape == (5, 3, 336, 336)
    assert float(np.abs(got - ref).max()) <= 1e-5


def test_onevision_processor_agreement():
    proc = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32},
        image_grid_pinpoints=PINS,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    for i, (h, w) in enumerate(SIZES):
        img = _image(h, w, 10 + i)
        ref = proc([[img]], return_tensors="np")["pixel_values"][0]
        got, _ = _ours(img, PINS, 32, "siglip")
        assert got.shape == ref.shape, (h, w)
        assert float(np.abs(got - ref).max()) <= 1e-5, (h, w)


def test_bad_pinpoints_name_the_key():
    transform = ImageTransform(32, "pad", "clip")
    with pytest.raises(ValueError, match=r"model.tiling.grid_pinpoints entry \[32, 50\]"):
        build_tiler(TilingConfig(type="anyres", grid_pinpoints=[[32, 50]]), transform)
    with pytest.raises(ValueError, match="model.tiling.grid_pinpoints is empty"):
        build_tiler(TilingConfig(type="anyres"), transform)
