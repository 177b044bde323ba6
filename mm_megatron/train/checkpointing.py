"""Full training checkpoints on the mm_megatron checkpoint format: save atomically, resume exactly.

What this file does: saves and loads everything a run needs to continue bit-identically, with
megatron-core `dist_checkpointing` (torch_dist) in the directory format of
`mm_megatron.checkpoint.model_io` (``DIR/mm_megatron.json``,
``DIR/latest_checkpointed_iteration.txt``, ``DIR/iter_0000100/`` with keys ``model.*``), so a
training checkpoint is also a model checkpoint the converters and `--load` read. One iteration
directory holds:

- ``model.*`` (``model0.*``, ... for virtual stages): the weights (sharded, layout-independent);
- ``optimizer.*``: megatron optimizer state from ``optimizer.sharded_state_dict`` (fp32 main
  params, Adam moments, step; the distributed optimizer in its ``dp_reshardable`` form);
- ``rng_state``: one ShardedObject per rank (python, numpy, torch, CUDA and megatron's RNG
  tracker), indexed by (pp, tp, cp, dp) rank;
- ``data_state``: one ShardedObject per data-parallel rank (the loader's sample position and
  bad-sample counters);
- ``train_state`` (common, identical on all ranks): iteration, consumed samples, skipped steps,
  scheduler state, layout and the job config; also written as ``train_state.json``.

Atomicity: all ranks write into ``DIR/.tmp_iter_XXXXXXX``; when every rank is done (and
megatron has written ``metadata.json``), rank 0 renames it to ``iter_XXXXXXX``, then replaces
the tracker file through a temporary file, then deletes checkpoints beyond the newest `keep_last`.
A kill at any moment leaves the tracker pointing at a complete checkpoint. With `async_save` the
write runs in a forked process (megatron's async request) and the same finalisation runs when it
completes. Stale ``.tmp_*`` directories are removed at the next start.

Loading: `latest_iteration(DIR)` follows the tracker (falling back to the newest complete
``iter_*`` directory). `load_training_state` restores model, optimizer, scheduler, RNG (only at
the same layout) and data position (only at the same DP size); `load_weights` reads just the
model (`--load`, e.g. a converter's ``release``).

What it does not do: decide when to save (the trainer does), or convert formats.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from mm_megatron.checkpoint import model_io
from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.train.components import unwrap

log = logging.getLogger(__name__)

# megatron 0.19.2's synchronous torch_dist save runs through its "mcore" async path and warns
# that this path is deprecated on every first save; nothing here chooses it, so keep logs clean.
logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").addFilter(
    lambda record: "async save is deprecated" not in record.getMessage()
)

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
"""How megatron shapes the optimizer's sharded state (see DistributedOptimizer)."""

TRAIN_STATE_JSON = "train_state.json"
"""Human-readable copy of the common training state inside each iteration directory."""

_ITER_DIR = re.compile(r"^iter_(\d{7})$")
_ARCH_IGNORE = ("freeze_vision", "freeze_projector", "freeze_lm", "init_method_std", "spec")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def layout_info() -> dict[str, int]:
    """This job's parallel sizes (what RNG and data states depend on)."""
    ps = parallel_state
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


# --- directory helpers --------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_iterations(ckpt_dir: Path) -> list[int]:
    """Iterations with a complete dist checkpoint in `ckpt_dir`, ascending."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for child in ckpt_dir.iterdir():
        m = _ITER_DIR.match(child.name)
        if m and (child / "metadata.json").is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def latest_iteration(ckpt_dir: str | Path) -> int | str | None:
    """The checkpoint to resume from: the tracker's, else the newest complete one, else None.

    Returns:
        An iteration number, ``"release"`` (a weights-only checkpoint) or None.
    """
    ckpt_dir = Path(ckpt_dir)
    tracker = ckpt_dir / model_io.TRACKER
    if tracker.is_file():
        try:
            it = model_io.read_tracker(ckpt_dir)
            model_io.dist_checkpoint_dir(ckpt_dir, it)
            return it
        except (ValueError, OSError) as e:
            log.warning("%s: %s; falling back to the newest complete checkpoint", tracker, e)
    done = complete_iterations(ckpt_dir)
    return done[-1] if done else None


def clean_stale(ckpt_dir: Path) -> None:
    """Remove temporary directories a killed save left behind (rank 0; call before saving)."""
    if _rank() != 0 or not Path(ckpt_dir).is_dir():
        return
    for child in Path(ckpt_dir).iterdir():
        if child.is_dir() and child.name.startswith((".tmp_iter_", ".old_iter_")):
            log.warning("removing incomplete checkpoint %s", child)
            shutil.rmtree(child, ignore_errors=True)


def architecture_mismatch(a: LlavaConfig, b: LlavaConfig) -> list[str]:
    """Dotted keys where two model configs differ in architecture (freezing and spec ignored)."""

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if k in _ARCH_IGNORE:
                continue
            if isinstance(v, dict) and k != "rope_scaling":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    fa, fb = flat(a.to_dict()), flat(b.to_dict())
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def check_model_matches(ckpt_dir: Path, model: LlavaConfig) -> None:
    """ValueError when `ckpt_dir`'s model differs from `model` (beyond freezing)."""
    saved = model_io.read_run_config(ckpt_dir).model
    diff = architecture_mismatch(saved, model)
    if diff:
        shown = ", ".join(f"{k}: {_get(saved, k)!r} vs {_get(model, k)!r}" for k in diff[:4])
        raise ValueError(
            f"{ckpt_dir} holds a different model ({shown}); use the matching --preset / "
            "--model.* overrides"
        )


