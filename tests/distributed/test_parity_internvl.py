"""InternVL through every layout: tiled loader batches (dynamic tiles + thumbnail, text-only
samples, packing) give the single-rank step at TP2, TP2+SP, PP2, CP2 and TP2xCP2+SP.

The model is ``debug-tiny-internvl``: InternViT with layer scale and full-width QK norm (its norm
weight is TP-sharded and its statistics all-reduced over TP), pixel shuffle 0.5 (16 patches -> 4
tokens per tile), a Qwen2-like LM. The batches come from the real data pipeline over synthetic
shards whose 40 px images (30 x 40 when not square) become 1 or 3 tiles of 32 px; each image's
count is ``num_tiles x 4``, stated by nothing in this test but the hand check below.
"""

from __future__ import annotations

import pytest
import torch

from mm_megatron.config import get_preset
from tests.distributed.launcher import run_distributed
from tests.distributed.parity import assert_parity, loader_parity_setup, run_layouts

pytestmark = pytest.mark.distributed

CASES_2 = [
    (dict(tp=2), False),
    (dict(tp=2, sequence_parallel=True), True),
    (dict(pp=2), True),
    (dict(cp=2), False),
]
"""Two-rank layouts and whether their batches are packed (packed CP runs in TP2xCP2+SP)."""
CASES_4 = [(dict(tp=2, cp=2, sequence_parallel=True), True)]
"""Four-rank layouts."""


def internvl_config():
    cfg = get_preset("debug-tiny-internvl")
    cfg.vision.num_layers = 2  # feature layer -2: one layer built
    return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = internvl_config()
    data_dir = str(tmp_path_factory.mktemp("internvl-synth"))
    weights, data, refs = loader_parity_setup(
        cfg, data_dir, max_seq_len=72, image_norm="imagenet", image_size=40, seed=4
    )
    return cfg, weights, data, refs


def test_batches_carry_tiles_and_counts(setup):
    cfg, _, data, _ = setup
    for batches in data.values():
        tiles = torch.cat([b["num_tiles"] for b in batches])
        tokens = torch.cat([b["image_tokens"] for b in batches])
        assert set(tiles.tolist()) == {1, 3}, tiles  # square -> 1 tile; 30x40 -> 1x2 + thumb
        assert torch.equal(tokens, 4 * tiles)
        assert sum(int(b["images"].shape[0]) for b in batches) == int(tiles.sum())
    rows = torch.cat([b["num_images"] for b in data[False]])
    assert bool((rows == 0).any()), "no text-only row"


@pytest.mark.timeout(1500)
def test_parity_internvl_layouts(setup):
    cfg, weights, data, refs = setup
    for world, cases in ((2, CASES_2), (4, CASES_4)):
        jobs = [(layout, packed, False) for layout, packed in cases]
        got = run_distributed(run_layouts, world, jobs, cfg, weights, data, timeout=1200)[0]
        for (layout, packed), result in zip(cases, got):
            assert_parity(refs[packed], result, what=f"{layout} packed={packed}")
