"""Training logs: the Megatron-style iteration line, a memory line, TensorBoard and metrics.jsonl.

What this file does: `IntervalStats` accumulates what happens between two log lines (time,
real tokens, model FLOPs, losses); `format_log_line` and `memory_line` turn them into text in the
spirit of Megatron-LM's ``training_log``::

    iteration   10/ 100 | consumed samples: 160 | elapsed time per iteration (ms): 212.4 |
    throughput per GPU (tokens/s/GPU): 1870.2 | model TFLOP/s/GPU: 0.004 | learning rate:
    1.000000E-03 | lm loss: 3.912345E+00 | grad norm: 0.812 | skipped iterations: 0 |
    nan iterations: 0 | bad samples: 0 (0.00%)
    [memory] rss: 812.3 MiB | peak rss: 901.0 MiB

(on GPU the memory line shows torch.cuda allocated / max allocated / reserved instead).
`MetricsWriter` (rank 0 only) prints the lines and writes the same scalars to TensorBoard
(`torch.utils.tensorboard.SummaryWriter`) and, one JSON object per logged step, to
``<run_dir>/metrics.jsonl`` (floats at full precision, so runs can be compared exactly).

What it does not do: compute the numbers (the trainer, `mm_megatron.model.flops` and
`mm_megatron.train.throughput` do) or reduce across ranks.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TENSORBOARD_NAMES = {
    "loss": "lm_loss_last_step",
    "lm_loss": "lm_loss_mean_since_last_log",
}
"""metrics.jsonl key -> TensorBoard tag where the key alone is ambiguous (`loss` is the last
step's loss, `lm_loss` the mean over the steps since the previous log line)."""


@dataclass
class IntervalStats:
    """Sums over the steps since the last log line."""

    steps: int = 0
    """Steps in the interval."""
    tokens: float = 0.0
    """Real tokens processed (all DP ranks)."""
    flops: float = 0.0
    """Model FLOPs (all ranks)."""
    loss_sum: float = 0.0
    """Sum of the finite step losses."""
    loss_steps: int = 0
    """Steps with a finite loss."""
    start: float = field(default_factory=time.perf_counter)
    """Start time of the interval."""

    def add(self, tokens: float, flops: float, loss: float) -> None:
        """Account one step."""
        self.steps += 1
        self.tokens += tokens
        self.flops += flops
        if math.isfinite(loss):
            self.loss_sum += loss
            self.loss_steps += 1

    @property
    def mean_loss(self) -> float:
        """Mean finite loss of the interval (NaN if none)."""
        return self.loss_sum / self.loss_steps if self.loss_steps else float("nan")


def format_log_line(
    *,
    iteration: int,
    train_iters: int,
    consumed_samples: int,
    elapsed_ms: float,
    tokens_per_sec_per_gpu: float,
    tflops_per_gpu: float,
    lr: float,
    loss: float,
    grad_norm: float,
    skipped: int,
    nan_iters: int,
    bad_samples: int,
    samples_read: int,
) -> str:
    """One Megatron-style iteration line (see the module docstring)."""
    width = len(str(train_iters))
    bad_pct = 100.0 * bad_samples / samples_read if samples_read else 0.0
    parts = [
        f"iteration {iteration:>{width}}/{train_iters}",
        f"consumed samples: {consumed_samples}",
        f"elapsed time per iteration (ms): {elapsed_ms:.1f}",
        f"throughput per GPU (tokens/s/GPU): {tokens_per_sec_per_gpu:.1f}",
        f"model TFLOP/s/GPU: {tflops_per_gpu:.4f}",
        f"learning rate: {lr:.6E}",
        f"lm loss: {loss:.6E}",
        f"grad norm: {grad_norm:.4f}",
        f"skipped iterations: {skipped}",
        f"nan iterations: {nan_iters}",
        f"bad samples: {bad_samples} ({bad_pct:.2f}%)",
    ]
    return " | ".join(parts)


def memory_stats() -> dict[str, float]:
    """Memory use of this process in MiB: RSS on CPU, torch.cuda counters on GPU."""
    mib = 1024.0 * 1024.0
    from mm_megatron.runtime import cpu_runtime

    if torch.cuda.is_available() and not cpu_runtime.is_active():
        return {
            "mem_allocated_mib": torch.cuda.memory_allocated() / mib,
            "mem_max_allocated_mib": torch.cuda.max_memory_allocated() / mib,
            "mem_reserved_mib": torch.cuda.memory_reserved() / mib,
        }
    import resource

    import psutil

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "mem_rss_mib": psutil.Process().memory_info().rss / mib,
        "mem_peak_rss_mib": peak_kib / 1024.0,
    }


def memory_line(stats: dict[str, float]) -> str:
    """`[memory] ...` line for `memory_stats()`."""
    names = {
        "mem_rss_mib": "rss",
        "mem_peak_rss_mib": "peak rss",
        "mem_allocated_mib": "allocated",
        "mem_max_allocated_mib": "max allocated",
        "mem_reserved_mib": "reserved",
    }
    return "[memory] " + " | ".join(f"{names[k]}: {v:.1f} MiB" for k, v in stats.items())


class MetricsWriter:
    """Prints log lines and writes scalars to TensorBoard and metrics.jsonl (rank 0 only).

    Args:
        enabled: False on every rank but 0 (then every method does nothing).
        jsonl_path: Where to append one JSON object per logged step (None: nowhere).
        tensorboard_dir: SummaryWriter directory (None: no TensorBoard).
    """

    def __init__(self, enabled: bool, jsonl_path: Path | None, tensorboard_dir: Path | None):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        if jsonl_path is not None:
            jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def print(self, line: str) -> None:
        """Print a line to stdout (flushed)."""
        if self.enabled:
            print(line, file=sys.stdout, flush=True)

    def scalars(self, iteration: int, values: dict[str, Any], prefix: str = "train") -> None:
        """Record `values` at `iteration` in TensorBoard (as ``prefix/name``, with the names of
        `TENSORBOARD_NAMES`) and the JSONL (keys as given)."""
        if not self.enabled:
            return
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    tag = TENSORBOARD_NAMES.get(name, name)
                    self._tb.add_scalar(f"{prefix}/{tag}", value, iteration)
            self._tb.flush()
        if self._jsonl is not None:
            record = {"kind": prefix, "iteration": iteration, **values}
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()

    def samples(self, iteration: int, samples: list, answers: list[str]) -> None:
        """Held-out images with the model's answers: TensorBoard image + text, and the JSONL."""
        if not self.enabled:
            return
        if self._tb is not None:
            import numpy as np

            from mm_megatron.data.image import decode_image

            for i, (sample, answer) in enumerate(zip(samples, answers)):
                pixels = np.asarray(decode_image(sample.image_bytes))  # [H, W, 3] uint8
                self._tb.add_image(f"samples/{i}", pixels, iteration, dataformats="HWC")
                text = f"**generated:** {answer}  \n**reference:** {sample.reference}"
                self._tb.add_text(f"samples/{i}", text, iteration)
            self._tb.flush()
        if self._jsonl is not None:
            rows = [
                {"key": s.key, "answer": a, "reference": s.reference}
                for s, a in zip(samples, answers)
            ]
            record = {"kind": "samples", "iteration": iteration, "samples": rows}
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()

    def close(self) -> None:
        """Flush and close the outputs."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def read_metrics(path: str | Path, kind: str = "train") -> dict[int, dict[str, Any]]:
    """metrics.jsonl -> {iteration: record} for records of `kind` (later records win)."""
    out: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("kind") == kind:
                out[int(record["iteration"])] = record
    return out
