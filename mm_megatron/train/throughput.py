"""Throughput arithmetic shared by the trainer's log line and the benchmarks.

What this file does: turns counted work (real tokens, samples, model FLOPs from
`mm_megatron.model.flops`) and a measured wall time into tokens/s/GPU, samples/s, model
TFLOP/s/GPU and MFU, and summarises per-step times (median, spread). Every number a benchmark
reports is computed here from counters, never parsed back from a log line.

MFU = model TFLOP/s per GPU / the GPU's dense bf16 peak (`mm_megatron/bench/gpus.py` or
``--peak-tflops``). Model FLOPs count what the model needs (3x/2x/1x forward by freeze state),
not recomputation, so activation recompute lowers MFU: that is intended.

What it does not do: measure time or memory, or reduce across ranks.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Throughput:
    """Rates over an interval, per GPU where it says so."""

    tokens_per_sec_per_gpu: float
    """Real (unpadded, image-expanded) tokens per second per GPU."""
    samples_per_sec: float
    """Samples per second over the whole job."""
    tflops_per_gpu: float
    """Model TFLOP/s per GPU."""


def throughput(
    *, tokens: float, flops: float, seconds: float, world_size: int, samples: float = 0.0
) -> Throughput:
    """Rates of an interval in which the whole job processed ``tokens``/``samples``/``flops``.

    Args:
        tokens: Real tokens of all data-parallel replicas in the interval.
        flops: Model FLOPs of the whole job in the interval.
        seconds: Wall time of the interval.
        world_size: GPUs (ranks) of the job.
        samples: Samples of all replicas in the interval.
    """
    seconds = max(seconds, 1e-12)
    return Throughput(
        tokens_per_sec_per_gpu=tokens / seconds / world_size,
        samples_per_sec=samples / seconds,
        tflops_per_gpu=flops / seconds / world_size / 1e12,
    )


def mfu(tflops_per_gpu: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None without a known peak)."""
    if not peak_tflops:
        return None
    return tflops_per_gpu / peak_tflops


@dataclass(frozen=True)
class StepTimes:
    """Summary of per-step wall times (seconds)."""

    median: float
    """Median step time."""
    spread: float
    """Interquartile range (p75 - p25); 0 with fewer than two steps."""
    mean: float
    """Mean step time."""

    @classmethod
    def of(cls, times: Sequence[float]) -> StepTimes:
        """Summarise ``times`` (at least one)."""
        if not times:
            raise ValueError("no step times to summarise")
        if len(times) < 2:
            return cls(median=times[0], spread=0.0, mean=times[0])
        q = statistics.quantiles(times, n=4, method="inclusive")
        return cls(
            median=statistics.median(times), spread=q[2] - q[0], mean=statistics.fmean(times)
        )
