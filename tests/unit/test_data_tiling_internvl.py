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
from mm_megatron.data.tiling import PlaceholderImages, build_tiler
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
    with pytest.raises(ValueError, match=r"image_markers='<img>': expected two"):
        build_tiler(
            TilingConfig(type="internvl_dynamic", image_markers="<img>"), ImageTransform(SIZE)
        )


def test_images_are_wrapped_in_markers_as_internvl_writes_them(tmp_path):
    """With `<img> </img>` markers (the presets and converted checkpoints), an image's ids are
    `<img>` + its placeholder + `</img>`, no loss on the markers; expanded, they are exactly what
    InternVL's format (`<img>` + `<IMG_CONTEXT>` x tokens + `</img>`) tokenizes to."""
    from mm_megatron.config import get_preset
    from mm_megatron.data.batch import IGNORE_INDEX
    from mm_megatron.data.synthetic import write_synthetic_dataset
    from mm_megatron.data.tokenizer import load_tokenizer, prepare_tokenizer
    from mm_megatron.model.image_tokens import ImageTokenCounter

    cfg = get_preset("debug-tiny-internvl")
    assert cfg.tiling.image_markers == "<img> </img>"
    write_synthetic_dataset(str(tmp_path), n_train=2, n_val=2, image_size=32, vocab_size=512)
    tok = load_tokenizer(str(tmp_path / "tokenizer"))
    tok.add_special_tokens({"additional_special_tokens": ["<img>", "</img>", "<IMG_CONTEXT>"]})
    info = prepare_tokenizer(tok, "<IMG_CONTEXT>")
    tiler = build_tiler(cfg.tiling, ImageTransform(cfg.vision.image_size))
    count = ImageTokenCounter.from_config(cfg)
    images = PlaceholderImages()
    for w, h in ((90, 40), (30, 30)):
        images.add(_image(w, h, 0), tiler(_image(w, h, 0)), count, info)
    prompt = tok.encode("Look: <IMG_CONTEXT> and <IMG_CONTEXT> now", add_special_tokens=False)
    p = info.image_token_id
    ids, labels = images.splice(prompt, [IGNORE_INDEX] * (len(prompt) - 1) + [7], p)
    assert ids.count(p) == 2 and labels[-1] == 7 and labels.count(IGNORE_INDEX) == len(ids) - 1
    counts = iter(images.image_tokens)
    assert images.num_tiles == [3, 1]  # a 2 x 1 grid and its thumbnail; one tile
    expanded = [t for t in ids for _ in range(next(counts) if t == p else 1)]
    context = ["<IMG_CONTEXT>" * n for n in images.image_tokens]
    text = "Look: <img>{}</img> and <img>{}</img> now".format(*context)
    assert expanded == tok.encode(text, add_special_tokens=False)
