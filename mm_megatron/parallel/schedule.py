"""One training/eval step over micro-batches with megatron-core's pipeline schedules.

``forward_backward(chunks, microbatches)`` picks megatron's schedule for the layout (no
pipelining, 1F1B, or interleaved for virtual stages; 1F1B exchanges each micro-batch's own
shape, interleaved runs pad all micro-batches to one length), feeds every stage the same
micro-batches
(each stage recomputes the cheap merge plan; only the first embeds and encodes images), and
returns the token-weighted mean loss over the whole global batch (all micro-batches, DP and CP
ranks) on every rank.

Loss convention (megatron's ``calculate_per_token_loss``): each micro-batch contributes the sum
of its masked token losses and its token count; gradients are divided once by the global token
count in ``finalize_model_grads``. So every layout optimises exactly the same objective: the
mean over all real tokens, independent of how they are split over micro-batches and ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model


def loss_func(output: tuple[torch.Tensor, torch.Tensor]):
    """(per-token loss [b, s], mask [b, s]) -> (loss sum, token count, report)."""
    loss, mask = output
    loss_sum = (loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """megatron forward_step_func: run one micro-batch, hand back the loss function."""
    batch = next(data_iterator)
    return model(**batch), loss_func


def _common_length(chunk, microbatches: list[dict]) -> tuple[list[dict], int]:
    """Pad every micro-batch to one length for the interleaved schedule.

    NOTE: with virtual stages the LM config has ``variable_seq_lengths`` off
    (`transformer_configs.py`), so megatron's interleaved schedule receives activations into
    buffers of ``[seq_length / CP / (TP if SP), mbs, h]`` from the
    ``seq_length`` argument, so every micro-batch must have exactly that (padded, expanded)
    length. Padding sits after every real token with loss mask 0: the loss is unchanged.

    Returns:
        (micro-batches with ``min_seq_len`` set, the common padded length)
    """
    if any("seq_lens" in mb for mb in microbatches):
        raise ValueError(
            "packed (THD) micro-batches are not supported with virtual pipeline stages"
        )
    plan = get_attr_wrapped_model(chunk, "plan")
    factor = get_attr_wrapped_model(chunk, "padder").factor
    longest = max(
        plan(mb["input_ids"], image_tokens=mb.get("image_tokens")).seq_len for mb in microbatches
    )
    padded = -(-longest // factor) * factor
    return [dict(mb, min_seq_len=padded) for mb in microbatches], padded


def forward_backward(
    chunks: list,
    microbatches: list[dict],
    *,
    forward_only: bool = False,
) -> dict[str, float]:
    """Forward (and backward) over ``microbatches`` on this rank's model chunk(s).

    Args:
        chunks: model chunks (one per virtual stage), usually megatron-DDP-wrapped.
        microbatches: this DP rank's micro-batches (dicts of model inputs).
        forward_only: evaluation (no backward, no grad finalisation).

    Returns:
        ``{"loss": mean loss over all real tokens of the global batch, "tokens": count}``,
        identical on every rank.
    """
    first = microbatches[0]["input_ids"]
    seq_length = first.shape[1]  # unused by the no-pipelining and 1F1B (variable-length) paths
    if len(chunks) > 1:
        microbatches, seq_length = _common_length(chunks[0], microbatches)
    fb = get_forward_backward_func()
    iterators = [iter(microbatches) for _ in chunks]
    results = fb(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=first.shape[0],
        forward_only=forward_only,
    )
    totals = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for r in results:
            totals += r["lm loss"].double()
    if dist.is_initialized() and dist.get_world_size() > 1:
        # Sum over DP x CP ranks of the last stage, then share with every stage.
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            dist.all_reduce(
                totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
            )
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(totals, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    tokens = float(totals[1])
    return {"loss": float(totals[0]) / max(tokens, 1.0), "tokens": tokens}
