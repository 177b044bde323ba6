"""Layout parity on CPU gloo: every layout gives the single-rank loss, gradients and step.

Each case starts from the same full weights, runs one forward/backward over the same global
batch (multi-image, text-only and varied-length samples; or packed THD rows) and one Adam step,
then compares the loss, every gathered gradient and every updated parameter with the single-rank
run (relative error <= 1e-5, norm-wise per tensor).

The default suite runs a fast subset; the full matrix (TP, PP, CP in {1, 2, 4} with
TP*PP*CP <= 8, SP on/off where TP > 1, DP = 2 for a few, virtual and uneven pipelines, packed):

    .venv/bin/python -m pytest -q tests/distributed/test_parity.py --full-matrix

Cases of one world size share one spawned world (see ``parity.run_layouts``).
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest

from tests.distributed.launcher import run_distributed
from tests.distributed.parity import (
    assert_parity,
    full_weights,
    make_batches,
    run_layouts,
    tiny_config,
    world_of,
)

pytestmark = pytest.mark.distributed

# (layout, dp, packed, distributed optimizer)
FAST = [
    (dict(tp=2), 1, False, False),
    (dict(tp=2, sequence_parallel=True), 1, False, False),
    (dict(pp=2), 1, False, False),
    (dict(cp=2), 1, False, False),
    (dict(), 2, False, False),
    (dict(), 2, False, True),
    (dict(cp=2), 1, True, False),
    (dict(tp=2, pp=2), 1, False, False),
    (dict(tp=2, cp=2, sequence_parallel=True), 1, False, False),
    # where the SP x CP shard factor matters: 2*CP*TP = 16 here, and a factor missing TP (2*CP)
    # leaves CP shards that do not split over TP=4 (at TP=2 every plausible factor works)
    (dict(tp=4, cp=2, sequence_parallel=True), 1, False, False),
]


def _full_matrix():
    out = []
    for tp, pp, cp in itertools.product((1, 2, 4), repeat=3):
        if tp * pp * cp > 8 or tp * pp * cp == 1:
            continue
        for sp in (False, True) if tp > 1 else (False,):
            out.append((dict(tp=tp, pp=pp, cp=cp, sequence_parallel=sp), 1, False, False))
    out += [
        (dict(tp=2), 2, False, False),
        (dict(pp=2), 2, False, True),
        (dict(cp=2), 2, False, False),
        (dict(tp=2, sequence_parallel=True), 2, False, True),
        (dict(pp=2, virtual_pp=2), 1, False, False),
        (dict(pp=4, virtual_pp=2), 1, False, False),
        (dict(pp=2, first_stage_lm_layers=2), 1, False, False),
        (dict(tp=2, pp=2, first_stage_lm_layers=3, sequence_parallel=True), 1, False, False),
        (dict(tp=2), 1, True, False),
        (dict(tp=2, cp=2, sequence_parallel=True), 1, True, False),
        (dict(pp=2, cp=2), 1, True, False),
        (dict(cp=4), 1, True, False),
    ]
    return out


def _id(case):
    layout, dp, packed, dist_opt = case
    parts = [f"{k}{'' if v is True else v}" for k, v in layout.items() if v not in (False, None)]
    parts.append(f"dp{dp}")
    if packed:
        parts.append("thd")
    if dist_opt:
        parts.append("distopt")
    return "-".join(p.replace("sequence_parallel", "sp") for p in parts)


def _weights(rank, world, cfg):
    return full_weights(cfg)


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    weights = run_distributed(_weights, 1, cfg)[0]
    data = {False: make_batches(cfg), True: make_batches(cfg, packed=True)}
    refs = run_distributed(
        run_layouts, 1, [({}, False, False), ({}, True, False)], cfg, weights, data
    )[0]
    return cfg, weights, data, {False: refs[0], True: refs[1]}


def _run_cases(setup, cases):
    """Run ``cases`` grouped by world size; returns {case id: result}."""
    cfg, weights, data, _ = setup
    groups = defaultdict(list)
    for case in cases:
        layout, dp, packed, dist_opt = case
        groups[world_of(layout, dp)].append(case)
    results = {}
    # NOTE: megatron never destroys the gloo groups it creates (each holds threads), so one world
    # runs at most a handful of layouts before it is replaced by a fresh one.
    batches = []
    for world, group in sorted(groups.items()):
        batches += [(world, group[i : i + 4]) for i in range(0, len(group), 4)]
    for world, group in batches:
        jobs = [(layout, packed, dist_opt) for layout, _, packed, dist_opt in group]
        try:
            got = run_distributed(
                run_layouts, world, jobs, cfg, weights, data, timeout=300 * len(jobs)
            )[0]
            results.update({_id(c): r for c, r in zip(group, got)})
        except AssertionError:
            # One broken case must not fail its neighbours: rerun the group one case at a time.
            for case, job in zip(group, jobs):
                try:
                    results[_id(case)] = run_distributed(
                        run_layouts, world, [job], cfg, weights, data
                    )[0][0]
                except AssertionError as e:
                    results[_id(case)] = e
    return results


def _result(results, case):
    got = results[_id(case)]
    if isinstance(got, Exception):
        raise got
    return got


@pytest.fixture(scope="module")
def fast_results(setup):
    return _run_cases(setup, FAST)


@pytest.mark.timeout(1800)  # the first case runs the module's worlds
@pytest.mark.parametrize("case", FAST, ids=_id)
def test_parity_fast(setup, fast_results, case):
    ref = setup[3][case[2]]
    assert_parity(ref, _result(fast_results, case), what=_id(case))


@pytest.fixture(scope="module")
def full_results(setup):
    return _run_cases(setup, _full_matrix())


@pytest.mark.full_matrix
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("case", _full_matrix(), ids=_id)
def test_parity_full_matrix(setup, full_results, case):
    ref = setup[3][case[2]]
    assert_parity(ref, _result(full_results, case), what=_id(case))


def test_layout_error_is_one_line():
    """A bad layout fails up front with a one-line message, not a traceback from megatron."""
    from mm_megatron.config import ParallelConfig
    from mm_megatron.parallel.layout import LayoutError, validate_layout

    cfg = tiny_config()
    cases = [
        (ParallelConfig(tp=3), 6, "lm.num_attention_heads=4 is not divisible by TP=3"),
        (ParallelConfig(tp=2, pp=2), 6, "world size 6 is not divisible by TP*PP*CP"),
        (ParallelConfig(pp=3), 3, "lm.num_layers=8 is not divisible by PP=3"),
        (ParallelConfig(sequence_parallel=True), 1, "--sequence-parallel needs TP > 1"),
    ]
    for par, world, msg in cases:
        with pytest.raises(LayoutError, match=msg.replace("*", "\\*")) as e:
            validate_layout(cfg, par, world)
        assert "\n" not in str(e.value)
    cfg.vision.num_attention_heads = 25  # InternViT-6B's 25 heads
    with pytest.raises(LayoutError, match="vision.num_attention_heads=25 is not divisible"):
        validate_layout(cfg, ParallelConfig(tp=2), 2)
    with pytest.raises(LayoutError, match="shorter than 2\\*CP=8"):
        validate_layout(tiny_config(), ParallelConfig(cp=4), 4, seq_len=7)
