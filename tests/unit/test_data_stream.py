"""The global sample stream does not depend on the DP size (issue 19 item 9, unit tier).

Before: each DP rank read its own contiguous slice of the epoch, so step k of a DP=2 run trained
on other samples than step k of a DP=1 run. Now rank r takes the r-th share of every global
batch, and a resume at another DP size or global batch continues from the consumed samples,
announcing the change.
"""

from __future__ import annotations

import pytest

from mm_megatron.data.reader import SampleOrder, stream_resume_point
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


def _read(orders: list[SampleOrder], reads: list[int]) -> list[int]:
    """Global indices the ranks read, rank r its first reads[r] positions."""
    return [o.global_index(p) for o, n in zip(orders, reads) for p in range(n)]


def _states(orders: list[SampleOrder], reads: list[int]) -> list[dict]:
    return [
        {"sample_position": n, "global_offset": o.offset, "exclude": list(o.exclude)}
        for o, n in zip(orders, reads)
    ]


def test_uneven_ranks_give_a_hand_computed_resume_point():
    # G=6 at DP2 (block 3). Rank 0 ran ahead (packing fitted more samples, or it skipped bad
    # ones): it read globals 0,1,2, 6,7,8, 12,13; rank 1 read 3,4,5, 9,10.
    old = _orders(2, 6)
    assert _read(old, [8, 5]) == [0, 1, 2, 6, 7, 8, 12, 13, 3, 4, 5, 9, 10]
    start, exclude = stream_resume_point(old[0], _states(old, [8, 5]), 2, 3)
    assert (start, exclude) == (11, (12, 13))
    # in step with each other (no packing, no bad samples): the consumed count, nothing left out
    assert stream_resume_point(old[0], _states(old, [6, 6]), 2, 3) == (12, ())


@pytest.mark.parametrize(
    "phases",
    [
        [(2, 6, [8, 5]), (1, 6, None)],
        [(2, 6, [8, 5]), (3, 6, None)],
        [(2, 6, [8, 5]), (3, 6, [3, 7, 4]), (1, 4, None)],  # DP and global batch change twice
        [(4, 8, [2, 5, 2, 3]), (2, 4, [9, 2]), (3, 3, None)],
    ],
)
def test_resume_at_another_dp_loses_and_repeats_nothing(phases):
    """Ranks that ran unevenly ahead, resumed at other DP sizes and global batches: every global
    sample of the window is read exactly once over all phases."""
    read, streams, old = [], None, None
    for dp, g, reads in phases:
        start, exclude = (0, ()) if old is None else stream_resume_point(old[0], streams, *old[1:])
        orders = _orders(dp, g, offset=start, exclude=exclude)
        if reads is None:  # the last phase reads on past the window
            reads = [80] * dp
        read += _read(orders, reads)
        streams, old = _states(orders, reads), (orders[0], dp, g // dp)
    window = [i for i in read if i < 60]
    assert sorted(window) == list(range(60))
