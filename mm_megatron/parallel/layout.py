"""Up-front validation of a parallel layout against a model and a world size.

Every check raises :class:`LayoutError` with a one-line message naming the culprit, so the CLI
can print it instead of a traceback from deep inside megatron (which would otherwise fail much
later, e.g. with an assertion in a TransformerBlock on one rank while the others hang).
"""

from __future__ import annotations

from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.config.parallel_config import ParallelConfig
from mm_megatron.runtime.distributed import LayoutError, check_parallel_sizes, check_world_size

__all__ = ["LayoutError", "stage_layers", "validate_layout"]


def _divisible(what: str, value: int, by: int, by_name: str) -> None:
    if value % by:
        raise LayoutError(f"{what}={value} is not divisible by {by_name}={by}")


def validate_layout(
    cfg: LlavaConfig,
    par: ParallelConfig,
    world_size: int | None = None,
    seq_len: int | None = None,
) -> None:
    """Raise LayoutError if ``par`` cannot run ``cfg`` (on ``world_size`` ranks).

    Args:
        cfg: the model.
        par: the layout.
        world_size: total ranks, if known (checks TP*PP*CP divides it).
        seq_len: longest (expanded) sequence, if known (checks it against CP).
    """
    if world_size is not None:
        check_world_size(par, world_size)
    else:
        check_parallel_sizes(par)
    lm, v = cfg.lm, cfg.vision
    _divisible("lm.num_attention_heads", lm.num_attention_heads, par.tp, "TP")
    _divisible("lm.num_query_groups", lm.kv_groups, par.tp, "TP")
    _divisible("lm.ffn_hidden_size", lm.ffn_hidden_size, par.tp, "TP")
    _divisible("vision.num_attention_heads", v.num_attention_heads, par.tp, "TP")
    _divisible("vision.ffn_hidden_size", v.ffn_hidden_size, par.tp, "TP")
    proj_hidden = cfg.projector.hidden_size or lm.hidden_size
    _divisible("projector hidden size", proj_hidden, par.tp, "TP")
    _check_pipeline(lm.num_layers, par)
    if seq_len is not None and par.cp > 1 and seq_len < 2 * par.cp:
        raise LayoutError(
            f"sequence length {seq_len} is shorter than 2*CP={2 * par.cp} chunks; lower CP"
        )


def _check_pipeline(num_layers: int, par: ParallelConfig) -> None:
    if par.pp == 1:
        if par.virtual_pp not in (None, 1):
            raise LayoutError(
                "--virtual-pipeline-model-parallel-size (parallel.virtual_pp) needs PP > 1"
            )
        if par.first_stage_lm_layers is not None or par.last_stage_lm_layers is not None:
            raise LayoutError("first/last stage LM layer counts need PP > 1")
        return
    if par.virtual_pp and par.virtual_pp > 1:
        if par.first_stage_lm_layers is not None or par.last_stage_lm_layers is not None:
            raise LayoutError("an uneven first/last stage cannot be combined with virtual stages")
        _divisible("lm.num_layers", num_layers, par.pp * par.virtual_pp, "PP*virtual stages")
        return
    stage_layers(num_layers, par)


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
