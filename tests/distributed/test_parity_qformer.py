"""The ``qformer`` connector end to end: layout parity at TP2, TP2+SP, PP2 and CP2 against one
rank, on micro-batches of the real data pipeline (single-image, multi-image and text-only
samples; padded rows and packed THD rows).

The Q-Former's heads and MLP are split over TP (its output gathered), so TP2 checks that the
split, the gather and the replicated LayerNorms/queries give the single-rank gradients; PP2 and
CP2 check that 8 embeddings per image flow through the merge, the CP padding and the pipeline.
"""

from __future__ import annotations

import pytest
import torch

from mm_megatron.config import get_preset
from mm_megatron.model.image_tokens import ImageTokenCounter
from tests.distributed.parity import (
    assert_sized_as_the_data_says,
    check_layouts,
    loader_parity_setup,
    tiny_config,
)

pytestmark = pytest.mark.distributed

CASES = [
    (dict(tp=2), False),
    (dict(tp=2, sequence_parallel=True), True),
    (dict(pp=2), False),
    (dict(cp=2), False),
    (dict(cp=2), True),
]
"""The connector cases, with TP2+SP on packed rows (the Q-Former's queries are per image)."""


def qformer_config():
    cfg = tiny_config()  # 32 px / 8 px patches: 16 features per image
    cfg.projector = get_preset("debug-tiny-qformer").projector  # 8 queries, 2 layers
    return cfg


def without_key_bias(result: dict) -> dict:
    """``result`` without the attention key biases.

    NOTE: a key bias adds the same ``q . b_k`` to every logit of a query, which softmax ignores:
    its exact gradient is zero, so what backward returns is rounding noise (and Adam turns noise
    into a full-size step). The key weights, which do matter, are compared.
    """
    out = dict(result)
    for kind in ("grads", "params"):
        out[kind] = {k: v for k, v in result[kind].items() if not k.endswith(".key.bias")}
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = qformer_config()
    data_dir = str(tmp_path_factory.mktemp("qformer-synth"))
    weights, data, refs = loader_parity_setup(cfg, data_dir, max_seq_len=40)
    return cfg, weights, data, refs


def test_batches_carry_the_query_count(setup):
    cfg, weights, data, refs = setup
    assert ImageTokenCounter.from_config(cfg).tokens_per_tile == 8
    for packed, batches in data.items():
        tokens = torch.cat([b["image_tokens"] for b in batches])
        assert tokens.numel() > 0 and bool((tokens == 8).all())
        assert max(int(b["num_images"].max()) for b in batches) >= 2
        if not packed:
            assert min(int(b["num_images"].min()) for b in batches) == 0, "want a text-only row"
        assert_sized_as_the_data_says(cfg, batches, packed, refs[packed])
    # both kinds of Q-Former layer take part and get gradients
    grads = refs[False]["grads"]
    assert "vision_projection.layers.0.crossattention.key.weight" in grads
    assert "vision_projection.layers.1.crossattention.key.weight" not in weights
    assert grads["vision_projection.query_tokens"].norm() > 0
    key_bias = grads["vision_projection.layers.0.attention.key.bias"].norm()
    assert key_bias < 1e-6 * grads["vision_projection.layers.0.attention.key.weight"].norm()


@pytest.mark.timeout(1200)
def test_parity_with_qformer(setup):
    cfg, weights, data, refs = setup
    check_layouts(CASES, cfg, weights, data, refs, keep=without_key_bias)
