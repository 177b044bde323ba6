"""A resume with megatron's distributed optimizer continues exactly (issue 19 item 9).

Before: `load_training_state` crashed in megatron's `DistributedOptimizer.state_dict`
(`assert len(steps) == 1`: a fresh torch Adam has no state); once past that, torch Adam's step
count came back as the dummy value, so step 4 after a resume at step 2 differed by 2.4e-2.
"""

from __future__ import annotations

from mm_megatron.train import trainer as trainer_mod
from tests.train_helpers import tiny_job, write_tiny_dataset


def test_distributed_optimizer_resume_is_exact(tmp_path):
    data = tmp_path / "data"
    write_tiny_dataset(data, n_train=48, n_val=8)
    kw = dict(use_distributed_optimizer=True, lr_decay_style="constant", lr_warmup_iters=0)
    ref = trainer_mod.train(tiny_job(data, tmp_path / "ref", train_iters=4, **kw)).losses
    save = str(tmp_path / "ckpt")
    trainer_mod.train(tiny_job(data, tmp_path / "a", train_iters=2, save=save, **kw))
    resumed = trainer_mod.train(tiny_job(data, tmp_path / "b", train_iters=4, save=save, **kw))
    assert resumed.resumed_from == 2
    assert resumed.losses == {3: ref[3], 4: ref[4]}  # bit-identical on one rank
