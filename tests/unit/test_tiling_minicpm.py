"""MiniCPM-V's ``slice_image`` tiling: the grid rule against a literal reference, hand-computed
cases, the text layout with its separator tokens, and samples through the real loader.

``reference_slice_image`` transcribes the published algorithm step by step (MiniCPM-V 2.0's
``slice_image`` / ``find_best_resize`` / ``get_refine_size`` / ``split_to_patches``, as described
in the model card and paper), with loops where the implementation uses ``min`` and
comprehensions, so that the two can disagree.
"""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
from PIL import Image

from mm_megatron.config import get_preset
from mm_megatron.config.model_config import TilingConfig
from mm_megatron.data import DataConfig, build_dataloader, validate_batch
from mm_megatron.data.batch import IGNORE_INDEX
from mm_megatron.data.image import ImageTransform
from mm_megatron.data.synthetic import write_synthetic_dataset
from mm_megatron.data.tiling import PlaceholderImages, build_tiler, layout_token_ids
from mm_megatron.data.tiling_minicpm import (
    best_resize,
    choose_grid,
    refine_size,
    slice_image,
    slice_layout,
)
from mm_megatron.data.tokenizer import load_tokenizer, prepare_tokenizer
from mm_megatron.model.image_tokens import ImageTokenCounter

# --- the reference --------------------------------------------------------------------------


def ref_divide(length, patch):
    return max(round(length / patch) * patch, patch)


def ref_best_resize(size, scale, patch, allow_upscale=False):
    width, height = size
    if (width * height > scale * scale) or allow_upscale:
        r = width / height
        height = int(scale / math.sqrt(r))
        width = int(height * r)
    return ref_divide(width, patch), ref_divide(height, patch)


def ref_refine_size(size, grid, scale, patch):
    width, height = size
    grid_x, grid_y = grid
    refine_width = ref_divide(width, grid_x)
    refine_height = ref_divide(height, grid_y)
    best = ref_best_resize((refine_width / grid_x, refine_height / grid_y), scale, patch, True)
    return best[0] * grid_x, best[1] * grid_y


