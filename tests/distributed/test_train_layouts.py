"""The trainer under multi-rank layouts on CPU gloo gives the single-rank losses.

Every run starts from the same initial checkpoint (``--load``, resharded by dist_checkpointing),
so weights agree across layouts. Compared with the single-rank run, step by step (1e-5 relative):

- PP=2 for steps 1-2, saving a checkpoint;
- TP=2 with sequence parallel resuming from that PP=2 checkpoint (a layout change: model and
  optimizer are resharded) for steps 3-4;
- CP=2 and TP=2 x PP=2 for steps 1-2;
- DP=2 (distributed optimizer) for steps 1-2, against a single rank that accumulates the same two
  DP shards' micro-batches (DP ranks read different slices of the stream).
"""

from __future__ import annotations

import pytest

from tests.distributed.launcher import run_distributed

pytestmark = pytest.mark.distributed

REL = 1e-5


def _init_checkpoint(rank, world, job_dict, out_dir):
    """A fresh single-rank model saved as a weights-only (``release``) checkpoint."""
    from mm_megatron.checkpoint import model_io
    from mm_megatron.model.build import build_llava_model
    from mm_megatron.runtime import distributed
    from mm_megatron.train.config import JobConfig

    job = JobConfig.from_dict(job_dict)
    distributed.initialize(job.parallel, seed=job.train.seed)
    try:
        model_io.save_checkpoint(build_llava_model(job.model), out_dir, job.model)
    finally:
        distributed.destroy()


class _Interleaved:
    """A loader yielding DP rank 0's batch, then rank 1's, ... (one DP=2 step on one rank)."""

    def __init__(self, loaders):
        self.loaders = loaders
        self.tokenizer_info = loaders[0].tokenizer_info
        self.counters = loaders[0].counters

    def __iter__(self):
        iterators = [iter(loader) for loader in self.loaders]
        while True:
            for it in iterators:
                yield next(it)

    def state_dict(self):
        return self.loaders[0].state_dict()


def _train(rank, world, job_dict, layout, interleave_dp=0):
    from mm_megatron.train import trainer
    from mm_megatron.train.config import JobConfig, apply_overrides

    job = JobConfig.from_dict(job_dict)
    apply_overrides(job.parallel, layout, "parallel")
    if interleave_dp:
        build = trainer.build_loader

        def build_loader(data, tokenizer, job, *, dp_rank, dp_size, split="train"):
            if split != "train":
                return build(data, tokenizer, job, dp_rank=dp_rank, dp_size=dp_size, split=split)
            loaders = [
                build(data, tokenizer, job, dp_rank=r, dp_size=interleave_dp, split=split)
                for r in range(interleave_dp)
            ]
            return _Interleaved(loaders)

        trainer.build_loader = build_loader
    result = trainer.train(job)
    return {"losses": result.losses, "resumed_from": result.resumed_from}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.train_helpers import tiny_job, write_tiny_dataset

    root = tmp_path_factory.mktemp("train_layouts")
    write_tiny_dataset(root / "data", n_train=96, n_val=16)
    init = root / "init"

    def job(name, **train):
        section = {
            "load": str(init),
            "lr_decay_style": "constant",
            "lr_warmup_iters": 0,
            "train_iters": 4,
            "micro_batch_size": 2,
            "global_batch_size": 4,
            **train,
        }
        return tiny_job(root / "data", root / name, **section).to_dict()

    run_distributed(_init_checkpoint, 1, job("init"), init)
    ref = run_distributed(_train, 1, job("ref"), {})[0]
    assert sorted(ref["losses"]) == [1, 2, 3, 4] and ref["resumed_from"] == "release"
    return root, job, ref["losses"]


def _assert_close(got: dict[int, float], want: dict[int, float], steps, what: str) -> None:
    for it in steps:
        assert abs(got[it] - want[it]) <= REL * abs(want[it]), (what, it, got[it], want[it])


def test_pp2_then_tp2_sp_resume_match_single_rank(setup):
    root, job, ref = setup
    save = str(root / "pp2_ckpt")
    pp2 = run_distributed(_train, 2, job("pp2", save=save, train_iters=2), {"pp": 2})[0]
    _assert_close(pp2["losses"], ref, [1, 2], "PP=2")
    tp2 = run_distributed(_train, 2, job("tp2", save=save), {"tp": 2, "sequence_parallel": True})[0]
    assert tp2["resumed_from"] == 2 and sorted(tp2["losses"]) == [3, 4]
    _assert_close(tp2["losses"], ref, [3, 4], "TP=2+SP resumed from PP=2")


def test_dp2_distributed_optimizer_matches_accumulation(setup):
    root, job, _ = setup
    want = run_distributed(_train, 1, job("acc", train_iters=2), {}, 2)[0]["losses"]
    got = run_distributed(
        _train, 2, job("dp2", train_iters=2, micro_batch_size=2, use_distributed_optimizer=True), {}
    )[0]["losses"]
    _assert_close(got, want, [1, 2], "DP=2")


def test_cp2_and_tp2_pp2_match_single_rank(setup):
    root, job, ref = setup
    cp2 = run_distributed(_train, 2, job("cp2", train_iters=2), {"cp": 2})[0]
    _assert_close(cp2["losses"], ref, [1, 2], "CP=2")
    tp2pp2 = run_distributed(_train, 4, job("tp2pp2", train_iters=2), {"tp": 2, "pp": 2})[0]
    _assert_close(tp2pp2["losses"], ref, [1, 2], "TP=2 x PP=2")
