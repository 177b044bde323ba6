"""Helpers of tools/gpu_check.sh: environment facts, loss-curve and resume comparisons, summary.

    python3 tools/gpu_check.py env OUT.json
    python3 tools/gpu_check.py init-ckpt DIR                 # debug-tiny initial weights (CPU)
    python3 tools/gpu_check.py curves OUT.json REF_RUN RUN [RUN ...]
    python3 tools/gpu_check.py resume OUT.json CPU_FIRST GPU_FIRST CPU_RESUMED GPU_RESUMED
    python3 tools/gpu_check.py summary OUT_DIR

Each writes one JSON file; none raises on a bad result (the JSON says pass/fail), so the shell
script always gets to the next check. Tolerances: a bf16 loss curve tracks the fp32 one when the
mean |difference| over all steps is <= 0.05 and the last ten steps' means differ by <= 0.05;
CPU and GPU fp32 runs agree within 1e-2 (relative) per step before and after resuming.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _write(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1), encoding="utf-8")
    print(json.dumps({k: v for k, v in data.items() if not isinstance(v, (list, dict))}))


def losses(run_dir: str) -> dict[int, float]:
    """Per-step losses from a run's metrics.jsonl (log interval 1)."""
    from mm_megatron.train.metrics import read_metrics

    return {it: float(r["loss"]) for it, r in read_metrics(Path(run_dir) / "metrics.jsonl").items()}


def cmd_env(out: str) -> None:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available()}  # fmt: skip
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
    for mod in ("megatron.core", "transformer_engine", "transformers", "mm_megatron.cli"):
        try:
            m = __import__(mod, fromlist=["_"])
            info[mod] = getattr(m, "__version__", "ok")
        except Exception as e:  # noqa: BLE001 - recorded, not raised
            info[mod] = f"missing: {type(e).__name__}: {e}".splitlines()[0]
    _write(out, info)


def cmd_init_ckpt(directory: str) -> None:
    from mm_megatron.checkpoint import model_io
    from mm_megatron.config import ParallelConfig, get_preset
    from mm_megatron.model.build import build_llava_model
    from mm_megatron.runtime import distributed

    cfg = get_preset("debug-tiny")
    distributed.initialize(ParallelConfig(), seed=1234)
    try:
        model_io.save_checkpoint(build_llava_model(cfg), directory, cfg)
    finally:
        distributed.destroy()


def cmd_curves(out: str, ref: str, *runs: str) -> None:
    want = losses(ref)
    result = {"reference": ref, "reference_steps": len(want), "runs": {}}
    ok = bool(want)
    for run in runs:
        got = losses(run)
        steps = sorted(set(want) & set(got))
        if not steps:
            result["runs"][run] = {"pass": False, "reason": "no common steps"}
            ok = False
            continue
        diffs = [abs(got[s] - want[s]) for s in steps]
        tail = steps[-10:]
        tail_diff = abs(sum(got[s] for s in tail) - sum(want[s] for s in tail)) / len(tail)
        passed = sum(diffs) / len(diffs) <= 0.05 and tail_diff <= 0.05
        result["runs"][run] = {
            "steps": len(steps), "mean_abs_diff": sum(diffs) / len(diffs),
            "max_abs_diff": max(diffs), "last10_mean_diff": tail_diff,
            "first_loss": got[steps[0]], "last_loss": got[steps[-1]],
            "ref_first_loss": want[steps[0]], "ref_last_loss": want[steps[-1]], "pass": passed,
        }  # fmt: skip
        ok = ok and passed
    result["pass"] = ok
    _write(out, result)


def cmd_resume(
    out: str, cpu_first: str, gpu_first: str, cpu_resumed: str, gpu_resumed: str
) -> None:
    """CPU and GPU agree on steps 1-4, and each resumes the other's checkpoint at step 5 with
    the same losses (relative 1e-2: TF32 convolutions and reduction order differ by device)."""
    c4, g4, c6, g6 = (losses(r) for r in (cpu_first, gpu_first, cpu_resumed, gpu_resumed))

    def rel(a: dict[int, float], b: dict[int, float]) -> float:
        common = sorted(set(a) & set(b))
        if not common:
            return float("inf")
        return max(abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in common)

    first, resumed = rel(g4, c4), rel(c6, g6)
    passed = (
        sorted(c4) == sorted(g4) == [1, 2, 3, 4]
        and sorted(c6) == sorted(g6) == [5, 6]
        and first <= 1e-2
        and resumed <= 1e-2
    )
    _write(out, {"first_leg_max_rel_diff": first, "resumed_max_rel_diff": resumed,
                 "cpu_resumed_steps": sorted(c6), "gpu_resumed_steps": sorted(g6),
                 "pass": passed})  # fmt: skip


def cmd_summary(out_dir: str) -> None:
    out = Path(out_dir)
    summary = {}
    for f in sorted(out.glob("*.json")):
        if f.name == "summary.json":
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except ValueError:
            summary[f.stem] = "unreadable"
            continue
        summary[f.stem] = (
            data.get("pass", data.get("rc", "see file")) if isinstance(data, dict) else "?"
        )
    _write(str(out / "summary.json"), {"checks": summary})


def main(argv: list[str]) -> int:
    commands = {"env": cmd_env, "init-ckpt": cmd_init_ckpt, "curves": cmd_curves,
                "resume": cmd_resume, "summary": cmd_summary}  # fmt: skip
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    commands[argv[0]](*argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
