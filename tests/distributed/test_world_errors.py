"""A spawned gloo world names a rank that dies without a word within seconds, not at the timeout."""

from __future__ import annotations

import os
import time

import pytest

from mm_megatron.runtime.spawn import WorldError, run_world

pytestmark = pytest.mark.distributed


def _rank1_dies(rank, world_size, rank0_waits_in_barrier):
    if rank == 1:
        os._exit(3)  # no exception, no report: what the OOM killer or a C++ abort looks like
    if rank0_waits_in_barrier:
        import torch.distributed as dist

        dist.barrier()  # gloo notices the lost peer: rank 0 fails with "Connection reset"
    else:
        time.sleep(600)  # busy with something long: only the parent can notice
    return rank


def _rank0_raises(rank, world_size):
    if rank == 0:
        raise ValueError("bad shard s-000.tar")
    return rank


@pytest.mark.parametrize("in_barrier", [False, True], ids=["rank0-busy", "rank0-in-barrier"])
def test_a_rank_that_dies_is_named_with_its_exit_code(in_barrier):
    start = time.monotonic()
    with pytest.raises(WorldError, match=r"^rank 1 \(exit code 3\) died before reporting"):
        run_world(_rank1_dies, 2, in_barrier, timeout=600)
    assert time.monotonic() - start < 200  # far below the 600 s timeout, even under load


def test_a_rank_that_raises_returns_its_traceback():
    with pytest.raises(WorldError, match=r"(?s)rank 0 failed:.*ValueError: bad shard s-000.tar"):
        run_world(_rank0_raises, 2, timeout=600)
