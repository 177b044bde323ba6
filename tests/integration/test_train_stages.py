"""The two-stage recipe end to end: stage 1 trains only the projector, stage 2 starts from its
weights (``--load``) with the LM unfrozen."""

from __future__ import annotations

import torch

from mm_megatron.train import trainer as trainer_mod
from tests.train_helpers import tiny_job, write_tiny_dataset


def _params(t) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in t.chunks[0].module.named_parameters()}


def _run_keeping_params(job):
    """Train `job`; return (params before, params after, result)."""
    t = trainer_mod.Trainer(job)
    try:
        t.setup()
        before = _params(t)
        result = t.run()
        return before, _params(t), result
    finally:
        t.close()


def test_stage1_then_stage2(tmp_path):
    data = tmp_path / "data"
    write_tiny_dataset(data, n_train=64, n_val=16)
    stage1 = tiny_job(data, tmp_path / "s1", train_iters=2, save=str(tmp_path / "s1/ck"))
    stage1.model.freeze_vision = stage1.model.freeze_lm = True
    before, after, _ = _run_keeping_params(stage1)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("vision_projection.") for n in changed), changed

    stage2 = tiny_job(data, tmp_path / "s2", train_iters=2, load=str(tmp_path / "s1/ck"))
    stage2.data.template = "vicuna_v1"
    stage2.model.freeze_vision = True
    start, end, result = _run_keeping_params(stage2)
    assert result.resumed_from == 2
    for n, p in after.items():  # stage 2 starts from stage 1's weights
        assert torch.equal(start[n], p), n
    changed = {n for n in start if not torch.equal(start[n], end[n])}
    assert any(n.startswith("language_model.") for n in changed)
    assert not any(n.startswith("vision_model.") for n in changed)
