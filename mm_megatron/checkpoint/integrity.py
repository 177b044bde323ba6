"""Checkpoints that never betray a resume: integrity records, damaged-checkpoint fallback, save
failures explained, non-finite state refused.

What this file does:
- `write_record(iter_dir)`: at save, after every file of an iteration directory is written and
  before it is renamed into place, record each file's size and SHA-256 in `integrity.json`.
- `check_record(iter_dir)`: the problems of a checkpoint against its record (a file missing,
  truncated, grown or changed), each naming the file; none for an intact one. Checkpoints written
  before records existed have no record and are not checked.
- `resume_iteration(ckpt_dir, latest, iterations)`: the newest intact checkpoint, starting at the
  tracker's; a damaged one is reported by file name and skipped with a warning; collective (rank 0
  checks, the others receive its answer).
- `explain_save_failure(exc, directory)`: turns a failed write into `CheckpointSaveError`; a full
  disk (megatron/torch report it as e.g. `unexpected pos 704 vs 598`, with the OSError lost) says
  "no space left on device" with the directory.
- `first_non_finite(chunks, optimizer)`: the name of the first weight, main parameter or optimizer
  state tensor holding NaN/inf, so that such a state is never saved as a resumable checkpoint.

What it does not do: write or read the dist checkpoint itself (`mm_megatron.train.checkpointing`
and `model_io` do, and call these functions), or decide when to save.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

RECORD = "integrity.json"
"""Name of the record inside an iteration directory."""

LOW_SPACE_BYTES = 1 << 20
"""After a failed write, less free space than this means the disk filled up."""


class CheckpointDamagedError(RuntimeError):
    """No intact checkpoint is left to resume from."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (the previous one stays the latest)."""


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(iter_dir: Path) -> list[Path]:
    return sorted(p for p in iter_dir.rglob("*") if p.is_file() and p.name != RECORD)


def write_record(iter_dir: str | Path) -> None:
    """Write `integrity.json` (size and SHA-256 of every file) into `iter_dir`, durably.

    Args:
        iter_dir: A complete (not yet renamed) iteration directory.
    """
    iter_dir = Path(iter_dir)
    files = {
        str(p.relative_to(iter_dir)): {"size": p.stat().st_size, "sha256": _digest(p)}
        for p in _files(iter_dir)
    }
    tmp = iter_dir / f".{RECORD}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"algorithm": "sha256", "files": files}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, iter_dir / RECORD)


def check_record(iter_dir: str | Path) -> list[str]:
    """Problems of `iter_dir` against its record, each naming a file ([] when intact or when the
    checkpoint predates records)."""
    iter_dir = Path(iter_dir)
    record_path = iter_dir / RECORD
    if not record_path.is_file():
        return []
    try:
        files = json.loads(record_path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, OSError) as e:
        return [f"{record_path}: unreadable integrity record ({e})"]
    problems = []
    for name, want in files.items():
        path = iter_dir / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{path}: {size} bytes, {want['size']} when saved (truncated?)")
        elif _digest(path) != want["sha256"]:
            problems.append(f"{path}: checksum differs from the one recorded at save")
    return problems


def _newest_intact(ckpt_dir: Path, latest: int, iterations: Iterable[int]) -> int | None:
    candidates = sorted({it for it in iterations if it <= latest} | {latest}, reverse=True)
    damaged = []
    for it in candidates:
        iter_dir = ckpt_dir / f"iter_{it:07d}"
        if not (iter_dir / "metadata.json").is_file():
            problems = [f"{iter_dir}: incomplete (no metadata.json)"]
        else:
            problems = check_record(iter_dir)
        if not problems:
            if damaged:
                log.warning(
                    "%s: resuming from iteration %d, the newest intact checkpoint", ckpt_dir, it
                )
            return it
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        log.warning("checkpoint iteration %d is damaged: %s%s; skipping it", it, problems[0], more)
        damaged.append(problems[0])
    if damaged:
        raise CheckpointDamagedError(
            f"{ckpt_dir}: no intact checkpoint to resume from; newest problem: {damaged[0]}"
        )
    return None


