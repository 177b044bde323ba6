"""`mm-megatron bench`: a throughput sweep over parallel layouts, one torchrun job per layout.

What this file does: parses layout names (``tp2pp1cp1``, optionally ``-sp``, ``-vp2``, ``-do``
for sequence parallel, virtual stages and the distributed optimizer), checks each against the
model and world size up front (an impossible layout becomes a row with the reason, nothing is
launched), runs the valid ones one after another as ``torchrun -m mm_megatron.bench.worker``
(synthetic data; gloo on CPU, NCCL on GPU), prints a progress line per layout, and writes the
table to stdout, ``bench.csv``, ``bench.json`` and a plot ``bench.png`` (throughput and peak
memory per layout). A layout that fails (OOM, error, timeout) becomes a row with its reason; the
sweep goes on.

What it does not do: the timing itself or the throughput arithmetic (`worker.py`,
`throughput.py`), or choose layouts (`planner.py`).
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm_megatron.config.parallel_config import ParallelConfig

_LAYOUT = re.compile(r"^tp(\d+)pp(\d+)cp(\d+)((?:-(?:sp|do|vp\d+))*)$")

COLUMNS = (
    "layout",
    "status",
    "world_size",
    "dp",
    "tokens_per_sec_per_gpu",
    "samples_per_sec",
    "step_time_median_s",
    "step_time_spread_s",
    "tflops_per_gpu",
    "mfu",
    "peak_memory_mib",
    "data_wait_share",
    "reason",
)
"""Columns of bench.csv (bench.json holds the same rows plus per-step times and per-rank memory)."""


@dataclass
class Layout:
    """One layout of the sweep."""

    name: str
    """As given on the command line."""
    parallel: ParallelConfig
    """TP/PP/CP, SP and virtual stages."""
    distributed_optimizer: bool = False
    """Shard the optimizer state over DP."""


def parse_layout(name: str) -> Layout:
    """``tp2pp1cp1[-sp][-vp2][-do]`` -> Layout (ValueError names the bad part)."""
    m = _LAYOUT.match(name.strip())
    if not m:
        raise ValueError(
            f"bad layout {name!r}; write tp<N>pp<N>cp<N> with optional -sp, -vp<N>, -do "
            "(e.g. tp2pp1cp1-sp)"
        )
    flags = [f for f in m.group(4).split("-") if f]
    vp = next((int(f[2:]) for f in flags if f.startswith("vp")), None)
    par = ParallelConfig(
        tp=int(m.group(1)),
        pp=int(m.group(2)),
        cp=int(m.group(3)),
        sequence_parallel="sp" in flags,
        virtual_pp=vp,
    )
    return Layout(name.strip(), par, distributed_optimizer="do" in flags)


@dataclass
class SweepSettings:
    """Everything but the layouts."""

    preset: str
    """Model preset."""
    nproc: int | None = None
    """Ranks per job; None = TP*PP*CP of each layout (DP 1)."""
    steps: int = 5
    """Timed steps."""
    warmup: int = 2
    """Untimed steps first."""
    seq: int | None = None
    """Expanded sequence length; None = 2 x tokens per image."""
    mbs: int = 1
    """Micro-batch size."""
    gbs: int | None = None
    """Global batch size; None = mbs x DP (one micro-batch per step and rank)."""
    images: int = 1
    """Images per sample."""
    spec: str = "local"
    """local or te."""
    precision: str = "auto"
    """auto, bf16 or fp32."""
    peak_tflops: float | None = None
    """GPU peak for MFU (None: detected, or no MFU)."""
    timeout: float = 600.0
    """Seconds one layout may take."""
    overrides: list[str] = field(default_factory=list)
    """Dotted ``section.key=value`` overrides for every job."""


def build_job(s: SweepSettings, layout: Layout, world: int) -> dict[str, Any]:
    """The worker's JOB.json content for one layout (validated; ValueError if impossible)."""
    from mm_megatron.parallel.layout import validate_layout
    from mm_megatron.train.config import load_job_config

    job = load_job_config(s.preset, overrides=list(s.overrides))
    job.model.set_spec(s.spec)
    job.parallel = layout.parallel
    from mm_megatron.model.image_tokens import representative_image

    seq = s.seq or 2 * representative_image(job.model).tokens
    validate_layout(job.model, job.parallel, world, seq_len=seq)
    dp = world // layout.parallel.model_parallel_size
    t = job.train
    t.micro_batch_size = s.mbs
    t.global_batch_size = s.gbs or s.mbs * dp
    t.precision = s.precision
    t.use_distributed_optimizer = layout.distributed_optimizer
    if t.global_batch_size % (s.mbs * dp):
        raise ValueError(f"--gbs {t.global_batch_size} is not a multiple of mbs {s.mbs} x DP {dp}")
    if layout.distributed_optimizer and dp == 1:
        raise ValueError("-do (distributed optimizer) needs DP > 1")
    job.validate()
    d = job.to_dict()
    d["bench"] = {
        "steps": s.steps,
        "warmup": s.warmup,
        "seq": seq,
        "images": s.images,
        "peak_tflops": s.peak_tflops,
    }
    return d


