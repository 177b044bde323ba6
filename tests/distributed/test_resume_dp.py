"""Resume at another data-parallel size with the data stream exact (issue 19 item 9).

Observed before: resuming at another DP size was refused ("saved at DP=1; this run has DP=2"),
and the sample order depended on the DP size (each rank read its own contiguous slice of the
epoch), so a fresh DP=2 run differed from DP=1 by 0.087 in loss at step 1.

Now step k consumes global samples [k*G, (k+1)*G) at any DP size, so (1e-5 relative, CPU gloo,
distributed optimizer, same initial weights through ``--load``):
- a fresh DP=2 run gives the DP=1 losses;
- 10 steps at DP=1, then a resume at DP=2 to step 20 (megatron reshards the distributed
  optimizer's ``dp_reshardable`` state), gives the losses of 20 steps at DP=1.
"""

from __future__ import annotations

import pytest

from tests.distributed.launcher import run_distributed
from tests.distributed.test_train_layouts import _assert_close, _init_checkpoint, _train

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.train_helpers import tiny_job, write_tiny_dataset

    root = tmp_path_factory.mktemp("resume_dp")
    write_tiny_dataset(root / "data", n_train=96, n_val=16)
    init = root / "init"

    def job(name, **train):
        section = {
            "load": str(init),
            "lr_decay_style": "constant",
            "lr_warmup_iters": 0,
            "train_iters": 20,
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "use_distributed_optimizer": True,
            **train,
        }
        return tiny_job(root / "data", root / name, **section).to_dict()

    run_distributed(_init_checkpoint, 1, job("init"), init)
    ref = run_distributed(_train, 1, job("ref"), {})[0]
    assert sorted(ref["losses"]) == list(range(1, 21))
    return root, job, ref["losses"]


def test_fresh_dp2_equals_dp1(setup):
    root, job, ref = setup
    got = run_distributed(_train, 2, job("dp2", train_iters=3), {})[0]["losses"]
    _assert_close(got, ref, [1, 2, 3], "fresh DP=2")


def test_resume_dp1_at_dp2_continues_the_exact_stream(setup):
    root, job, ref = setup
    save = str(root / "dp1_ckpt")
    first = run_distributed(_train, 1, job("dp1", save=save, train_iters=10), {})[0]
    _assert_close(first["losses"], ref, range(1, 11), "DP=1 steps 1-10")
    second = run_distributed(_train, 2, job("dp2_resumed", save=save), {})[0]
    assert second["resumed_from"] == 10 and sorted(second["losses"]) == list(range(11, 21))
    _assert_close(second["losses"], ref, range(11, 21), "DP=2 resumed from DP=1")
    # the DP=2 run's checkpoint holds both ranks' stream states, by DP rank: each read its 2 of
    # every global batch of 4 since sample 40, so the stream continues at sample 80, exactly
    from mm_megatron.data.reader import SampleOrder, stream_resume_point
    from mm_megatron.data.shards import resolve_shards
    from mm_megatron.train.checkpointing import read_train_state

    streams = read_train_state(save, 20)["data_streams"]
    assert [(s["global_offset"], s["sample_position"]) for s in streams] == [(40, 20), (40, 20)]
    shards = resolve_shards(str(root / "data/train.index.json"), "train")
    order = SampleOrder(shards, dp_rank=0, dp_size=1, seed=0, shuffle=True, block=4)
    assert stream_resume_point(order, streams, 2, 2) == (80, ())
