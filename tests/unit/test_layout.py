"""Layout checks that need no processes: the stage split and the size checks (one copy each)."""

from __future__ import annotations

import pytest

from mm_megatron.config import ParallelConfig, get_preset
from mm_megatron.parallel.layout import LayoutError, stage_layers, validate_layout
from mm_megatron.runtime.distributed import check_world_size


@pytest.mark.parametrize(
    "num_layers, par, want",
    [
        (8, ParallelConfig(), [8]),
        (8, ParallelConfig(pp=4), [2, 2, 2, 2]),
        (8, ParallelConfig(pp=3, first_stage_lm_layers=2), [2, 3, 3]),
        (8, ParallelConfig(pp=3, last_stage_lm_layers=4), [2, 2, 4]),
        (8, ParallelConfig(pp=2, first_stage_lm_layers=1, last_stage_lm_layers=7), [1, 7]),
        (9, ParallelConfig(pp=4, first_stage_lm_layers=0, last_stage_lm_layers=1), [0, 4, 4, 1]),
    ],
)
def test_stage_layers(num_layers, par, want):
    assert stage_layers(num_layers, par) == want
    assert sum(want) == num_layers


@pytest.mark.parametrize(
    "num_layers, par, match",
    [
        (8, ParallelConfig(pp=3), "lm.num_layers=8 is not divisible by PP=3"),
        (8, ParallelConfig(pp=3, first_stage_lm_layers=1), "7 LM layers left .* 2 middle"),
        (8, ParallelConfig(pp=2, first_stage_lm_layers=9), r"exceed lm.num_layers=8"),
        (8, ParallelConfig(pp=2, first_stage_lm_layers=-1), "first-stage LM layers=-1"),
        (
            8,
            ParallelConfig(pp=2, first_stage_lm_layers=3, last_stage_lm_layers=3),
            r"first\+last stage LM layers \(3\+3\) != lm.num_layers=8",
        ),
    ],
)
def test_stage_layers_errors(num_layers, par, match):
    with pytest.raises(LayoutError, match=match):
        stage_layers(num_layers, par)


def test_sequence_parallel_check_with_and_without_world_size():
    cfg, par = get_preset("debug-tiny"), ParallelConfig(sequence_parallel=True)
    for call in (lambda: validate_layout(cfg, par), lambda: check_world_size(par, 4)):
        with pytest.raises(LayoutError, match="--sequence-parallel needs TP > 1"):
            call()
    with pytest.raises(LayoutError, match="needs PP > 1"):
        validate_layout(cfg, ParallelConfig(virtual_pp=2))
