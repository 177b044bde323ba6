"""Model, optimizer and LR schedule of a training run, built on megatron-core's pieces.

What this file does:
- `build_model(job, dtype)`: this rank's model chunks (megatron DDP, via the one build function
  `mm_megatron.model.build.build_model_chunks`), with the job's activation recompute passed to
  the build, which sets it in the LM's TransformerConfig.
- `build_optimizer(job, chunks, dtype)`: megatron's optimizer (`get_megatron_optimizer`: AdamW
  or SGD; fp32 main params and grads for bf16 weights; optionally the distributed optimizer).
  Megatron's own clipping is switched off (`clip_grad=0`) because `optimizer_step` clips itself,
  after checking the gradient norm is finite.
- `build_scheduler(job, optimizer)`: megatron's `OptimizerParamScheduler` (linear warm-up, then
  cosine/linear/... decay to `min_lr`), stepped once per successful optimizer step.
- `optimizer_step(optimizer, clip_grad)`: one update that is skipped (and reported) when the
  gradient norm is NaN/inf, so a bad step never reaches the weights.

What it does not do: load checkpoints (`checkpointing.py`) or run steps (`trainer.py`).
"""

from __future__ import annotations

import math

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mm_megatron.model.build import build_model_chunks
from mm_megatron.model.transformer_configs import Recompute
from mm_megatron.runtime import cpu_runtime
from mm_megatron.train.config import JobConfig


def resolve_dtype(precision: str) -> torch.dtype:
    """Parameter dtype for `train.precision` (auto: bf16 on CUDA, fp32 on the CPU runtime)."""
    if precision == "auto":
        return torch.float32 if cpu_runtime.on_cpu() else torch.bfloat16
    return torch.bfloat16 if precision == "bf16" else torch.float32


def build_model(job: JobConfig, dtype: torch.dtype) -> list:
    """This rank's DDP-wrapped model chunks (one per virtual pipeline stage)."""
    t = job.train
    return build_model_chunks(
        job.model,
        job.parallel,
        dtype=dtype,
        overlap_grad_reduce=t.overlap_grad_reduce,
        use_distributed_optimizer=t.use_distributed_optimizer,
        recompute=Recompute(t.recompute_granularity, t.recompute_method, t.recompute_num_layers),
    )


def build_optimizer(job: JobConfig, chunks: list, dtype: torch.dtype):
    """megatron's optimizer over the trainable parameters of `chunks`."""
    t = job.train
    m = job.model
    if m.freeze_vision and m.freeze_projector and m.freeze_lm:
        raise ValueError(
            "nothing to train: model.freeze_vision, freeze_projector and freeze_lm are all true"
        )
    config = OptimizerConfig(
        optimizer=t.optimizer,
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=0.0,  # optimizer_step clips after its own finiteness check
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=t.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, chunks)


def build_scheduler(job: JobConfig, optimizer) -> OptimizerParamScheduler:
    """Warm-up + decay of the learning rate, in optimizer steps."""
    t = job.train
    decay = max(t.decay_iters, t.warmup_iters + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.warmup_iters else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_iters,
        lr_decay_steps=decay,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
    )


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


@torch.no_grad()
def optimizer_step(optimizer, clip_grad: float) -> tuple[bool, float]:
    """Clip and apply the gradients, unless their global norm is NaN/inf; collective.

    Mirrors megatron's ``ChainedOptimizer.step`` (prepare grads, global norm, clip, step) with a
    finiteness check between the norm and the update.

    Args:
        optimizer: A megatron optimizer (chained or not).
        clip_grad: Max global gradient norm (0: no clipping).

    Returns:
        (whether the update was applied, global gradient norm).
    """
    if optimizer.prepare_grads():  # only fp16 loss scaling reports overflows here
        return False, float("nan")
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    if clip_grad > 0.0:
        for sub in _sub_optimizers(optimizer):
            params = sub.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(params, max_norm=clip_grad, total_norm=grad_norm)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def current_lr(optimizer) -> float:
    """The learning rate of the first parameter group."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        return float(lr.item() if isinstance(lr, torch.Tensor) else lr)
    return 0.0
