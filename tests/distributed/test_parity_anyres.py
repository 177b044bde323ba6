"""Anyres (LLaVA-NeXT tiling + OneVision's anyres_max down-scaling) through every layout: data ->
tiles -> arrangement -> merge -> CP padding -> loss -> FLOPs, with parity against one rank at
TP2, TP2+SP, PP2, CP2 (padded and packed THD rows; each with DP2) and TP2 x CP2 + SP, in one
4-rank gloo world. OneVision's multi-image rule is on, so micro-batches mix one-tile images (of
two-image samples) with gridded ones.

The micro-batches come from the real data pipeline: synthetic shards whose images are square,
wide and tall (so the best-fit grid and the unpadded feature map differ per image), with
single-image, two-image and text-only samples. The tiler cuts them, ``ImageTokenCounter`` sizes
them, and the model encodes all tiles of a micro-batch in one call and reassembles them.
"""

from __future__ import annotations

import pytest
import torch

from mm_megatron.model.flops import train_step_flops
from mm_megatron.model.image_tokens import ImageTokenCounter
from tests.distributed.parity import (
    assert_sized_as_the_data_says,
    check_layouts,
    loader_parity_setup,
    tiny_config,
)

pytestmark = pytest.mark.distributed

# One 4-rank world runs every case (one start-up instead of two): the 2-way layouts with DP2.
CASES = [
    (dict(tp=2), False),
    (dict(tp=2, sequence_parallel=True), False),
    (dict(pp=2), False),
    (dict(cp=2), False),
    (dict(cp=2), True),
    (dict(tp=2, cp=2, sequence_parallel=True), False),
]


def anyres_config():
    cfg = tiny_config()  # 32 px tiles / 8 px patches: 4x4 features per tile, class token dropped
    cfg.tiling.type = "anyres"
    cfg.tiling.grid_pinpoints = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
    cfg.tiling.max_grid_patches = 3  # OneVision's anyres_max_3: square 8x8 maps shrink to 6x6
    cfg.tiling.multi_image_single_tile = True  # and its rule: 1 tile per image if several
    cfg.lm.max_position_embeddings = 512
    return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = anyres_config()
    data_dir = str(tmp_path_factory.mktemp("anyres-synth"))
    weights, data, refs = loader_parity_setup(
        cfg, data_dir, max_seq_len=320, image_size=64, non_square_fraction=0.7
    )
    assert "image_newline" in weights
    return cfg, weights, data, refs


def test_batches_carry_per_image_tiles_and_counts(setup):
    cfg, _, data, refs = setup
    counter = ImageTokenCounter.from_config(cfg)
    arr = counter.arrangement
    for packed, batches in data.items():
        tiles = torch.cat([b["num_tiles"] for b in batches])
        tokens = torch.cat([b["image_tokens"] for b in batches])
        sizes = torch.cat([b["image_sizes"] for b in batches])
        assert len(set(map(tuple, sizes.tolist()))) >= 3, "want square, wide and tall images"
        assert len(set(tokens.tolist())) >= 2, "want different token counts per image"
        gridded = [hw for t, hw in zip(tiles.tolist(), sizes.tolist()) if t > 1]
        shrunk = [arr.feature_hw(hw) != arr.unpadded_hw(hw) for hw in gridded]
        assert any(shrunk) and not all(shrunk), "want grids both under and over the budget"
        assert 1 in tiles.tolist(), "want one-tile images of multi-image samples"
        for t, n, hw in zip(tiles.tolist(), tokens.tolist(), sizes.tolist()):
            if t == 1:  # features + one newline
                assert n == counter.tokens_per_tile + 1
                continue
            assert t == arr.num_tiles(hw) > 1
            h, w = arr.feature_hw(hw)
            assert n == counter.tokens_per_tile + h * (w + 1)  # base + rows x (cols + newline)
        if not packed:  # rows are samples: several images -> one tile each, else the grid
            rows = torch.cat([b["num_images"] for b in batches]).tolist()
            per_row = torch.split(tiles, rows)
            assert all((r.tolist() == [1] * len(r)) == (len(r) > 1) for r in per_row if len(r))
        assert max(int(b["num_images"].max()) for b in batches) >= 2
        if not packed:
            assert min(int(b["num_images"].min()) for b in batches) == 0, "want a text-only row"
        assert_sized_as_the_data_says(cfg, batches, packed, refs[packed])


def test_step_flops_count_tiles_and_newlines(setup):
    from mm_megatron.model.vision import vision_encoder_class
    from mm_megatron.train.data_setup import StepBatches

    cfg, _, data, _ = setup
    batches = [dict(b, sample_keys=["k"] * len(b["expanded_lens"])) for b in data[False]]
    _, stats = StepBatches(batches, len(batches), blank_images=False).next_step()
    tiles = sum(int(b["num_tiles"].sum()) for b in data[False])
    assert stats.num_tiles == tiles > stats.num_images  # the trainer's FLOPs count tiles
    f = train_step_flops(cfg, stats.seq_lens, stats.num_tiles, training=False)
    assert f.vision == tiles * vision_encoder_class(cfg.vision.style).forward_flops(cfg.vision, 1)
    # the LM's lengths are the expanded ones: newline embeddings included (checked per image
    # against base + rows x (cols + 1) in the test above)
    assert stats.seq_lens == [n for b in data[False] for n in b["expanded_lens"].tolist()]
    assert stats.image_tokens == [n for b in data[False] for n in b["image_tokens"].tolist()]


@pytest.mark.timeout(1500)
def test_parity_with_anyres(setup):
    cfg, weights, data, refs = setup
    check_layouts(CASES, cfg, weights, data, refs, world=4, timeout=1200)
