"""Up-front validation of a parallel layout against a model and a world size.

What this file does: `layout_problems` lists EVERY reason a layout cannot run a model (the sizes
themselves, world size vs TP*PP*CP, head/group/FFN divisibility by TP, the pipeline split, CP vs
sequence length), each a one-line message naming the culprit; `validate_layout` raises them
together as one :class:`LayoutError`, so the CLI can print it instead of a traceback from deep
inside megatron (which would otherwise fail much later, one problem at a time, e.g. with an
assertion in a TransformerBlock on one rank while the others hang). `stage_layers` is the one
copy of the pipeline stage-split arithmetic. The size checks (`check_parallel_sizes`,
`check_world_size`) live here too; `mm_megatron.runtime.distributed` re-exports them.

It imports only the config dataclasses (no torch, no megatron), so the start-up checks
(`mm_megatron.train.preflight`) run it in well under a second, before megatron is imported.
"""

from __future__ import annotations

from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.config.parallel_config import ParallelConfig

__all__ = [
    "LayoutError",
    "check_parallel_sizes",
    "check_world_size",
    "layout_problems",
    "stage_layers",
    "validate_layout",
]


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message is one line, naming the culprit(s)."""


def size_problems(par: ParallelConfig, world_size: int | None = None) -> list[str]:
    """Problems of TP/PP/CP themselves, of sequence parallelism, and of TP*PP*CP against
    `world_size` (when given)."""
    problems = [
        f"{n}={getattr(par, n)} must be >= 1" for n in ("tp", "pp", "cp") if getattr(par, n) < 1
    ]
    if problems:
        return problems
    mp = par.model_parallel_size
    if world_size is not None and world_size % mp:
        problems.append(
            f"world size {world_size} is not divisible by TP*PP*CP = {par.tp}*{par.pp}*{par.cp} "
            f"= {mp}"
        )
    if par.sequence_parallel and par.tp == 1:
        problems.append("--sequence-parallel needs TP > 1")
    return problems


def check_parallel_sizes(par: ParallelConfig) -> None:
    """LayoutError unless TP, PP, CP >= 1 and sequence parallelism has TP > 1."""
    problems = size_problems(par)
    if problems:
        raise LayoutError("; ".join(problems))


def check_world_size(par: ParallelConfig, world_size: int) -> int:
    """DP size for ``world_size``; LayoutError if the sizes are invalid or TP*PP*CP does not
    divide it."""
    problems = size_problems(par, world_size)
    if problems:
        raise LayoutError("; ".join(problems))
    return world_size // par.model_parallel_size


def _divisible(what: str, value: int, by: int, by_name: str) -> list[str]:
    return [f"{what}={value} is not divisible by {by_name}={by}"] if value % by else []


def layout_problems(
    cfg: LlavaConfig,
    par: ParallelConfig,
    world_size: int | None = None,
    seq_len: int | None = None,
) -> list[str]:
    """Every reason ``par`` cannot run ``cfg`` (on ``world_size`` ranks); [] when it can.

    Args:
        cfg: the model.
        par: the layout.
        world_size: total ranks, if known (checks TP*PP*CP divides it).
        seq_len: longest (expanded) sequence, if known (checks it against CP).
    """
    problems = size_problems(par, world_size)
    if any("must be >= 1" in p for p in problems):
        return problems
    lm, v = cfg.lm, cfg.vision
    problems += _divisible("lm.num_attention_heads", lm.num_attention_heads, par.tp, "TP")
    problems += _divisible("lm.num_query_groups", lm.kv_groups, par.tp, "TP")
    problems += _divisible("lm.ffn_hidden_size", lm.ffn_hidden_size, par.tp, "TP")
    problems += _divisible("vision.num_attention_heads", v.num_attention_heads, par.tp, "TP")
    problems += _divisible("vision.ffn_hidden_size", v.ffn_hidden_size, par.tp, "TP")
    problems += cfg.projector.tp_problems(par.tp, lm.hidden_size)
    problems += _pipeline_problems(lm.num_layers, par)
    if seq_len is not None and par.cp > 1 and seq_len < 2 * par.cp:
        problems.append(
            f"sequence length {seq_len} is shorter than 2*CP={2 * par.cp} chunks; lower CP"
        )
    return problems


def validate_layout(
    cfg: LlavaConfig,
    par: ParallelConfig,
    world_size: int | None = None,
    seq_len: int | None = None,
) -> None:
    """Raise one LayoutError listing every problem of ``par`` for ``cfg`` (`layout_problems`)."""
    problems = layout_problems(cfg, par, world_size, seq_len)
    if problems:
        raise LayoutError("; ".join(problems))


def _pipeline_problems(num_layers: int, par: ParallelConfig) -> list[str]:
    if par.pp == 1:
        problems = []
        if par.virtual_pp not in (None, 1):
            problems.append(
                "--virtual-pipeline-model-parallel-size (parallel.virtual_pp) needs PP > 1"
            )
        if par.first_stage_lm_layers is not None or par.last_stage_lm_layers is not None:
            problems.append("first/last stage LM layer counts need PP > 1")
        return problems
    if par.virtual_pp and par.virtual_pp > 1:
        if par.first_stage_lm_layers is not None or par.last_stage_lm_layers is not None:
            return ["an uneven first/last stage cannot be combined with virtual stages"]
        return _divisible("lm.num_layers", num_layers, par.pp * par.virtual_pp, "PP*virtual stages")
    try:
        stage_layers(num_layers, par)
    except LayoutError as e:
        return [str(e)]
    return []


def stage_layers(num_layers: int, par: ParallelConfig) -> list[int]:
    """LM layers on each pipeline stage: megatron's even split, or the uneven first/last stage.

    The one copy of this arithmetic (``model summary`` and the layout check both call it).
    Virtual stages are not split out: the list is per physical stage.

    Args:
        num_layers: ``lm.num_layers``.
        par: The layout (``pp``, ``first_stage_lm_layers``, ``last_stage_lm_layers``).

    Returns:
        ``par.pp`` layer counts summing to ``num_layers``; LayoutError if there are none.
    """
    if par.pp == 1:
        return [num_layers]
    first, last = par.first_stage_lm_layers, par.last_stage_lm_layers
    for name, n in (("first", first), ("last", last)):
        if n is not None and n < 0:
            raise LayoutError(f"{name}-stage LM layers={n} must be >= 0")
    rest = num_layers - (first or 0) - (last or 0)
    middle = par.pp - (first is not None) - (last is not None)
    if rest < 0:
        raise LayoutError(
            f"first/last stage LM layers ({first}, {last}) exceed lm.num_layers={num_layers}"
        )
    if middle == 0 and rest:
        raise LayoutError(
            f"first+last stage LM layers ({first}+{last}) != lm.num_layers={num_layers} at PP=2"
        )
    if middle and rest % middle:
        if first is None and last is None:
            raise LayoutError(f"lm.num_layers={num_layers} is not divisible by PP={par.pp}")
        raise LayoutError(
            f"{rest} LM layers left after the first/last stage do not split over "
            f"{middle} middle stage(s)"
        )
    out = [rest // middle if middle else 0] * par.pp
    if first is not None:
        out[0] = first
    if last is not None:
        out[-1] = last
    return out
