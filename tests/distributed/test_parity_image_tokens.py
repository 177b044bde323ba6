"""A projector that changes the image-token count, end to end: data -> merge -> CP padding -> loss
-> FLOPs, with layout parity at TP2, TP2+SP, PP2 and CP2 (padded and packed THD rows).

The projector is ``mlp2x_gelu_pool2`` (2x2 average pooling: 16 patches -> 4 embeddings per
image), fed two vision feature layers concatenated (HF ``vision_feature_layer=[-2, 1]``: twice
the channels, the intermediate layer gathered back under sequence parallelism too). The
micro-batches come from the real data pipeline (synthetic shards: single-image, two-image and
text-only samples), which sizes every sample with the model's ``ImageTokenCounter``; nothing in
this test states the count except the hand check below.
"""

from __future__ import annotations

import pytest
import torch

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


def pooled_config():
    cfg = tiny_config()  # 32 px / 8 px patches: a 4x4 grid, class token dropped
    cfg.projector.type = "mlp2x_gelu_pool2"
    cfg.vision.feature_layer = [-2, 1]
    return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = pooled_config()
    data_dir = str(tmp_path_factory.mktemp("pooled-synth"))
    weights, data, refs = loader_parity_setup(cfg, data_dir, max_seq_len=40)
    return cfg, weights, data, refs


def test_batches_carry_the_pooled_count(setup):
    cfg, _, data, refs = setup
    assert ImageTokenCounter.from_config(cfg).tokens_per_tile == 4  # 16 patches / (2 x 2)
    for packed, batches in data.items():
        tokens = torch.cat([b["image_tokens"] for b in batches])
        assert tokens.numel() > 0 and bool((tokens == 4).all())
        counts = [int(b["num_images"].max()) for b in batches]
        assert max(counts) >= 2, "the batches should include a multi-image sample"
        assert_sized_as_the_data_says(cfg, batches, packed, refs[packed])


def test_flops_use_the_projector_count(setup):
    cfg, _, data, _ = setup
    batches = data[False]
    lens = [n for b in batches for n in b["expanded_lens"].tolist()]
    images = sum(int(b["num_images"].sum()) for b in batches)
    f = train_step_flops(cfg, lens, images, training=False)
    v, h = cfg.vision, cfg.lm.hidden_size
    inner = cfg.projector.hidden_size or h
    assert v.feature_width == 2 * v.hidden_size
    assert f.projector == 2 * (v.feature_width * inner + inner * h) * 4 * images
    pool = projector_class("mlp2x_gelu_pool2").forward_flops(cfg.projector, v.feature_width, h, 16)
    assert f.projector == pool * images


@pytest.mark.timeout(1200)
def test_parity_with_pooled_projector(setup):
    cfg, weights, data, refs = setup
    check_layouts(CONNECTOR_CASES, cfg, weights, data, refs)