def _get(cfg: LlavaConfig, dotted: str) -> Any:
    node: Any = cfg.to_dict()
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


# --- state pieces ---------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    from mm_megatron.runtime import cpu_runtime

    if torch.cuda.is_available() and not cpu_runtime.is_active():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(data: Any) -> ShardedObject:
    ps = parallel_state
    lay = layout_info()
    return ShardedObject(
        "rng_state",
        data,
        (lay["pp"], lay["tp"], lay["cp"], lay["dp"]),
        (
            ps.get_pipeline_model_parallel_rank(),
            ps.get_tensor_model_parallel_rank(),
            ps.get_context_parallel_rank(),
            ps.get_data_parallel_rank(),
        ),
        replica_id=0,
    )


def _data_sharded(data: Any) -> ShardedObject:
    ps = parallel_state
    replica = (
        ps.get_tensor_model_parallel_rank(),
        ps.get_pipeline_model_parallel_rank(),
        ps.get_context_parallel_rank(),
    )
    return ShardedObject(
        "data_state",
        data,
        (ps.get_data_parallel_world_size(),),
        (ps.get_data_parallel_rank(),),
        replica_id=replica,
    )


def _models(chunks: list) -> list:
    return [unwrap(c) for c in chunks]


def _optimizer_sharded(optimizer, chunks: list, is_loading: bool) -> dict:
    model_sd = model_io.model_sharded_state_dict(_models(chunks))
    return optimizer.sharded_state_dict(
        model_sd, is_loading=is_loading, metadata=dict(OPTIMIZER_METADATA)
    )


# --- saving -----------------------------------------------------------------------------------


