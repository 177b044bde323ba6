"""Resuming with changed hyperparameters: adopt the run's new values and say which changed.

What this file does: before megatron restores the optimizer, `adopt_param_groups` rewrites the
per-group hyperparameters of the loaded optimizer state (the keys megatron pairs saved and
current parameter groups by: `max_lr`, `min_lr`, weight decay, multipliers) to the current run's
values, so megatron finds every group instead of failing with "Could not find parameter group";
`load_scheduler` restores the LR schedule's position (its step count) with the current run's
schedule settings (peak/minimum LR, warm-up, decay length and style, weight decay). Both return
the changes as `name old -> new` strings for the trainer to announce.

What it does not do: change anything that is not a hyperparameter (moments, step counts, weights
and the data position are restored as saved), or decide whether a change is wise.
"""

from __future__ import annotations

from typing import Any

SCHEDULER_KEYS = (
    "max_lr",
    "min_lr",
    "lr_warmup_steps",
    "lr_decay_steps",
    "lr_decay_style",
    "start_wd",
    "end_wd",
    "wd_incr_steps",
    "wd_incr_style",
)
"""Schedule settings a resume may change (the step count is always the checkpoint's)."""


def _saved_group_lists(node: Any) -> list[list[dict]]:
    """Every `param_groups` list in a loaded optimizer state, in traversal order."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "param_groups" and isinstance(value, list):
                found.append(value)
            else:
                found.extend(_saved_group_lists(value))
    elif isinstance(node, (list, tuple)):
        for value in node:
            found.extend(_saved_group_lists(value))
    return found


def _current_group_lists(optimizer) -> list[list[dict]]:
    out = []
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is not None:
            out.append(inner.param_groups)
    return out


def adopt_param_groups(optimizer, loaded_state: dict) -> list[str]:
    """Set the loaded optimizer state's group hyperparameters to `optimizer`'s; returns changes.

    Args:
        optimizer: The megatron optimizer of this run (chained or not).
        loaded_state: The optimizer state as loaded from the checkpoint (changed in place).
    """
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    changes: dict[str, str] = {}
    saved_lists, current_lists = _saved_group_lists(loaded_state), _current_group_lists(optimizer)
    if len(saved_lists) != len(current_lists):
        return []  # a different optimizer structure: leave the mismatch to megatron's message
    for saved_groups, current_groups in zip(saved_lists, current_lists):
        if len(saved_groups) != len(current_groups):
            return []
        # NOTE: megatron pairs the i-th current group with the i-th saved group's params too.
        for saved, current in zip(saved_groups, current_groups):
            for key in param_group_identifier_keys:
                old, new = saved.get(key), current.get(key)
                if old != new:
                    changes.setdefault(key, f"{key} {old} -> {new}")
                    saved[key] = new
    return list(changes.values())


def load_scheduler(scheduler, saved_state: dict) -> list[str]:
    """Restore the schedule's step count, keeping this run's schedule settings; returns changes.

    Args:
        scheduler: megatron's `OptimizerParamScheduler` built from the current config.
        saved_state: The scheduler state from the checkpoint.
    """
    current = scheduler.state_dict()
    changes = [
        f"{key} {saved_state[key]} -> {current[key]}"
        for key in SCHEDULER_KEYS
        if key in saved_state and key in current and saved_state[key] != current[key]
    ]
    override = scheduler.override_opt_param_scheduler
    scheduler.override_opt_param_scheduler = True  # current values win; no assert
    try:
        scheduler.load_state_dict(saved_state)
    finally:
        scheduler.override_opt_param_scheduler = override
    return changes