def resume_iteration(
    ckpt_dir: str | Path, latest: int | str | None, iterations: Iterable[int]
) -> int | str | None:
    """The checkpoint to resume from: `latest` if intact, else the newest intact older one.

    Collective when torch.distributed is initialised: rank 0 checks the files, every rank gets
    the same answer (or the same error).

    Args:
        ckpt_dir: The checkpoint directory.
        latest: What the tracker names (an iteration, ``"release"`` or None).
        iterations: The complete iterations in `ckpt_dir`.
    """
    if not isinstance(latest, int):
        return latest
    answer: list = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            answer[0] = _newest_intact(Path(ckpt_dir), latest, list(iterations))
        except CheckpointDamagedError as e:
            answer[0] = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], Exception):
        raise CheckpointDamagedError(str(answer[0]))
    return answer[0]


def _chain(exc: BaseException) -> Iterable[BaseException]:
    """`exc`, its causes, and the per-rank failures torch's `CheckpointException` carries."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]


def is_disk_full(exc: BaseException, directory: str | Path) -> bool:
    """Whether a failed write was a full disk: an ENOSPC anywhere in the exception chain, or
    (torch's writer loses the OSError) hardly any free space left in `directory`."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
    try:
        return shutil.disk_usage(directory).free < LOW_SPACE_BYTES
    except OSError:
        return False


def explain_save_failure(
    exc: BaseException, tmp_dir: Path, iteration: int, latest: int | str | None
) -> CheckpointSaveError:
    """A one-line `CheckpointSaveError` for a failed save (call after removing `tmp_dir`).

    Args:
        exc: What the writer raised.
        tmp_dir: The temporary iteration directory the save wrote into.
        iteration: The iteration being saved.
        latest: The checkpoint that stays the latest.
    """
    directory = tmp_dir.parent
    kept = f"iteration {latest}" if latest is not None else "none"
    if is_disk_full(exc, directory):
        free = shutil.disk_usage(directory).free if directory.is_dir() else 0
        return CheckpointSaveError(
            f"no space left on device saving checkpoint iteration {iteration} to {directory} "
            f"({free} bytes free); removed {tmp_dir.name}; the latest checkpoint stays {kept}"
        )
    last = list(_chain(exc))[-1]
    return CheckpointSaveError(
        f"saving checkpoint iteration {iteration} to {directory} failed: "
        f"{type(last).__name__}: {str(last).splitlines()[0] if str(last) else ''}; "
        f"removed {tmp_dir.name}; the latest checkpoint stays {kept}"
    )


def _optimizer_tensors(optimizer) -> Iterable[tuple[str, torch.Tensor]]:
    for i, sub in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        inner = getattr(sub, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for g, group in enumerate(inner.param_groups):
            for p, param in enumerate(group["params"]):
                yield f"optimizer {i} group {g} main param {p}", param
                for key, value in inner.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        yield f"optimizer {i} group {g} param {p} state {key!r}", value


def non_finite_anywhere(chunks: list, optimizer) -> str | None:
    """`first_non_finite` over all ranks (collective when torch.distributed is initialised):
    None only when every rank's state is finite, else the first rank's culprit with its rank."""
    local = first_non_finite(chunks, optimizer)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, local)
    return next((f"{name} on rank {r}" for r, name in enumerate(found) if name), None)


def first_non_finite(chunks: list, optimizer) -> str | None:
    """Name of the first weight or optimizer tensor with NaN/inf on this rank, or None.

    Args:
        chunks: Model chunks (their `named_parameters`).
        optimizer: The megatron optimizer (chained or not): main params and state tensors.
    """
    with torch.no_grad():
        for c, chunk in enumerate(chunks):
            for name, param in chunk.named_parameters():
                if not bool(torch.isfinite(param).all()):
                    return f"weight {name}" + (f" (chunk {c})" if len(chunks) > 1 else "")
        for name, tensor in _optimizer_tensors(optimizer):
            if not bool(torch.isfinite(tensor).all()):
                return name
    return None