def run_layout(s: SweepSettings, layout: Layout, out_dir: Path) -> dict[str, Any]:
    """Run one layout as its own torchrun job; returns its row (ok or with a reason)."""
    world = s.nproc or layout.parallel.model_parallel_size
    row: dict[str, Any] = {"layout": layout.name, "world_size": world}
    try:
        job = build_job(s, layout, world)
    except ValueError as e:
        return {**row, "status": "invalid", "reason": str(e)}
    jobs, logs = out_dir / "jobs", out_dir / "logs"
    jobs.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    job_path, result = jobs / f"{layout.name}.json", jobs / f"{layout.name}.result.json"
    job_path.write_text(json.dumps(job, indent=1), encoding="utf-8")
    for stale in jobs.glob(f"{layout.name}.result.json*"):
        stale.unlink()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={world}", "-m", "mm_megatron.bench.worker", str(job_path), str(result),
    ]  # fmt: skip
    env = dict(
        os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")
    )
    log = logs / f"{layout.name}.log"
    with open(log, "w", encoding="utf-8") as fh:
        try:
            proc = subprocess.run(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=s.timeout
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    if code == 0 and result.is_file():
        data = json.loads(result.read_text(encoding="utf-8"))
        return {**row, "status": "ok", **data}
    reasons = []
    for f in sorted(jobs.glob(f"{layout.name}.result.json.rank*")):
        reasons.append(json.loads(f.read_text(encoding="utf-8"))["reason"])
    if code is None:
        reason = f"timeout after {s.timeout:.0f} s"
    else:
        reason = reasons[0] if reasons else f"exit code {code}; see {log}"
    return {**row, "status": "failed", "reason": reason}


_FORMATS = {
    "tokens_per_sec_per_gpu": "{:.1f}",
    "samples_per_sec": "{:.2f}",
    "step_time_median_s": "{:.4f}",
    "step_time_spread_s": "{:.4f}",
    "tflops_per_gpu": "{:.4g}",
    "mfu": "{:.1%}",
    "peak_memory_mib": "{:.0f}",
    "data_wait_share": "{:.1%}",
}


def _fmt(key: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    return _FORMATS.get(key, "{}").format(value)


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """The CSV form of a row: peak memory is the max over ranks."""
    out = {k: row.get(k, "") for k in COLUMNS}
    peaks = row.get("peak_memory_mib")
    out["peak_memory_mib"] = max(peaks) if peaks else ""
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """The stdout table."""
    head = ("layout", "status", "GPUs", "tok/s/GPU", "samples/s", "step s (med)", "spread",
            "TFLOP/s/GPU", "MFU", "peak MiB", "data wait")  # fmt: skip
    lines = ["  ".join(f"{h:>12}" for h in head)]
    for r in rows:
        f = flat_row(r)
        keys = ("layout", "status", "world_size", "tokens_per_sec_per_gpu", "samples_per_sec",
                "step_time_median_s", "step_time_spread_s", "tflops_per_gpu", "mfu",
                "peak_memory_mib", "data_wait_share")  # fmt: skip
        lines.append("  ".join(f"{_fmt(k, f[k]):>12}" for k in keys))
        if f["reason"]:
            lines.append(f"{'':>12}  {f['reason']}")
    return "\n".join(lines)


def write_outputs(rows: list[dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> None:
    """bench.csv, bench.json and bench.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "bench.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(flat_row(r))
    (out_dir / "bench.json").write_text(
        json.dumps({"settings": meta, "rows": rows}, indent=1), encoding="utf-8"
    )
    plot(rows, out_dir / "bench.png", title=meta.get("title", ""))


def plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Bars of tokens/s/GPU and peak memory per layout (failed layouts marked).

    Without matplotlib (e.g. a bare GPU image) the plot is skipped with a note; the CSV and JSON
    are written regardless.
    """
    try:
        import matplotlib
    except ImportError:
        print(f"[bench] matplotlib is not installed: {path} not written", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["layout"] for r in rows]
    ok = [r.get("status") == "ok" for r in rows]
    tput = [r.get("tokens_per_sec_per_gpu") or 0.0 for r in rows]
    mem = [max(r["peak_memory_mib"]) if r.get("peak_memory_mib") else 0.0 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows)), 4))
    colors = ["tab:blue" if k else "tab:gray" for k in ok]
    ax1.bar(names, tput, color=colors)
    ax1.set_ylabel("tokens/s/GPU")
    ax1.set_title("throughput")
    ax2.bar(names, mem, color=["tab:orange" if k else "tab:gray" for k in ok])
    ax2.set_ylabel("peak memory per rank (MiB)")
    ax2.set_title("memory (max over ranks)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
        for i, r in enumerate(rows):
            if not ok[i]:
                ax.text(i, 0, r.get("status", "failed"), ha="center", va="bottom", rotation=90)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_sweep(s: SweepSettings, layouts: list[str], out_dir: Path) -> list[dict[str, Any]]:
    """Run every layout (progress line per layout) and write the outputs; returns the rows."""
    parsed = [parse_layout(name) for name in layouts]
    if s.peak_tflops is None:
        from mm_megatron.bench.gpus import detect_peak_tflops

        s.peak_tflops = detect_peak_tflops()
    rows = []
    for i, layout in enumerate(parsed, 1):
        start = time.perf_counter()
        row = run_layout(s, layout, out_dir)
        took = time.perf_counter() - start
        if row["status"] == "ok":
            what = (
                f"{row['tokens_per_sec_per_gpu']:.1f} tokens/s/GPU, step "
                f"{row['step_time_median_s']:.3f} s, peak {max(row['peak_memory_mib']):.0f} MiB"
            )
        else:
            what = f"{row['status'].upper()}: {row['reason']}"
        print(f"[bench {i}/{len(parsed)}] {layout.name}: {what} ({took:.1f} s)", flush=True)
        rows.append(row)
    device = "GPU" if s.peak_tflops else "CPU (gloo; proves the harness, not the speed)"
    meta = {**vars(s), "layouts": layouts, "title": f"{s.preset} on {device}"}
    write_outputs(rows, out_dir, meta)
    return rows
