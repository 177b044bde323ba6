"""One layout of the benchmark sweep: a torchrun job that trains on synthetic data and reports.

Launched by `mm_megatron.bench.sweep` (one job per layout)::

    torchrun --nproc-per-node N -m mm_megatron.bench.worker JOB.json RESULT.json

``JOB.json`` holds a `JobConfig` dict plus ``bench`` settings (steps, warm-up, sequence length,
images per sample, peak TFLOP/s). Every rank builds its part of the model, the megatron
optimizer and schedules exactly as the trainer does (`mm_megatron.train.components`,
`mm_megatron.parallel.schedule`), then times ``warmup + steps`` optimizer steps on synthetic
batches (`batches.py`), separately timing the wait for the step's micro-batches. Rank 0 writes
``RESULT.json``: per-step times, their median and spread, the shared throughput arithmetic
(`throughput.py`) over the FLOPs of `flops.py`, MFU, peak memory of every rank and the data-wait
share. A failure on any rank (invalid layout, OOM, error) is written as ``{"ok": false,
"reason": ...}`` by that rank to ``RESULT.json.rank<r>`` and the job exits non-zero.

What it does not do: choose layouts or aggregate (`sweep.py`), or read real data.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path


def _sync() -> None:
    import torch

    from mm_megatron.runtime import cpu_runtime

    if cpu_runtime.cuda_in_use():
        torch.cuda.synchronize()


def peak_memory_mib() -> float:
    """Peak memory of this process: torch.cuda max allocated on GPU, peak RSS on the CPU."""
    from mm_megatron.train.metrics import memory_stats

    stats = memory_stats()
    return stats.get("mem_max_allocated_mib", stats.get("mem_peak_rss_mib", 0.0))


def run(job_dict: dict, out: Path) -> dict:
    """Benchmark one layout on this rank; rank 0 returns (and writes) the result."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from mm_megatron.bench.batches import synthetic_batch
    from mm_megatron.model.flops import train_step_flops
    from mm_megatron.model.image_tokens import representative_image
    from mm_megatron.parallel.layout import validate_layout
    from mm_megatron.parallel.schedule import forward_backward
    from mm_megatron.runtime import distributed
    from mm_megatron.train.components import (
        build_model,
        build_optimizer,
        optimizer_step,
        resolve_dtype,
    )
    from mm_megatron.train.config import JobConfig
    from mm_megatron.train.throughput import StepTimes, mfu, throughput

    bench = job_dict.pop("bench")
    job = JobConfig.from_dict(job_dict)
    t, cfg = job.train, job.model
    seq, images = int(bench["seq"]), int(bench["images"])
    from mm_megatron.runtime import cpu_runtime

    if cpu_runtime.on_cpu():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    distributed.initialize(job.parallel, seed=t.seed)
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        validate_layout(cfg, job.parallel, world, seq_len=seq)
        dp = parallel_state.get_data_parallel_world_size()
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ValueError(
                f"global batch {t.global_batch_size} is not a multiple of micro batch "
                f"{t.micro_batch_size} x DP {dp}"
            )
        n_micro = t.global_batch_size // (t.micro_batch_size * dp)
        dtype = resolve_dtype(t.precision)
        chunks = build_model(job, dtype)
        optimizer = build_optimizer(job, chunks, dtype)
        device = cpu_runtime.device()
        gen = torch.Generator().manual_seed(t.seed + parallel_state.get_data_parallel_rank())
        step_times, data_times = [], []
        for step in range(int(bench["warmup"]) + int(bench["steps"])):
            _sync()
            start = time.perf_counter()
            batches = [
                synthetic_batch(
                    cfg, seq, t.micro_batch_size, images=images, generator=gen, device=device
                )
                for _ in range(n_micro)
            ]
            fetched = time.perf_counter()
            for c in chunks:
                c.zero_grad_buffer()
            optimizer.zero_grad()
            forward_backward(chunks, batches)
            optimizer_step(optimizer, t.clip_grad)
            _sync()
            end = time.perf_counter()
            if step >= int(bench["warmup"]):
                step_times.append(end - start)
                data_times.append(fetched - start)
        peaks = [None] * world
        dist.all_gather_object(peaks, peak_memory_mib())
        # the slowest rank sets the pace: take the max over ranks step by step
        times = torch.tensor(step_times, dtype=torch.float64)
        waits = torch.tensor(data_times, dtype=torch.float64)
        if world > 1:
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
            dist.all_reduce(waits, op=dist.ReduceOp.MAX)
        if rank != 0:
            return {}
        summary = StepTimes.of(times.tolist())
        gbs = t.global_batch_size
        tiles = gbs * images * representative_image(cfg).tiles  # encoder passes in the step
        flops = train_step_flops(cfg, [seq] * gbs, tiles).total
        rates = throughput(
            tokens=gbs * seq, flops=flops, seconds=summary.median, world_size=world, samples=gbs
        )
        result = {
            "ok": True,
            "world_size": world,
            "dp": dp,
            "micro_batches": n_micro,
            "dtype": str(dtype).removeprefix("torch."),
            "device": device.type,
            "step_times_s": times.tolist(),
            "step_time_median_s": summary.median,
            "step_time_spread_s": summary.spread,
            "tokens_per_sec_per_gpu": rates.tokens_per_sec_per_gpu,
            "samples_per_sec": rates.samples_per_sec,
            "tflops_per_gpu": rates.tflops_per_gpu,
            "mfu": mfu(rates.tflops_per_gpu, bench.get("peak_tflops")),
            "model_flops_per_step": flops,
            "peak_memory_mib": peaks,
            "data_wait_share": float(waits.sum() / max(times.sum().item(), 1e-12)),
        }
        out.write_text(json.dumps(result, indent=1), encoding="utf-8")
        return result
    finally:
        distributed.destroy()


def _reason(exc: BaseException) -> str:
    """One line for a failed layout: OOM named as such, else the exception's first line."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc).lower():
        return f"OOM: {text}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point of one rank: ``worker JOB.json RESULT.json``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m mm_megatron.bench.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    job_path, out = Path(argv[0]), Path(argv[1])
    rank = int(os.environ.get("RANK", "0"))
    try:
        run(json.loads(job_path.read_text(encoding="utf-8")), out)
    except BaseException as e:  # noqa: BLE001 - every failure becomes the layout's reason
        Path(f"{out}.rank{rank}").write_text(
            json.dumps({"ok": False, "reason": _reason(e), "traceback": traceback.format_exc()}),
            encoding="utf-8",
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
