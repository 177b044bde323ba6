"""Test helper: full (single-rank) parameters <-> this rank's TP/PP shards, in memory.

The parity tests start every layout from the same full set of weights and compare gathered
gradients and parameters against the single-rank run; nothing in the package uses this (on-disk
resharding is megatron's ``dist_checkpointing``, see ``mm_megatron/checkpoint``). It lives with
the tests because it knows both the model (``LlavaModel``) and the layout, and it spells out the
sharding rules the parity run checks:

* a parameter marked ``tensor_model_parallel`` is split along ``partition_dim`` into TP equal
  chunks, except the gated (SwiGLU) ``linear_fc1.weight`` of the LM, whose full tensor is
  ``[gate; up]`` and whose shard i is ``[gate_i; up_i]``;
* the word embedding and output layer are vocab-parallel over a vocab padded to a multiple of
  ``make_vocab_size_divisible_by * TP``: full tensors carry the real vocab; shards are padded
  with zero rows;
* LM layer ``i`` of a pipeline stage is global layer ``offset + i`` (megatron's
  ``get_transformer_layer_offset``, uneven first/last stages and virtual stages included);
* everything else (norms, row-parallel biases, ViT embeddings) is replicated.

Full names are the single-rank model's ``named_parameters()`` names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.distributed as dist
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.utils import unwrap_model

from mm_megatron.model.llava import LlavaModel

_LM_LAYER = re.compile(r"^(language_model\.decoder\.layers\.)(\d+)(\..*)$")
_VOCAB_PARAMS = (
    "language_model.embedding.word_embeddings.weight",
    "language_model.output_layer.weight",
)


def global_name(model: LlavaModel, local: str, pp_rank: int) -> str:
    """The single-rank name of this stage's parameter ``local``."""
    m = _LM_LAYER.match(local)
    if not m:
        return local
    cfg = model.language_model.config
    offset = get_transformer_layer_offset(
        cfg, vp_stage=model.language_model.vp_stage, pp_rank=pp_rank
    )
    return f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}"


def _is_gated_fc1(model: LlavaModel, name: str) -> bool:
    return (
        name.startswith("language_model.")
        and name.endswith("mlp.linear_fc1.weight")
        and model.language_model.config.gated_linear_unit
    )


def shard_of(
    model: LlavaModel, name: str, full: torch.Tensor, tp: int, tp_rank: int
) -> torch.Tensor:
    """This TP rank's shard of full tensor ``full`` for the parameter called ``name``."""
    local = dict(model.named_parameters())[name]
    if name in _VOCAB_PARAMS:
        padded = model.padded_vocab_size
        if full.shape[0] > padded:
            raise ValueError(f"{name}: full vocab {full.shape[0]} > padded vocab {padded}")
        full = torch.cat([full, full.new_zeros(padded - full.shape[0], *full.shape[1:])])
    if not getattr(local, "tensor_model_parallel", False) or tp == 1:
        out = full
    elif _is_gated_fc1(model, name):
        gate, up = full.chunk(2, dim=0)
        out = torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]])
    else:
        out = full.chunk(tp, dim=local.partition_dim)[tp_rank]
    if out.shape != local.shape:
        raise ValueError(
            f"{name}: shard shape {tuple(out.shape)} != parameter {tuple(local.shape)}"
        )
    return out


def shard_info(model: LlavaModel, name: str) -> tuple[bool, int, bool, bool]:
    """(tp_split, partition_dim, gated_fc1, vocab_parallel) of parameter ``name``."""
    p = dict(model.named_parameters())[name]
    split = bool(getattr(p, "tensor_model_parallel", False))
    return (
        split,
        int(getattr(p, "partition_dim", 0)),
        _is_gated_fc1(model, name),
        name in _VOCAB_PARAMS,
    )


def unshard(
    info: tuple[bool, int, bool, bool], shards: list[torch.Tensor], vocab_size: int
) -> torch.Tensor:
    """Inverse of :func:`shard_of`: TP shards (in rank order) -> full tensor."""
    split, dim, gated, vocab = info
    if not split or len(shards) == 1:
        full = shards[0]
    elif gated:
        halves = [s.chunk(2, dim=0) for s in shards]
        full = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    else:
        full = torch.cat(shards, dim=dim)
    return full[:vocab_size] if vocab else full


def load_full_state_dict(
    chunks: Iterable, full: dict[str, torch.Tensor], tp: int, tp_rank: int, pp_rank: int
) -> None:
    """Copy this rank's shards of ``full`` into the model chunk(s) (DDP-wrapped or not)."""
    for chunk in chunks:
        model = unwrap_model(chunk)
        with torch.no_grad():
            for name, p in model.named_parameters():
                gname = global_name(model, name, pp_rank)
                if gname not in full:
                    raise KeyError(f"full state dict has no tensor {gname!r} (for {name!r})")
                p.copy_(shard_of(model, name, full[gname], tp, tp_rank))


def gather_full(
    chunks: Iterable,
    *,
    tp_rank: int,
    pp_rank: int,
    grads: bool = False,
    group: dist.ProcessGroup | None = None,
) -> dict[str, torch.Tensor] | None:
    """Gather parameters (or their gradients) of every rank into full tensors on every rank.

    Uses object collectives over ``group`` (default: the world), so it suits test-sized models,
    not production checkpoints (use dist_checkpointing there). Gradients are read from
    ``main_grad`` (megatron DDP) when present, else ``grad``; frozen parameters are skipped.

    Returns:
        full name -> tensor (CPU), identical on every rank.
    """
    mine: dict[tuple[str, int], tuple] = {}
    vocab = 0
    for chunk in chunks:
        model = unwrap_model(chunk)
        vocab = model.cfg.lm.vocab_size
        for name, p in model.named_parameters():
            if grads:
                if not p.requires_grad:
                    continue
                g = getattr(p, "main_grad", None)
                g = p.grad if g is None else g
                t = torch.zeros_like(p) if g is None else g
            else:
                t = p
            key = (global_name(model, name, pp_rank), tp_rank)
            mine[key] = (shard_info(model, name), t.detach().cpu().clone())
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    everything: list = [None] * world
    if world > 1:
        dist.all_gather_object(everything, mine, group=group)
    else:
        everything = [mine]
    by_name: dict[str, dict[int, tuple]] = {}
    for entries in everything:
        for (gname, r), val in entries.items():
            by_name.setdefault(gname, {})[r] = val
    out = {}
    for gname, per_rank in by_name.items():
        info = per_rank[min(per_rank)][0]
        out[gname] = unshard(info, [per_rank[r][1] for r in sorted(per_rank)], vocab)
    return out
