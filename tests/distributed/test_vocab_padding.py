"""The vocab-padding mask at TP=2: each TP rank masks its own padded columns.

The model receives its TP rank from the build function (``LlavaModel(tp_rank=...)``) and masks
the columns of megatron's padded vocabulary that its output-layer shard holds. The parity
matrix runs an unpadded vocabulary, so a wrong rank there would go unseen; this test pads the
vocabulary (500 -> 512, all 12 pad columns on TP rank 1) and compares the TP=2 loss with the
single-rank one from the same weights.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.distributed.parity import full_weights, make_batches, tiny_config

pytestmark = pytest.mark.distributed


def _config():
    cfg = tiny_config()
    cfg.lm.vocab_size = 500
    return cfg


def _weights(rank, world, cfg):
    return full_weights(cfg)


def _loss(rank, world, cfg, weights, batch):
    from mm_megatron.config import ParallelConfig
    from mm_megatron.model.build import build_llava_model
    from mm_megatron.runtime import distributed
    from tests.distributed.resharding import load_full_state_dict

    par = ParallelConfig(tp=world)
    distributed.initialize(par)
    try:
        model = build_llava_model(cfg, par)
        assert model.padded_vocab_size == 512 and model.tp_rank == rank
        load_full_state_dict([model], weights, par.tp, rank, 0)
        model.eval()
        with torch.no_grad():
            loss, mask = model(**batch)  # [b, s], identical on every TP rank
        return (loss * mask).sum(), mask.sum()
    finally:
        distributed.destroy()


def test_tp2_padded_vocab_loss_matches_single_rank():
    cfg = _config()
    weights = run_distributed(_weights, 1, cfg)[0]
    batch = make_batches(cfg)[0]
    ref_sum, ref_n = run_distributed(_loss, 1, cfg, weights, batch)[0]
    assert ref_n > 0
    for got_sum, got_n in run_distributed(_loss, 2, cfg, weights, batch):
        assert got_n == ref_n
        torch.testing.assert_close(got_sum, ref_sum, rtol=1e-5, atol=1e-5)