def reference_plan(size, max_slice_nums, scale, patch):
    """(source size, best grid or None, refine size or None) of an image of ``size``."""
    width, height = size
    log_ratio = math.log(width / height)
    ratio = width * height / (scale * scale)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1:
        return ref_best_resize(size, scale, patch, allow_upscale=True), None, None
    candidates = []
    for i in [multiple - 1, multiple, multiple + 1]:
        if i == 1 or i > max_slice_nums:
            continue
        candidates.append(i)
    grids = []
    for n in candidates:
        m = 1
        while m <= n:
            if n % m == 0:
                grids.append([m, n // m])
            m += 1
    best_grid, min_error = [1, 1], float("inf")
    for grid in grids:
        error = abs(log_ratio - math.log(grid[0] / grid[1]))
        if error < min_error:
            best_grid, min_error = grid, error
    source = ref_best_resize(size, scale, patch)
    return source, best_grid, ref_refine_size(size, best_grid, scale, patch)


def reference_slice_image(image, max_slice_nums, scale, patch):
    source_size, grid, refine = reference_plan(image.size, max_slice_nums, scale, patch)
    source = image.copy().resize(source_size, Image.Resampling.BICUBIC)
    if grid is None:
        return source, [], None
    refined = image.resize(refine, Image.Resampling.BICUBIC)
    w, h = refined.size
    gx, gy = int(w / grid[0]), int(h / grid[1])
    patches = []
    for i in range(0, h, gy):
        for j in range(0, w, gx):
            patches.append(refined.crop((j, i, j + gx, i + gy)))
    return source, patches, grid


def random_image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# --- tests ----------------------------------------------------------------------------------


def test_matches_the_reference_on_random_sizes():
    rng = random.Random(0)
    sizes = [(rng.randint(20, 3000), rng.randint(20, 3000)) for _ in range(2000)]
    sizes += [(448, 448), (449, 448), (896, 448), (1344, 448), (100, 2000), (3000, 120)]
    grids = set()
    for w, h in sizes:
        source, grid, refine = reference_plan((w, h), 9, 448, 14)
        got = choose_grid((w, h), 9, 448)
        assert got == (tuple(grid) if grid else (1, 1)), (w, h)
        assert best_resize((w, h), 448, 14, allow_upscale=grid is None) == source, (w, h)
        if grid:
            assert refine_size((w, h), got, 448, 14) == refine, (w, h)
            assert all(d % (14 * g) == 0 for d, g in zip(refine, got)), (w, h)
        assert all(d % 14 == 0 for d in source), (w, h)
        grids.add(got)
    assert len(grids) >= 15  # the sizes exercise many grids, not one
    img = random_image(900, 500, 1)  # pixels too: same resizes and crops, source first
    src, slices, grid = slice_image(img, 9, 448, 14)
    r_src, r_slices, r_grid = reference_slice_image(img, 9, 448, 14)
    assert grid == tuple(r_grid) and len(slices) == grid[0] * grid[1] > 1
    assert np.array_equal(np.asarray(src), np.asarray(r_src))
    for a, b in zip(slices, r_slices, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "size,grid,source,slice_size",
    [
        ((448, 448), (1, 1), (448, 448), None),  # one slice's worth: not sliced
        ((200, 100), (1, 1), (630, 322), None),  # small: upscaled to ~448^2, patch multiples
        ((1000, 500), (2, 1), (630, 322), (448, 448)),  # 2.5 -> 2..4 slices, log(2/1) exact
        ((500, 1500), (1, 3), (252, 770), (448, 448)),  # 3.7 -> 3..5; 1 x 3 fits 1:3 exactly
        ((1344, 1344), (3, 3), (448, 448), (448, 448)),  # 9 -> 8..9 (10 > max): 3 x 3
    ],
)
def test_hand_computed_grids(size, grid, source, slice_size):
    src, slices, got = slice_image(Image.new("RGB", size), 9, 448, 14)
    assert got == grid and src.size == source
    assert len(slices) == (0 if grid == (1, 1) else grid[0] * grid[1])
    if slice_size:
        assert {s.size for s in slices} == {slice_size}


def test_layout_puts_source_first_and_separators_between_rows():
    m = ("<a>", "</a>", "<s>", "</s>")
    assert slice_layout((1, 1), m) == ("<a>", None, "</a>")
    got = slice_layout((2, 2), m)
    tile = ("<a>", None, "</a>")
    assert got == (*tile, "<s>", *tile, *tile, "\n", *tile, *tile, "</s>")
    tiler = build_tiler(
        TilingConfig(type="minicpm_slice", scale_resolution=32, slice_patch_size=8),
        ImageTransform(16, aspect="resize"),
    )
    img = random_image(64, 32, 2)  # 2 slices' worth, 2:1 -> a 2 x 1 grid
    tiled = tiler(img)
    assert tiled.tiles.shape == (3, 16, 16, 3) and tiled.geometry.num_tiles == 3
    assert tiled.layout.count(None) == 3
    # the source image (whole picture) comes first, then the left and right halves
    whole = np.asarray(img.resize((16, 16), Image.Resampling.BICUBIC), dtype=float)
    errs = [np.abs(t.astype(float) - whole).mean() for t in tiled.tiles]
    assert errs[0] < min(errs[1:])


def test_bad_markers_are_one_line():
    with pytest.raises(ValueError, match=r"model.tiling.slice_markers='<a> <b>' must be 4"):
        build_tiler(TilingConfig(type="minicpm_slice", slice_markers="<a> <b>"), ImageTransform(16))


def test_splice_gives_every_tile_a_placeholder(tmp_path):
    write_synthetic_dataset(str(tmp_path), n_train=2, n_val=2, image_size=16, vocab_size=512)
    info = prepare_tokenizer(load_tokenizer(str(tmp_path / "tokenizer")))
    layout = slice_layout((2, 1), ("<im_start>", "<im_end>", "<slice>", "</slice>"))
    ids = layout_token_ids(layout, info)
    assert ids.count(info.image_token_id) == 3
    text = info.tokenizer.decode(ids)
    assert text.count("<slice>") == 1 and text.count("<im_start>") == 3
    p = info.image_token_id
    spliced = PlaceholderImages(layouts=[ids, None])
    out, labels = spliced.splice([1, p, 7, p, 8], [-100, -100, 7, -100, 8], p)
    assert out == [1, *ids, 7, p, 8]
    assert labels == [-100] * (1 + len(ids)) + [7, -100, 8]
    with pytest.raises(ValueError, match="contains the image placeholder"):
        layout_token_ids(("<image>", None), info)


def test_loader_batches_carry_slices_and_separators(tmp_path):
    cfg = get_preset("debug-tiny-resampler")
    v = cfg.vision
    write_synthetic_dataset(
        str(tmp_path),
        n_train=2,
        n_val=12,
        image_size=v.image_size,
        shard_size=12,
        seed=1,
        multi_image_fraction=0.3,
        text_only_fraction=0.2,
        vocab_size=cfg.lm.vocab_size,
    )
    data = DataConfig(
        val_shards=str(tmp_path),
        tokenizer_path=os.path.join(tmp_path, "tokenizer"),
        image_size=v.image_size,
        max_seq_len=400,
        num_workers=0,
        template="plain",
    )
    loader = build_dataloader(
        data,
        dp_rank=0,
        dp_size=1,
        micro_batch_size=4,
        image_tokens=ImageTokenCounter.from_config(cfg),
        seed=0,
        split="val",
        tiling=cfg.tiling,
    )
    info = prepare_tokenizer(load_tokenizer(os.path.join(tmp_path, "tokenizer")))
    marker_ids = layout_token_ids(("<slice>",), info)
    placeholders = 0
    for batch in loader:
        validate_batch(batch, cfg.image_token_id, image_size=v.image_size)
        # a 64 px square at 48 px scale resolution: source + 1 x 2 slices, each its own placeholder
        assert bool((batch["num_tiles"] == 1).all())
        assert bool((batch["image_tokens"] == cfg.projector.resampler.num_queries).all())
        placeholders += int(batch["num_images"].sum())
        for row, ids in enumerate(batch["input_ids"].tolist()):
            n = int(batch["num_images"][row])
            assert n % 3 == 0
            starts = [i for i in range(len(ids)) if ids[i : i + len(marker_ids)] == marker_ids]
            assert len(starts) == n // 3  # one <slice> block per image
            for i in starts:  # separators carry no loss
                assert bool((batch["labels"][row, i : i + len(marker_ids)] == IGNORE_INDEX).all())
    assert placeholders >= 9
