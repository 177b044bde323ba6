"""MiniCPM-V's resampler and slices end to end: data -> merge -> CP padding -> loss -> FLOPs,
with layout parity at TP2, TP2+SP, PP2 and CP2 (padded and packed THD rows).

The model is the parity harness's tiny LLaVA with ``projector.type=resampler`` (4 queries, 4
heads, 2 per rank at TP2) and ``model.tiling.type=minicpm_slice``: every 32 px synthetic image
becomes a source tile plus a 1 x 2 grid of slices, each its own placeholder between separator
tokens. The micro-batches come from the real data pipeline (single-image, two-image and
text-only samples); nothing here states the count except the hand checks below.
"""

from __future__ import annotations

import pytest
import torch

from mm_megatron.config.model_config import ProjectorConfig, TilingConfig
from mm_megatron.config.resampler_config import ResamplerConfig
from mm_megatron.model.flops import train_step_flops
from mm_megatron.model.image_tokens import ImageTokenCounter
from mm_megatron.model.projector import projector_class
from tests.distributed.parity import (
    CONNECTOR_CASES,
    assert_sized_as_the_data_says,
    check_layouts,
    loader_parity_setup,
    tiny_config,
)

pytestmark = pytest.mark.distributed


def resampler_config():
    cfg = tiny_config()  # 32 px / 8 px patches: a 4 x 4 grid, class token dropped
    cfg.projector = ProjectorConfig(
        type="resampler", resampler=ResamplerConfig(num_queries=4, num_heads=4)
    )
    cfg.tiling = TilingConfig(
        type="minicpm_slice", max_slice_nums=4, scale_resolution=24, slice_patch_size=8
    )
    return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = resampler_config()
    data_dir = str(tmp_path_factory.mktemp("resampler-synth"))
    weights, data, refs = loader_parity_setup(cfg, data_dir, max_seq_len=160)
    return cfg, weights, data, refs


def test_batches_carry_slices_of_four_tokens(setup):
    cfg, weights, data, refs = setup
    assert ImageTokenCounter.from_config(cfg).tokens_per_tile == 4  # the queries, not 16 patches
    assert any(name.endswith("linear_k.weight") for name in weights)
    for packed, batches in data.items():
        tiles = torch.cat([b["num_tiles"] for b in batches])
        assert bool((tiles == 1).all())  # every slice is its own placeholder
        assert bool((torch.cat([b["image_tokens"] for b in batches]) == 4).all())
        per_row = torch.cat([b["num_images"] for b in batches])
        assert bool((per_row % 3 == 0).all()) and int(per_row.max()) >= 6  # 2 images x 3 tiles
        assert int((per_row == 0).sum()) + (1 if packed else 0) >= 1  # text-only rows (or packed)
        assert_sized_as_the_data_says(cfg, batches, packed, refs[packed])


def test_flops_count_the_resampler_per_tile(setup):
    cfg, _, data, _ = setup
    batches = data[False]
    lens = [n for b in batches for n in b["expanded_lens"].tolist()]
    tiles = sum(int(b["num_tiles"].sum()) for b in batches)
    f = train_step_flops(cfg, lens, tiles, training=False)
    v, h = cfg.vision, cfg.lm.hidden_size
    t, q = 16, 4
    per_tile = 2 * t * v.hidden_size * h + 4 * t * h * h + 4 * q * t * h + 2 * q * h * 2 * h
    assert f.projector == per_tile * tiles
    assert per_tile == projector_class("resampler").forward_flops(
        cfg.projector, v.hidden_size, h, t
    )


@pytest.mark.timeout(1200)
def test_parity_with_resampler_and_slices(setup):
    cfg, weights, data, refs = setup
    check_layouts(CONNECTOR_CASES, cfg, weights, data, refs)