class Checkpointer:
    """Saves full training checkpoints into one directory; collective.

    Args:
        save_dir: The checkpoint directory (`--save`).
        model: The model config (written to ``mm_megatron.json``).
        keep_last: Checkpoints to keep (0: all).
        async_save: Write in a background process.
        provenance_from: The checkpoint training started from (`--load`). When it is another
            directory, its HF provenance (``source``, ``hf_passthrough.safetensors``,
            ``hf_files/``) is carried into `save_dir` at the first save, so ``mcore-to-hf`` of a
            training output reproduces the HF original's key spelling and extra files.
    """

    def __init__(
        self,
        save_dir: str | Path,
        model: LlavaConfig,
        keep_last: int,
        async_save: bool,
        provenance_from: str | Path | None = None,
    ):
        self.save_dir = Path(save_dir)
        self.model = model
        self.keep_last = keep_last
        self.async_save = async_save
        self.provenance_from = Path(provenance_from) if provenance_from else None
        self._source: dict | None = None
        self._queue = None
        self.last_saved: int | None = None
        """Iteration of the newest checkpoint started by this process."""

    def save(self, iteration: int, chunks: list, optimizer, data_state: dict, train_state: dict):
        """Write checkpoint `iteration` (model, optimizer, RNG, data position, train state).

        Args:
            iteration: Steps done.
            chunks: Model chunks.
            optimizer: The megatron optimizer.
            data_state: This rank's loader `state_dict()`.
            train_state: Common state, identical on every rank (JSON-serialisable).
        """
        self.finalize(blocking=True)  # one save in flight at a time
        final = self.save_dir / model_io.iteration_dirname(iteration)
        tmp = self.save_dir / f".tmp_{final.name}"
        if _rank() == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        state = model_io.model_sharded_state_dict(_models(chunks))
        state["optimizer"] = _optimizer_sharded(optimizer, chunks, is_loading=False)
        state["rng_state"] = _rng_sharded(_rng_state())
        state["data_state"] = _data_sharded(data_state)
        state["train_state"] = train_state

        def finalize() -> None:
            self._finalize(tmp, final, iteration, train_state)

        if not self.async_save:
            dist_checkpointing.save(state, str(tmp))
            finalize()
        else:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            request = dist_checkpointing.save(
                state, str(tmp), async_sharded_save=True, async_strategy="mcore"
            )
            request.finalize_fns.append(finalize)
            if self._queue is None:
                self._queue = AsyncCallsQueue()
            self._queue.schedule_async_request(request)
        self.last_saved = iteration

    def _finalize(self, tmp: Path, final: Path, iteration: int, train_state: dict) -> None:
        if _rank() == 0:
            (tmp / TRAIN_STATE_JSON).write_text(json.dumps(train_state, indent=2) + "\n")
            model_io.write_run_config(tmp, self.model, self._provenance())
            if final.exists():  # re-saving an iteration (e.g. after a resume)
                old = final.with_name(f".old_{final.name}")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.save_dir)
            run_config = self.save_dir / model_io.RUN_CONFIG
            _atomic_write(run_config, (final / model_io.RUN_CONFIG).read_text())
            _atomic_write(self.save_dir / model_io.TRACKER, f"{iteration}\n")
            self._prune(iteration)
        _barrier()

    def _provenance(self) -> dict:
        """The run config's ``source`` (rank 0): kept from `save_dir`, else from `--load`."""
        if self._source is None:
            src = self.provenance_from
            if (self.save_dir / model_io.RUN_CONFIG).is_file():
                self._source = model_io.read_run_config(self.save_dir).source
            if src is not None and src.absolute() != self.save_dir.absolute():
                self._source = model_io.copy_provenance(src, self.save_dir, self._source or None)
            self._source = self._source or {}
        return self._source

    def _prune(self, newest: int) -> None:
        if self.keep_last <= 0:
            return
        done = [it for it in complete_iterations(self.save_dir) if it <= newest]
        for it in done[: -self.keep_last]:
            shutil.rmtree(self.save_dir / model_io.iteration_dirname(it), ignore_errors=True)

    def finalize(self, blocking: bool = False) -> None:
        """Finish async saves that are done (all of them when `blocking`); collective."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        """Wait for any save in flight."""
        if self._queue is not None:
            self._queue.close()
            self._queue = None


# --- loading ----------------------------------------------------------------------------------


def read_train_state(ckpt_dir: str | Path, iteration: int) -> dict:
    """The common training state of checkpoint `iteration`."""
    dist_dir = model_io.dist_checkpoint_dir(Path(ckpt_dir), iteration)
    common = dist_checkpointing.load_common_state_dict(str(dist_dir))
    if "train_state" not in common:
        raise ValueError(f"{dist_dir} has no training state (a weights-only checkpoint?)")
    return common["train_state"]


def load_training_state(
    ckpt_dir: str | Path, iteration: int, chunks: list, optimizer, scheduler
) -> tuple[dict, dict | None]:
    """Restore model, optimizer, scheduler and (same layout) RNG; collective.

    Args:
        ckpt_dir: The checkpoint directory.
        iteration: Which checkpoint.
        chunks: Model chunks built for the current layout.
        optimizer: The megatron optimizer over them.
        scheduler: The LR scheduler.

    Returns:
        (train state, this rank's loader state or None when the DP size changed).
    """
    ckpt_dir = Path(ckpt_dir)
    train_state = read_train_state(ckpt_dir, iteration)
    saved, now = train_state["layout"], layout_info()
    if saved["dp"] != now["dp"]:
        raise ValueError(
            f"{ckpt_dir} iteration {iteration} was saved at DP={saved['dp']}; this run has "
            f"DP={now['dp']}, so the data positions (and a distributed optimizer's shards) "
            f"cannot be restored. Start a new --save directory with --load {ckpt_dir} to "
            "continue from its weights."
        )
    extra: dict[str, Any] = {
        "optimizer": _optimizer_sharded(optimizer, chunks, is_loading=True),
        "data_state": _data_sharded(None),
    }
    same_layout = saved == now
    if same_layout:
        extra["rng_state"] = _rng_sharded(None)
    else:
        log.warning("layout changed from %s to %s: RNG states are not restored", saved, now)
    loaded = model_io.load_checkpoint(_models(chunks), ckpt_dir, iteration=iteration, extra=extra)
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(train_state["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return train_state, loaded["data_state"]


def load_weights(ckpt_dir: str | Path, chunks: list, optimizer, model: LlavaConfig) -> int | str:
    """Load only the model weights of `ckpt_dir`'s latest checkpoint (`--load`); collective.

    Returns:
        The iteration loaded (``"release"`` for converter outputs).
    """
    ckpt_dir = Path(ckpt_dir)
    iteration = latest_iteration(ckpt_dir)
    if iteration is None:
        raise FileNotFoundError(f"--load {ckpt_dir}: no checkpoint there")
    check_model_matches(ckpt_dir, model)
    model_io.load_checkpoint(_models(chunks), ckpt_dir, iteration=iteration)
    optimizer.reload_model_params()  # fp32 main params from the loaded (bf16) weights
    return iteration
