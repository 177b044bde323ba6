"""The planner's memory model against measurement, on CPU gloo (two ranks).

For each case (preset x layout x recompute x optimizer sharding) every rank builds its part of
the model exactly as the trainer does, runs one training step on one synthetic micro-batch and
reports what it holds: weights, megatron's gradient buffer and the optimizer state, and the
bytes autograd saved for backward during the forward (`mm_megatron.bench.measure`). The model
(`mm_megatron.bench.memory`) must give the same model-state bytes per rank (exactly; with the
distributed optimizer its DP shards sum exactly to the whole and each is within megatron's
alignment padding) and the activations of one micro-batch per pipeline stage within 10%.
"""

from __future__ import annotations

import pytest

from tests.distributed.launcher import run_distributed

pytestmark = pytest.mark.distributed

TOL = 0.10

# name: (preset, parallel overrides, train overrides, seq, mbs)
CASES = {
    "tiny-dp2": ("debug-tiny", {}, {}, 48, 2),
    "tiny-dp2-distopt": ("debug-tiny", {}, {"use_distributed_optimizer": True}, 48, 2),
    "tiny-tp2-sp": ("debug-tiny", {"tp": 2, "sequence_parallel": True}, {}, 48, 2),
    "tiny-tp2": ("debug-tiny", {"tp": 2}, {}, 48, 2),
    "tiny-pp2": ("debug-tiny", {"pp": 2}, {}, 48, 2),
    "tiny-cp2": ("debug-tiny", {"cp": 2}, {}, 48, 2),
    "tiny-full-recompute": (
        "debug-tiny",
        {},
        {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
        48,
        2,
    ),
    "tiny-selective-recompute": ("debug-tiny", {}, {"recompute_granularity": "selective"}, 48, 2),
    "minimind-pp2": ("minimind-v", {"pp": 2}, {}, 260, 1),
}


def _job(case):
    from mm_megatron.train.config import load_job_config

    preset, par, train, seq, mbs = CASES[case]
    job = load_job_config(
        preset,
        overrides={
            "parallel": par,
            "train": {
                "micro_batch_size": mbs,
                "global_batch_size": mbs
                * (2 // (par.get("tp", 1) * par.get("pp", 1) * par.get("cp", 1))),
                "precision": "fp32",
                **train,
            },
        },
    )
    return job, seq


def _measure(rank, world, cases):
    import torch
    from megatron.core import parallel_state

    from mm_megatron.bench.batches import synthetic_batch
    from mm_megatron.bench.measure import SavedActivations, model_state_bytes
    from mm_megatron.parallel.schedule import forward_backward
    from mm_megatron.train.components import build_model, build_optimizer, optimizer_step

    out = {}
    for case in cases:
        job, seq = _job(case)
        par = job.parallel
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tp,
            pipeline_model_parallel_size=par.pp,
            context_parallel_size=par.cp,
        )
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1)
        torch.manual_seed(1)
        chunks = build_model(job, torch.float32)
        optimizer = build_optimizer(job, chunks, torch.float32)
        gen = torch.Generator().manual_seed(parallel_state.get_data_parallel_rank())
        batch = synthetic_batch(job.model, seq, job.train.micro_batch_size, generator=gen)
        with SavedActivations([c.module for c in chunks]) as saved:
            forward_backward(chunks, [batch])
        optimizer_step(optimizer, 1.0)
        out[case] = {
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "dp_rank": parallel_state.get_data_parallel_rank(),
            "activations": saved.bytes,
            **model_state_bytes(chunks, optimizer),
        }
        parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_measure, 2, list(CASES), timeout=900)


def _predict(case):
    from mm_megatron.bench.memory import Workload, estimate, model_params

    job, seq = _job(case)
    t = job.train
    w = Workload(
        seq=seq,
        mbs=t.micro_batch_size,
        dtype_bytes=4,
        recompute=t.recompute_granularity,
        distributed_optimizer=t.use_distributed_optimizer,
    )
    dp = 2 // job.parallel.model_parallel_size
    return estimate(job.model, model_params(job.model), job.parallel, dp, w, 1)


@pytest.mark.parametrize("case", list(CASES))
def test_memory_model_matches_measurement(measured, case):
    ranks = _predict(case)
    report = []
    for rank_result in measured:
        got = rank_result[case]
        want = ranks[got["pp_rank"]]
        assert got["weights"] == want.state.weights, (case, "weights", got, want.state)
        assert got["grads"] == want.state.grads, (case, "grads", got, want.state)
        if "distopt" not in case:
            assert got["optimizer"] == want.state.optimizer, (case, "optimizer", got, want.state)
        act = sum(want.activations_per_microbatch.values())
        err = (act - got["activations"]) / got["activations"]
        report.append(
            f"{case} stage {got['pp_rank']}: model {act:.0f} B, saved "
            f"{got['activations']} B, error {err:+.1%}"
        )
        assert abs(err) <= TOL, report[-1]
    if "distopt" in case:
        whole = 2 * ranks[0].state.optimizer
        shards = [r[case]["optimizer"] for r in measured]
        assert sum(shards) == whole, (shards, whole)  # the DP shards cover every state element
        for got in shards:  # each within megatron's alignment padding of the model's even split
            assert abs(got - ranks[0].state.optimizer) <= 2 * 128 * 8, (shards, whole)
        report.append(
            f"{case}: optimizer shards {shards} B, model {ranks[0].state.optimizer} B each"
        )
    print("\n".join(report))
