"""The one build function: decides the layout of a LLaVA model on this rank.

Everything layout-dependent lives here: which pipeline stage(s) this rank runs (pre/post process,
virtual stages), this rank's TP/PP/CP ranks, which stage holds the vision encoder and projector
(the first), freezing, activation recompute, and the megatron TransformerConfigs for each stack.
Model code receives the answers. This is the one module under ``mm_megatron/model/`` that talks
to ``torch.distributed`` (to read ranks from the process groups it is given or megatron's).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.config.parallel_config import ParallelConfig
from mm_megatron.model.llava import LlavaModel
from mm_megatron.model.transformer_configs import (
    Recompute,
    lm_transformer_config,
    projector_transformer_config,
    vision_transformer_config,
)


def freeze(model: LlavaModel, *, vision: bool, projector: bool, lm: bool) -> None:
    """Set ``requires_grad`` per component (frozen parts get no grads nor optimizer state)."""
    parts = [
        (model.vision_model, vision),
        (model.vision_projection, projector),
        (model.language_model, lm),
    ]
    for module, frozen in parts:
        if module is None:
            continue
        for p in module.parameters():
            p.requires_grad_(not frozen)
    # An encoder's connector parts (MGM's patch-info mining) freeze with the projector.
    connector = getattr(model.vision_model, "connector_modules", list)
    for module in connector():
        for p in module.parameters():
            p.requires_grad_(not projector)
    if getattr(model, "image_newline", None) is not None:  # a tiling scheme's row separator
        model.image_newline.requires_grad_(not projector)


def _group_rank(group, size: int) -> int:
    """This process's rank in ``group`` (0 for a layout size of 1, where no group is needed)."""
    return dist.get_rank(group) if size > 1 else 0


def build_llava_model(
    cfg: LlavaConfig,
    par: ParallelConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    pg_collection: ProcessGroupCollection | None = None,
    pp_rank: int | None = None,
    vp_stage: int | None = None,
    recompute: Recompute | None = None,
) -> LlavaModel:
    """Build this rank's part of the model. Requires megatron's parallel state.

    The ranks the model needs (pipeline stage, TP rank for the vocab-padding mask, CP rank for
    the zig-zag split) are read from the process groups here and passed in.

    Args:
        cfg: model config (validated here).
        par: parallel layout; defaults to all-ones.
        dtype: parameter dtype (fp32 or bf16).
        pg_collection: process groups; default megatron's global ones.
        pp_rank: pipeline rank; default from the pp group.
        vp_stage: virtual stage index for interleaved schedules.
        recompute: activation recompute of the LM decoder (default off).
    """
    cfg.validate()
    par = par or ParallelConfig()
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    if pp_rank is None:
        pp_rank = _group_rank(pg_collection.pp, par.pp)
    vp = par.virtual_pp or 1
    vstage = vp_stage or 0
    first = pp_rank == 0 and vstage == 0
    last = pp_rank == par.pp - 1 and vstage == vp - 1
    model = LlavaModel(
        cfg,
        lm_transformer_config(cfg, par, dtype, recompute),
        vision_transformer_config(cfg, par, dtype),
        projector_transformer_config(cfg, par, dtype),
        pg_collection,
        pre_process=first,
        post_process=last,
        add_encoder=first,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
        tp_rank=_group_rank(pg_collection.tp, par.tp),
        cp_rank=_group_rank(pg_collection.cp, par.cp),
    )
    freeze(model, vision=cfg.freeze_vision, projector=cfg.freeze_projector, lm=cfg.freeze_lm)
    return model


def build_model_chunks(
    cfg: LlavaConfig,
    par: ParallelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    ddp: bool = True,
    overlap_grad_reduce: bool = False,
    use_distributed_optimizer: bool = False,
    pg_collection: ProcessGroupCollection | None = None,
    recompute: Recompute | None = None,
) -> list:
    """This rank's model chunks (one per virtual pipeline stage), wrapped in megatron DDP.

    Also installs the hooks megatron's schedules read from the model config: ``no_sync_func``
    (gradient accumulation across micro-batches), ``grad_sync_func`` (overlapped reduce) and
    ``finalize_model_grads_func`` (DP/CP grad reduction, SP norm all-reduce, tied-embedding sync
    between the first and last stage, division by the global token count).
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    vp = par.virtual_pp or 1
    chunks = [
        build_llava_model(
            cfg,
            par,
            dtype=dtype,
            pg_collection=pg_collection,
            vp_stage=i if vp > 1 else None,
            recompute=recompute,
        )
        for i in range(vp)
    ]
    config = chunks[0].config
    from mm_megatron.runtime import cpu_runtime

    if cpu_runtime.cuda_in_use():
        # NOTE: before the DDP wrap, which builds grad buffers around the parameters (as
        # Megatron-LM's get_model): the ViT's embeddings and norms are created on the CPU.
        for c in chunks:
            c.cuda(torch.cuda.current_device())
    if not ddp:
        return chunks
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = [
        DistributedDataParallel(
            config=c.config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0
        )
        for i, c in enumerate(chunks)
    ]
    no_sync = [w.no_sync for w in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if overlap_grad_reduce:
        sync = [w.start_grad_sync for w in wrapped]
        config.grad_sync_func = sync[0] if len(sync) == 1 else sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped
