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

import os

import pytest
import torch

from mm_megatron.data import DataConfig, build_dataloader, validate_batch
from mm_megatron.data.synthetic import write_synthetic_dataset
from mm_megatron.model.flops import train_step_flops
from mm_megatron.model.image_tokens import ImageTokenCounter
from mm_megatron.model.merge import plan_merge
from mm_megatron.model.projector import projector_class
from tests.distributed.launcher import run_distributed
from tests.distributed.parity import assert_parity, full_weights, run_layouts, tiny_config

pytestmark = pytest.mark.distributed

CASES = [
    (dict(tp=2), False),
    (dict(tp=2, sequence_parallel=True), False),
    (dict(pp=2), False),
    (dict(cp=2), False),
    (dict(cp=2), True),
]


def pooled_config():
    cfg = tiny_config()  # 32 px / 8 px patches: a 4x4 grid, class token dropped
    cfg.projector.type = "mlp2x_gelu_pool2"
    cfg.vision.feature_layer = [-2, 1]
    return cfg


def loader_batches(cfg, data_dir: str, packed: bool) -> list[dict]:
    """Four micro-batches of the real loader (model inputs only, sample keys dropped)."""
    config = DataConfig(
        val_shards=data_dir,
        tokenizer_path=os.path.join(data_dir, "tokenizer"),
        image_size=cfg.vision.image_size,
        max_seq_len=40,
        packing=packed,
        num_workers=0,
        template="plain",
    )
    loader = build_dataloader(
        config,
        dp_rank=0,
        dp_size=1,
        micro_batch_size=2,
        image_tokens=ImageTokenCounter.from_config(cfg),
        seed=0,
        split="val",
    )
    assert loader.image_token_id == cfg.image_token_id
    batches = []
    for batch in loader:
        validate_batch(batch, cfg.image_token_id, image_size=cfg.vision.image_size)
        batch.pop("sample_keys")
        batches.append(batch)
        if len(batches) == 4:
            return batches
    raise AssertionError("the synthetic split is too small for four micro-batches")


def _weights(rank, world, cfg):
    return full_weights(cfg)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = pooled_config()
    data_dir = str(tmp_path_factory.mktemp("pooled-synth"))
    write_synthetic_dataset(
        data_dir,
        n_train=4,
        n_val=48,
        image_size=cfg.vision.image_size,
        shard_size=24,
        seed=3,
        multi_image_fraction=0.3,
        text_only_fraction=0.2,
        vocab_size=cfg.lm.vocab_size,
    )
    data = {packed: loader_batches(cfg, data_dir, packed) for packed in (False, True)}
    weights = run_distributed(_weights, 1, cfg)[0]
    refs = run_distributed(
        run_layouts, 1, [({}, False, False), ({}, True, False)], cfg, weights, data
    )[0]
    return cfg, weights, data, {False: refs[0], True: refs[1]}


def test_batches_carry_the_pooled_count(setup):
    cfg, _, data, refs = setup
    assert ImageTokenCounter.from_config(cfg).tokens_per_tile == 4  # 16 patches / (2 x 2)
    for packed, batches in data.items():
        tokens = torch.cat([b["image_tokens"] for b in batches])
        assert tokens.numel() > 0 and bool((tokens == 4).all())
        counts = [int(b["num_images"].max()) for b in batches]
        assert max(counts) >= 2, "the batches should include a multi-image sample"
        if packed:  # the merge expands each packed sample to what the data pipeline sized
            for b in batches:
                plan = plan_merge(
                    b["input_ids"], cfg.image_token_id, b["image_tokens"], seq_lens=b["seq_lens"]
                )
                seg = plan.segment_lengths
                assert seg[seg > 0].tolist() == b["expanded_lens"].tolist()
        # the loss counts every labelled text token exactly once (first tokens carry no label)
        labelled = sum(int((b["labels"] != -100).sum()) for b in batches)
        assert refs[packed]["tokens"] == labelled


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
    jobs = [(layout, packed, False) for layout, packed in CASES]
    got = run_distributed(run_layouts, 2, jobs, cfg, weights, data, timeout=900)[0]
    for (layout, packed), result in zip(CASES, got):
        assert_parity(refs[packed], result, what=f"{layout} packed={packed}")
