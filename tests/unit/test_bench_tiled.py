"""Benchmarks, the planner and `model flops` size tiled models by their own tiling scheme.

Before: every one of them assumed one tile per image (`image_token_count(cfg)`), so the planner
sized LLaVA-NeXT-7B at 577 tokens and one encoder pass per image instead of 2928 and five.
"""

from __future__ import annotations

import math

import pytest
import torch

from mm_megatron.bench.batches import synthetic_batch
from mm_megatron.bench.memory import Workload, projector_elements, vision_elements
from mm_megatron.config import ParallelConfig, get_preset
from mm_megatron.data.batch import validate_batch
from mm_megatron.model.flops import format_sample_flops, forward_flops
from mm_megatron.model.image_tokens import representative_image


@pytest.mark.parametrize(
    "preset,side,tiles,placeholders,tokens",
    [
        ("llava-1.5-7b", 336, 1, 1, 576),
        ("llava-next-7b", 672, 5, 1, 576 + 48 * 48 + 48),  # base + 2x2 grid unpadded + newlines
        ("internvl2-2b", 896, 5, 1, 5 * 256),  # 2x2 tiles + thumbnail, 256 tokens each
        ("minicpm-v-2.6", 896, 5, 5, 5 * 64),  # source + 4 slices, one placeholder each
        ("mgm-7b-hd", 1536, 1, 1, 5 * 576),  # the dual encoder crops inside the model
    ],
)
def test_representative_image_is_cut_and_counted_by_the_model(
    preset, side, tiles, placeholders, tokens
):
    img = representative_image(get_preset(preset))
    assert (img.side, img.tiles, img.placeholders, img.tokens) == (
        side,
        tiles,
        placeholders,
        tokens,
    )


def test_planner_workload_counts_every_tile():
    cfg = get_preset("llava-next-7b")
    img = representative_image(cfg)
    one = Workload(seq=4096, mbs=2, images=1)
    tiled = Workload(seq=4096, mbs=2, images=1, tiles_per_image=img.tiles)
    par = ParallelConfig()
    assert vision_elements(cfg, par, tiled) == 5 * vision_elements(cfg, par, one)
    assert projector_elements(cfg, par, tiled) == 5 * projector_elements(cfg, par, one)
    table = format_sample_flops(cfg, 1, 100, "llava-next-7b")
    assert "1 image(s) of 672 px (5 tile(s)) x 2928 tokens" in table
    f1, f5 = forward_flops(cfg, [3028], 1), forward_flops(cfg, [3028], 5)
    assert f5.vision == 5 * f1.vision and f5.lm == f1.lm


@pytest.mark.parametrize("preset", ["debug-tiny-anyres", "debug-tiny-resampler", "debug-tiny"])
def test_synthetic_batches_of_tiled_models_train(single_rank, preset):
    from mm_megatron.model.build import build_llava_model

    cfg = get_preset(preset)
    img = representative_image(cfg)
    batch = synthetic_batch(cfg, 200, 2, images=2, generator=torch.Generator().manual_seed(0))
    validate_batch(
        {**batch, "sample_keys": ["?"] * 2}, cfg.image_token_id, image_size=img.tile_size
    )
    assert batch["images"].shape[0] == 2 * 2 * img.tiles
    assert batch["image_tokens"].sum().item() == 2 * 2 * img.tokens
    model = build_llava_model(cfg)
    inputs = {k: v for k, v in batch.items() if k != "expanded_lens"}
    loss, mask = model(**inputs)
    assert loss.shape == mask.shape and mask.shape[1] == 200  # exactly the expanded length
    assert math.isfinite(float((loss * mask).sum().detach()))
