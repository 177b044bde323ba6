"""Outputs that explain themselves: where a run writes, what it recorded, and what to do next.

What this file does:
- `resolve_output_paths(job)` (the CLI calls it before `--print-config` and training): fills in
  `train.run_dir` (`runs/<preset>`), `train.save` (`<run_dir>/checkpoints`: every run keeps its
  final checkpoint) and `train.tensorboard_dir` (`<run_dir>/tensorboard`), and decides what a
  second run in the same place does: resume, when the checkpoint directory holds a checkpoint
  (announced), or write to a fresh `runs/<preset>-2` (`-3`, ...), when the default run
  directory holds an earlier run's logs but nothing to resume, so curves never mix (a run
  directory given explicitly is reused, announced). Returns the lines announcing it.
- `job_record(job, data)`: the job as recorded in checkpoints, with the resolved data config
  (template, tokenizer, splits) and absolute paths, so `generate` finds the run's tokenizer.
- `summary_lines(...)`: the end-of-run summary: what was trained, final metrics, where the
  checkpoint, metrics and TensorBoard logs are, and the exact next commands (export to HF,
  generate on a held-out image written to `<run_dir>/samples/`).

What it does not do: train, save checkpoints, or print (the caller prints the lines).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from typing import Any

LOG_NAMES = ("metrics.jsonl", "tensorboard")
"""What marks a run directory as used by an earlier run."""

_ITER_DIR = re.compile(r"^iter_\d{7}$")


def has_checkpoint(save_dir: str | Path | None) -> bool:
    """True when `save_dir` holds a checkpoint a run can resume from (tracker or iter_*)."""
    if not save_dir:
        return False
    save_dir = Path(save_dir)
    if (save_dir / "latest_checkpointed_iteration.txt").is_file():
        return True
    return save_dir.is_dir() and any(
        _ITER_DIR.match(p.name) and (p / "metadata.json").is_file() for p in save_dir.iterdir()
    )


def _used(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in LOG_NAMES)


def resolve_output_paths(job: Any) -> list[str]:
    """Fill in run_dir / save / tensorboard_dir of `job.train` in place; see the module docstring.

    Returns:
        Lines to print before the run starts (empty when nothing needs announcing).
    """
    t = job.train
    base = Path(t.run_dir) if t.run_dir else Path("runs") / (job.preset or "run")
    run_dir, notes = base, []
    save = t.save or str(run_dir / "checkpoints")
    if has_checkpoint(save):
        notes.append(
            f"[run] {save} holds a checkpoint: this run resumes from it (its logs append to "
            f"{run_dir}); pass --run-dir NEW_DIR to start afresh"
        )
    elif _used(run_dir) and t.run_dir:  # a directory the user named: theirs to reuse
        notes.append(
            f"[run] {run_dir} holds an earlier run's logs and no checkpoint to resume: this "
            "run starts at step 0 and appends to them"
        )
    elif _used(run_dir):
        n = 2
        while _used(Path(f"{base}-{n}")) or has_checkpoint(Path(f"{base}-{n}") / "checkpoints"):
            n += 1
        run_dir = Path(f"{base}-{n}")
        if not t.save:
            save = str(run_dir / "checkpoints")
        notes.append(
            f"[run] {base} holds an earlier run's logs and no checkpoint to resume: this run "
            f"writes to {run_dir}"
        )
    t.run_dir = str(run_dir)
    t.save = save
    if not t.tensorboard_dir:
        t.tensorboard_dir = str(run_dir / "tensorboard")
    return notes


def _absolute(value: Any) -> Any:
    if isinstance(value, str) and value and "," not in value and Path(value).exists():
        return str(Path(value).resolve())
    return value


def job_record(job: Any, data: Any) -> dict:
    """`job.to_dict()` with the resolved data config and absolute existing paths."""
    record = job.to_dict()
    record["data"] = {k: _absolute(v) for k, v in dataclasses.asdict(data).items()}
    record["train"] = {k: _absolute(v) for k, v in record["train"].items()}
    return record


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_lines(
    *,
    job: Any,
    parameters: int,
    trained: int,
    iteration: int,
    steps_this_run: int,
    consumed_samples: int,
    last_loss: float | None,
    evals: dict[int, dict[str, float]],
    template: str,
    train_data: str,
    checkpoint_iteration: int | None,
    sample_image: str | None,
    sample_prompt: str | None,
) -> list[str]:
    """The end-of-run summary (see the module docstring)."""
    t = job.train
    run_dir = job.run_dir
    lines = [
        "=" * 30 + " run summary " + "=" * 30,
        f"trained: preset {job.preset or '(from --load)'}, {parameters:,} parameters "
        f"({trained:,} trained), {iteration} steps ({steps_this_run} in this run), "
        f"{consumed_samples:,} samples, template {template}, data {train_data}",
    ]
    final = []
    if last_loss is not None:
        final.append(f"lm loss (last step) {last_loss:.4f}")
    if evals:
        step = max(evals)
        final += [f"{k} {_fmt(v)}" for k, v in evals[step].items()]
        final.append(f"(eval at step {step})")
    if final:
        lines.append("final: " + " | ".join(final))
    if checkpoint_iteration is not None and t.save:
        lines.append(f"checkpoint: {t.save} (iteration {checkpoint_iteration})")
    else:
        lines.append("checkpoint: none (no --save)")
    lines.append(f"metrics: {run_dir / 'metrics.jsonl'}")
    tb = t.tensorboard_dir or str(run_dir / "tensorboard")
    lines.append(f"tensorboard: tensorboard --logdir {tb}")
    if checkpoint_iteration is not None and t.save:
        ckpt = shlex.quote(str(t.save))
        lines.append("next:")
        hf_out = shlex.quote(str(run_dir / "hf"))
        lines.append(f"  mm-megatron convert mcore-to-hf --ckpt {ckpt} --out {hf_out}")
        generate = f"  mm-megatron generate --ckpt {ckpt}"
        if sample_image:
            generate += f" --image {shlex.quote(sample_image)}"
        if sample_prompt:
            generate += f" --prompt {shlex.quote(sample_prompt)}"
        lines.append(generate)
    return lines


def write_sample_image(run_dir: Path, val_shards: str | None) -> tuple[str | None, str | None]:
    """Write the first held-out image to `<run_dir>/samples/`; returns (path, its prompt)."""
    if not val_shards:
        return None, None
    from mm_megatron.infer.samples import heldout_samples

    samples = heldout_samples(val_shards, 1)
    if not samples:
        return None, None
    out = run_dir / "samples" / f"val-0.{samples[0].image_ext}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(samples[0].image_bytes)
    return str(out), samples[0].prompt.replace("<image>", "").strip() or None
