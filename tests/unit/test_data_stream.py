"""The global sample stream does not depend on the DP size (issue 19 item 9, unit tier).

Before: each DP rank read its own contiguous slice of the epoch, so step k of a DP=2 run trained
on other samples than step k of a DP=1 run. Now rank r takes the r-th share of every global
batch, and a resume at another DP size or global batch continues from the consumed samples,
announcing the change.
"""

from __future__ import annotations

import pytest

from mm_megatron.data.reader import SampleOrder
from mm_megatron.data.shards import ShardInfo
from mm_megatron.train import trainer as trainer_mod
from tests.train_helpers import tiny_job, write_tiny_dataset


def _orders(dp: int, global_batch: int, offset: int = 0, **kw) -> list[SampleOrder]:
    shards = [ShardInfo(path=f"s{i}.tar", num_samples=n) for i, n in enumerate((7, 5, 9))]
    return [
        SampleOrder(
            shards,
            dp_rank=r,
            dp_size=dp,
            seed=3,
            shuffle=True,
            block=global_batch // dp,
            offset=offset,
            **kw,
        )
        for r in range(dp)
    ]


def _step_samples(orders: list[SampleOrder], step: int, block: int) -> set:
    return {o.locate(p) for o in orders for p in range(step * block, (step + 1) * block)}


@pytest.mark.parametrize("dp", [2, 3, 6])
def test_step_k_consumes_the_same_global_samples_at_any_dp(dp):
    g = 6
    one = _orders(1, g)
    many = _orders(dp, g)
    for step in range(12):  # 72 samples: three epochs of 21, crossing epoch boundaries
        assert _step_samples(many, step, g // dp) == _step_samples(one, step, g)


def test_offset_continues_the_global_stream():
    full = _orders(1, 4)[0]
    resumed = _orders(2, 2, offset=8)  # 8 samples consumed, now DP=2 with global batch 2
    for step in range(5):
        want = {full.locate(8 + 2 * step + i) for i in range(2)}
        assert _step_samples(resumed, step, 1) == want


def test_finite_block_stream_covers_every_sample_once():
    shards = [ShardInfo(path=f"s{i}.tar", num_samples=n) for i, n in enumerate((7, 5, 9))]
    orders = [
        SampleOrder(shards, dp_rank=r, dp_size=2, seed=0, shuffle=False, num_epochs=1, block=2)
        for r in range(2)
    ]
    seen = [o.locate(p) for o in orders for p in range(o.end)]
    assert len(seen) == len(set(seen)) == 21


def test_changed_global_batch_on_resume_is_announced(tmp_path, capsys):
    data = tmp_path / "data"
    write_tiny_dataset(data, n_train=48, n_val=8)
    save = str(tmp_path / "ckpt")
    trainer_mod.train(tiny_job(data, tmp_path / "a", train_iters=2, save=save))
    capsys.readouterr()
    job = tiny_job(data, tmp_path / "b", train_iters=3, save=save, global_batch_size=4)
    result = trainer_mod.train(job)
    out = capsys.readouterr().out
    assert result.resumed_from == 2 and sorted(result.losses) == [3]
    assert (
        "[resume] global batch size changed from 8 to 4: step 3 consumes global samples "
        "[16, 20)" in out
    )
