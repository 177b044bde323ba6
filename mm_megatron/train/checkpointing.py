"""Full training checkpoints: save everything a run needs, resume it exactly.

What this file does: the training state on top of the model checkpoint of
`mm_megatron.checkpoint.model_io` (which owns the directory format, atomic publishing, the tracker,
pruning and loading; this file only adds state to it). One iteration directory holds:

- ``model.*`` (``model0.*``, ... for virtual stages): the weights (sharded, layout-independent);
- ``optimizer.*``: megatron optimizer state from ``optimizer.sharded_state_dict`` (fp32 main
  params, Adam moments, step; the distributed optimizer in its ``dp_reshardable`` form);
- ``rng_state``: one ShardedObject per rank (python, numpy, torch, CUDA and megatron's RNG
  tracker), indexed by (pp, tp, cp, dp) rank;
- ``data_state``: one ShardedObject per data-parallel rank (the loader's sample position and
  bad-sample counters);
- ``train_state`` (common, identical on all ranks): iteration, consumed samples, skipped steps,
  scheduler state, layout and the job config; also written as ``train_state.json``.

So a training checkpoint is also a model checkpoint the converters and `--load` read.
`Checkpointer` saves (optionally in a background process); `load_training_state` restores model,
optimizer, scheduler, RNG (only at the same layout) and data position (at the same DP size; at
another one the trainer continues the global sample stream from the consumed samples, and megatron
reshards a distributed optimizer's ``dp_reshardable`` state over the new DP group);
`load_weights` reads just the model (`--load`, e.g. a converter's ``release``). The directory
helpers the trainer uses (`latest_iteration`, `clean_stale`, `check_model_matches`,
`complete_iterations`) are model_io's, re-exported here.

What it does not do: decide when to save (the trainer does), define the directory format
(model_io), or convert formats.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.utils import unwrap_model

from mm_megatron.checkpoint import integrity, model_io
from mm_megatron.checkpoint.model_io import (  # noqa: F401  (the trainer's entry points)
    check_model_matches,
    clean_stale,
    complete_iterations,
    latest_iteration,
)
from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.train import resume_changes

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


def layout_info() -> dict[str, int]:
    """This job's parallel sizes (what RNG and data states depend on)."""
    ps = parallel_state
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


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
    return unwrap_model(list(chunks))


def _restore_adam_steps(optimizer) -> None:
    """Give torch Adam under megatron's DistributedOptimizer its step count back.

    NOTE: megatron 0.19.2 saves a distributed optimizer's `step` in its param groups and also
    treats torch Adam's per-parameter 0-d `step` tensor as bucket state, which the
    `dp_reshardable` load does not restore (it keeps the value the load started from; megatron
    assumes TE/Apex FusedAdam, which has no such tensor). Reset every per-parameter step from
    the loaded param group, one tensor each.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(sub, DistributedOptimizer):
            continue
        for group in sub.optimizer.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = sub.optimizer.state.get(param)
                if state is not None and torch.is_tensor(state.get("step")):
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def _optimizer_sharded(optimizer, chunks: list, is_loading: bool) -> dict:
    if is_loading:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
            if isinstance(sub, DistributedOptimizer) and not sub.optimizer.state:
                # NOTE: a fresh torch Adam has no state yet and megatron's DistributedOptimizer
                # .state_dict() asserts on its step; megatron's own dummy initialisation (one
                # step on zero grads) creates it, and the load then overwrites it in place
                # (the model weights are loaded after this, so the dummy step leaves no trace).
                sub._init_optimizer_states_with_dummy_values()
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
        self._queue = None
        self.last_saved: int | None = None
        """Iteration of the newest checkpoint started by this process."""

    def save(
        self, iteration: int, chunks: list, optimizer, data_state: dict, train_state: dict
    ) -> bool:
        """Write checkpoint `iteration` (model, optimizer, RNG, data position, train state).

        Refuses (returns False, with a warning) when a weight or optimizer tensor is not finite
        on any rank. A failed write removes its temporary directory and raises
        `integrity.CheckpointSaveError` ("no space left on device ..." for a full disk); either
        way the previous checkpoint stays the latest.

        Args:
            iteration: Steps done.
            chunks: Model chunks.
            optimizer: The megatron optimizer.
            data_state: This rank's loader `state_dict()`.
            train_state: Common state, identical on every rank (JSON-serialisable).
        """
        self.finalize(blocking=True)  # one save in flight at a time
        bad = integrity.non_finite_anywhere(chunks, optimizer)
        if bad is not None:  # never make a diverged state the one a resume picks up
            log.warning(
                "not saving checkpoint iteration %d to %s: %s is not finite; the latest "
                "checkpoint stays %s",
                iteration,
                self.save_dir,
                bad,
                latest_iteration(self.save_dir),
            )
            return False
        extra = {
            "optimizer": _optimizer_sharded(optimizer, chunks, is_loading=False),
            "rng_state": _rng_sharded(_rng_state()),
            "data_state": _data_sharded(data_state),
            "train_state": train_state,
        }
        out = model_io.save_checkpoint(
            _models(chunks),
            self.save_dir,
            self.model,
            iteration=iteration,
            extra=extra,
            files={TRAIN_STATE_JSON: json.dumps(train_state, indent=2) + "\n"},
            provenance_from=self.provenance_from,
            keep_last=self.keep_last,
            async_save=self.async_save,
        )
        if self.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            if self._queue is None:
                self._queue = AsyncCallsQueue()
            self._queue.schedule_async_request(out)
        self.last_saved = iteration
        return True

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
    extra: dict[str, Any] = {"optimizer": _optimizer_sharded(optimizer, chunks, is_loading=True)}
    if saved["dp"] == now["dp"]:  # at another DP size the trainer restarts from consumed samples
        extra["data_state"] = _data_sharded(None)
    same_layout = saved == now
    if same_layout:
        extra["rng_state"] = _rng_sharded(None)
    else:
        log.warning("layout changed from %s to %s: RNG states are not restored", saved, now)
    loaded = model_io.load_checkpoint(_models(chunks), ckpt_dir, iteration=iteration, extra=extra)
    changes = resume_changes.adopt_param_groups(optimizer, loaded["optimizer"])
    with torch.no_grad():  # megatron copies into parameter views in place
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer)
    changes += resume_changes.load_scheduler(scheduler, train_state["scheduler"])
    changes = list(dict.fromkeys(changes))
    if changes:
        log.warning(
            "resuming %s iteration %s with changed settings: %s",
            ckpt_dir,
            iteration,
            ", ".join(changes),
        )
    train_state["changed_on_resume"] = changes
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return train_state, loaded.get("data_state")


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
