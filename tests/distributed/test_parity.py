"""Layout parity on CPU gloo: every layout gives the single-rank loss, gradients and step.

The default suite runs a fast subset; ``--full-matrix`` runs TP, PP, CP in {1, 2, 4} with
TP*PP*CP <= 8, SP on/off where TP > 1, DP = 2 for a few, plus packed (THD) batches:

    .venv/bin/python -m pytest -q tests/distributed/test_parity.py --full-matrix
"""

from __future__ import annotations

import itertools

import pytest

from tests.distributed.launcher import run_distributed
from tests.distributed.parity import (
    assert_parity,
    full_weights,
    make_batches,
    run_layout,
    tiny_config,
)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    weights = run_distributed(_weights, 1, cfg)[0]
    batches = make_batches(cfg)
    packed = make_batches(cfg, packed=True)
    ref = run_distributed(run_layout, 1, {}, cfg, weights, batches)[0]
    ref_packed = run_distributed(run_layout, 1, {}, cfg, weights, packed)[0]
    return cfg, weights, {False: (batches, ref), True: (packed, ref_packed)}


def _weights(rank, world, cfg):
    return full_weights(cfg)


def _check(setup, layout, dp=1, packed=False, dist_opt=False):
    cfg, weights, data = setup
    batches, ref = data[packed]
    world = layout.get("tp", 1) * layout.get("pp", 1) * layout.get("cp", 1) * dp
    got = run_distributed(run_layout, world, layout, cfg, weights, batches, dist_opt)[0]
    assert_parity(ref, got, what=f"{layout} dp={dp} packed={packed}")


FAST = [
    (dict(tp=2), 1, False),
    (dict(tp=2, sequence_parallel=True), 1, False),
    (dict(pp=2), 1, False),
    (dict(cp=2), 1, False),
    (dict(tp=2, pp=2), 1, False),
    (dict(tp=2, cp=2, sequence_parallel=True), 1, False),
    (dict(), 2, False),
    (dict(cp=2), 1, True),
]


@pytest.mark.parametrize("layout,dp,packed", FAST, ids=lambda x: str(x))
def test_parity_fast(setup, layout, dp, packed):
    _check(setup, layout, dp, packed)


def _full_matrix():
    out = []
    for tp, pp, cp in itertools.product((1, 2, 4), repeat=3):
        if tp * pp * cp > 8 or tp * pp * cp == 1:
            continue
        for sp in (False, True) if tp > 1 else (False,):
            layout = dict(tp=tp, pp=pp, cp=cp, sequence_parallel=sp)
            out.append((layout, 1, False))
    out += [
        (dict(tp=2), 2, False),
        (dict(pp=2), 2, False),
        (dict(cp=2), 2, False),
        (dict(pp=2, virtual_pp=2), 1, False),
        (dict(pp=2, first_stage_lm_layers=2), 1, False),
        (dict(tp=2, cp=2, sequence_parallel=True), 1, True),
        (dict(pp=2, cp=2), 1, True),
    ]
    return out


@pytest.mark.full_matrix
@pytest.mark.parametrize("layout,dp,packed", _full_matrix(), ids=lambda x: str(x))
def test_parity_full_matrix(setup, layout, dp, packed):
    _check(setup, layout, dp, packed)


@pytest.mark.parametrize("dist_opt", [True])
def test_parity_dp2_distributed_optimizer(setup, dist_opt):
    _check(setup, dict(), dp=2, dist_opt=dist_opt)
