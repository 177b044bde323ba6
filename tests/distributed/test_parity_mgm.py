"""MGM dual encoder (HD variant: 2x2 crops + global image), layout parity at TP2, TP2+SP, PP2
and CP2 (padded and packed THD rows) against one rank.

The micro-batches come from the real data pipeline (synthetic shards at the high resolution the
model asks for: single-image, two-image and text-only samples), sized by the model's
``ImageTokenCounter`` (5 x 16 tokens per image). The ConvNeXt and the mining are replicated on
the TP ranks of the first stage; the parity of their gradients and updated weights is what shows
that the replication is consistent.
"""

from __future__ import annotations

import pytest
import torch

from mm_megatron.config import get_preset
from mm_megatron.model.image_tokens import ImageTokenCounter
from tests.distributed.parity import (
    CONNECTOR_CASES,
    check_layouts,
    loader_parity_setup,
)

pytestmark = pytest.mark.distributed


def mgm_config():
    """debug-tiny-mgm-hd with an LM that splits at TP2 / PP2 (4 layers, 4 KV heads)."""
    cfg = get_preset("debug-tiny-mgm-hd")
    cfg.lm.num_layers = 4
    cfg.lm.num_query_groups = 4
    cfg.lm.ffn_hidden_size = 128
    cfg.freeze_vision = False  # every part trains: all gradients are compared
    return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = mgm_config()
    data_dir = str(tmp_path_factory.mktemp("mgm-synth"))
    weights, data, refs = loader_parity_setup(
        cfg, data_dir, max_seq_len=200, n_val=32, shard_size=16
    )
    return cfg, weights, data, refs


def test_batches_carry_the_dual_encoder_count(setup):
    cfg, _, data, _ = setup
    assert ImageTokenCounter.from_config(cfg).tokens_per_tile == 5 * 16
    for packed, batches in data.items():
        tokens = torch.cat([b["image_tokens"] for b in batches])
        assert tokens.numel() > 0 and bool((tokens == 80).all())
        assert max(int(b["num_images"].max()) for b in batches) >= 2
        if packed:
            assert all("seq_lens" in b for b in batches)
        else:  # a text-only sample is in the batch
            assert any(bool((b["num_images"] == 0).any()) for b in batches)
        assert all(b["images"].shape[-1] == cfg.vision.input_image_size for b in batches)


DEAD = ("vision_model.mining.key.0.bias", "vision_model.mining.key.1.bias")
"""Shift every key of a query's softmax alike, so their gradient is exactly zero: rounding
noise whose relative error means nothing (MGM's key projection has them all the same)."""


def drop_dead_key_biases(result: dict) -> dict:
    """``result`` without the dead key biases, after checking their gradients vanish."""
    out = dict(result)
    for kind in ("grads", "params"):
        out[kind] = dict(result[kind])
        for name in DEAD:
            if kind == "grads":
                assert result[kind][name].abs().max() < 1e-6, (name, result[kind][name])
            del out[kind][name]
    return out


@pytest.mark.timeout(1200)
def test_parity_mgm(setup):
    cfg, weights, data, refs = setup
    check_layouts(CONNECTOR_CASES, cfg, weights, data, refs, keep=drop_dead_key_biases)
    # the towers and the mining trained in every layout
    grads = refs[False]["grads"]
    for prefix in ("vision_model.hires.", "vision_model.mining.", "vision_model.vit."):
        assert any(n.startswith(prefix) and g.norm() > 0 for n, g in grads.items()), prefix
