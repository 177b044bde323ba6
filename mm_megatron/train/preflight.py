"""Start-up checks: fail before any work, with every culprit named in one line.

What this file does:
- `job_problems(job, world_size)`: what can be known from the job config and the file system
  before megatron is even imported (it imports neither torch nor megatron, so it answers in well
  under a second): every layout problem at once (`parallel.layout.layout_problems`, plus the
  global batch against micro batch x DP), `--data-path` without `--tokenizer`, a missing
  tokenizer directory, an unwritable `--save` or `--run-dir`, and a warm-up longer than the run.
- `check_job(job, world_size)`: raises `PreflightError` (a ValueError, so the CLI prints it as
  one line) listing them all; `mm-megatron train` calls it before importing the trainer, and the
  trainer again before starting torch.distributed.
- `check_checkpoint_space(save_dir, chunks, ...)`: after the model and optimizer are built and
  before the first step, whether one checkpoint fits in the free space of `--save`.
- `yaml_error_line(path, error)`: a YAML parse error as one line naming the file, line and
  column.

What it does not do: fix anything, or check what only the data can tell (bad samples are
counted by the loader).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from mm_megatron.parallel.layout import layout_problems

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""Any of these makes a directory a HF tokenizer directory."""

ADAM_STATE_BYTES = 8
"""Two fp32 moments per trained parameter."""


class PreflightError(ValueError):
    """The job cannot run; the one-line message names every culprit."""


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_problem(path: str | Path, what: str) -> str | None:
    """Why `path` (existing or to be created) cannot be written, or None."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{what} {path} is a file, not a directory"
    base = _nearest_existing(path)
    if not base.is_dir():
        return f"{what} {path} cannot be created: {base} is a file, not a directory"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"{what} {path} is not writable ({base} does not allow writing)"
    return None


def _tokenizer_problems(data: Any) -> list[str]:
    shards, tokenizer = data.train_shards, data.tokenizer_path
    if tokenizer is None:
        if not shards:
            return []  # the generated synthetic dataset brings its own
        beside = Path(shards) if Path(shards).is_dir() else Path(shards).parent
        if (beside / "tokenizer").is_dir():
            return []  # a dataset directory that carries its tokenizer
        return [
            f"--data-path {shards} needs --tokenizer DIR (data.tokenizer_path): the HF tokenizer "
            "directory the conversations are tokenized with"
        ]
    path = Path(tokenizer)
    if not path.is_dir():
        return [
            f"tokenizer directory {tokenizer} does not exist (--tokenizer / data.tokenizer_path)"
        ]
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        names = ", ".join(TOKENIZER_FILES)
        return [f"tokenizer directory {tokenizer} holds no tokenizer (none of {names})"]
    return []


def job_problems(job: Any, world_size: int) -> list[str]:
    """Every problem of `job` on `world_size` ranks that can be known before work starts.

    Args:
        job: A `JobConfig`.
        world_size: Ranks the job runs on.
    """
    t, par = job.train, job.parallel
    problems = layout_problems(job.model, par, world_size)
    mp = par.tp * par.pp * par.cp
    if not problems and mp >= 1 and world_size % mp == 0:
        dp = world_size // mp
        per_step = t.micro_batch_size * dp
        if per_step < 1 or t.global_batch_size % per_step:
            problems.append(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                f"micro_batch_size * DP = {t.micro_batch_size} * {dp}"
            )
    problems += _tokenizer_problems(job.data)
    for value, what in ((t.save, "--save"), (job.run_dir, "--run-dir")):
        if value:
            problem = writable_problem(value, what)
            if problem:
                problems.append(problem)
    if t.warmup_iters > t.train_iters:
        problems.append(
            f"the warm-up ({t.warmup_iters} steps) is longer than the run "
            f"(train.train_iters={t.train_iters}); lower --lr-warmup-iters"
        )
    return problems


def check_job(job: Any, world_size: int | None = None) -> None:
    """Raise `PreflightError` naming every problem `job_problems` finds.

    Args:
        job: A `JobConfig`.
        world_size: Ranks; None reads torchrun's/SLURM's `WORLD_SIZE` (1 without it).
    """
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    problems = job_problems(job, world_size)
    if problems:
        raise PreflightError("; ".join(problems))


def checkpoint_bytes(chunks: list, param_bytes: int, main_params: bool) -> int:
    """This rank's share of one checkpoint: weights, plus fp32 main params and Adam moments of
    the trained ones.

    Args:
        chunks: The rank's model chunks.
        param_bytes: Bytes per weight element (2 for bf16, 4 for fp32).
        main_params: Whether the optimizer keeps separate fp32 main params (bf16 training).
    """
    per_trained = ADAM_STATE_BYTES + (4 if main_params else 0)
    total = 0
    for chunk in chunks:
        for p in chunk.parameters():
            total += p.numel() * (param_bytes + (per_trained if p.requires_grad else 0))
    return total


def check_checkpoint_space(save_dir: str | Path, needed: int) -> None:
    """Raise `PreflightError` unless `needed` bytes (one checkpoint) fit in `save_dir`'s disk.

    Args:
        save_dir: `--save` (it may not exist yet).
        needed: Estimated bytes of one checkpoint (all ranks together).
    """
    base = _nearest_existing(Path(save_dir))
    free = shutil.disk_usage(base).free
    if free < needed:
        raise PreflightError(
            f"not enough free disk space for one checkpoint in --save {save_dir}: needs about "
            f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free on {base}"
        )


def yaml_error_line(path: str | Path, error: Exception) -> str:
    """One line for a YAML parse error in `path`: file, line, column and the problem."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{path}: invalid YAML{where}: {problem}"
