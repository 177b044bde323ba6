"""The memory model against one real device: ref-1.4b at TP1 with micro-batches 1, 2 and 4.

    python -m mm_megatron.bench.memcheck --out DIR             # on a GPU
    python -m mm_megatron.bench.memcheck --dry-run --out DIR   # debug-tiny on the CPU

For each micro-batch size it builds the model, optimizer and step exactly as the trainer does
(local spec unless ``--spec te``), runs two optimizer steps and compares the model
(`memory.py`: weights + grads + optimizer + one micro-batch of activations) with what was
measured: ``torch.cuda.max_memory_allocated`` on the GPU, and on both devices the model-state
bytes and the bytes autograd saved (`measure.py`). Writes ``memcheck.json``.

What it does not do: multi-rank layouts (the CPU validation test covers them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch


def check(preset: str, mbs: int, seq: int, spec: str) -> dict[str, Any]:
    """Model vs measurement for one micro-batch size (single rank, world size 1)."""
    from mm_megatron.bench.batches import synthetic_batch
    from mm_megatron.bench.measure import SavedActivations, model_state_bytes
    from mm_megatron.bench.memory import Workload, estimate, model_params
    from mm_megatron.config import ParallelConfig
    from mm_megatron.parallel.schedule import forward_backward
    from mm_megatron.runtime import cpu_runtime, distributed
    from mm_megatron.train.components import build_model, build_optimizer, optimizer_step
    from mm_megatron.train.config import load_job_config

    cuda = cpu_runtime.cuda_in_use()
    job = load_job_config(preset, overrides={"train": {"micro_batch_size": mbs}})
    job.model.set_spec(spec)
    params = model_params(job.model)
    dtype = torch.bfloat16 if cuda else torch.float32
    w = Workload(seq=seq, mbs=mbs, dtype_bytes=2 if cuda else 4)
    model = estimate(job.model, params, ParallelConfig(), 1, w, 1)[0]
    distributed.initialize(ParallelConfig(), seed=1)
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        chunks = build_model(job, dtype)
        optimizer = build_optimizer(job, chunks, dtype)
        device = "cuda" if cuda else "cpu"
        batch = synthetic_batch(job.model, seq, mbs, generator=torch.Generator().manual_seed(0),
                                device=device)  # fmt: skip
        saved = 0
        for i in range(2):
            for c in chunks:
                c.zero_grad_buffer()
            optimizer.zero_grad()
            with SavedActivations([c.module for c in chunks]) as meter:
                forward_backward(chunks, [batch])
            saved = meter.bytes if i == 0 else saved
            optimizer_step(optimizer, 1.0)
        state = model_state_bytes(chunks, optimizer)
        peak = torch.cuda.max_memory_allocated() if cuda else None
    finally:
        distributed.destroy()
    act = sum(model.activations_per_microbatch.values())
    out = {
        "mbs": mbs,
        "seq": seq,
        "spec": spec,
        "model_state_bytes": {
            "weights": model.state.weights,
            "grads": model.state.grads,
            "optimizer": model.state.optimizer,
        },  # fmt: skip
        "measured_state_bytes": state,
        "model_activation_bytes": act,
        "saved_activation_bytes": saved,
        "activation_error": (act - saved) / saved if saved else None,
        "model_total_bytes": model.total,
        "max_memory_allocated": peak,
        "total_error": (model.total - peak) / peak if peak else None,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m mm_megatron.bench.memcheck")
    p.add_argument("--dry-run", action="store_true", help="debug-tiny on the CPU")
    p.add_argument("--spec", choices=("local", "te"), default="local")
    p.add_argument("--mbs", default="1,2,4", help="micro-batch sizes (1,2,4)")
    p.add_argument("--out", default=None, help="directory for memcheck.json")
    args = p.parse_args(argv)
    preset, seq = ("debug-tiny", 48) if args.dry_run else ("ref-1.4b", 1024)
    results = []
    for mbs in [int(x) for x in args.mbs.split(",")]:
        r = check(preset, mbs, seq, args.spec)
        results.append(r)
        tot = "-" if r["total_error"] is None else f"{r['total_error']:+.1%}"
        print(f"[memcheck] {preset} TP1 mbs {mbs}: activations model "
              f"{r['model_activation_bytes'] / 2**20:.1f} MiB vs saved "
              f"{r['saved_activation_bytes'] / 2**20:.1f} MiB ({r['activation_error']:+.1%}); "
              f"total model {r['model_total_bytes'] / 2**20:.0f} MiB vs max allocated "
              f"{(r['max_memory_allocated'] or 0) / 2**20:.0f} MiB ({tot})",
              flush=True)  # fmt: skip
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "memcheck.json").write_text(json.dumps({"preset": preset, "results": results},
                                                      indent=1), encoding="utf-8")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
