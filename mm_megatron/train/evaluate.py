"""Evaluation during training: validation loss, and attribute accuracy on synthetic captions.

What this file does:
- `validation_loss(chunks, step_batches, iters)`: forward-only passes over `iters` global batches
  of the validation split (megatron's schedules, any layout) -> token-weighted mean loss.
- `caption_attribute_accuracy(chunks, batches, tokenizer, labels)`: on held-out captions of the
  synthetic shapes dataset ("a red circle on the left"), the fraction of colour words and of
  shape words the model predicts exactly (teacher-forced: argmax at every token of the word,
  given the image and the caption so far). With the images blanked the best the model can do is
  guess the most frequent word (about 1/6 for colours, 1/5 for shapes), which is what shows that
  the image path carries information.

Caption accuracy needs the full logits on every rank, so it runs only at PP=1 and CP=1 (TP is
fine: the model gathers the vocab shards); every rank computes the same numbers.

- `run_evaluation(trainer)`: what the trainer runs at each evaluation: the two above where they
  apply, plus a few held-out images captioned by the model (`mm_megatron.infer`) into TensorBoard.

What it does not do: the decoding itself (`mm_megatron.infer`), or metrics for real datasets.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from megatron.core.utils import unwrap_model

from mm_megatron.data import build_dataloader
from mm_megatron.data.batch import IGNORE_INDEX
from mm_megatron.data.image import ImageTransform
from mm_megatron.infer.samples import caption_samples
from mm_megatron.model.image_tokens import ImageTokenCounter
from mm_megatron.parallel.schedule import forward_backward
from mm_megatron.train.data_setup import StepBatches


def validation_loss(chunks: list, step_batches, iters: int) -> float:
    """Mean loss over `iters` global batches drawn from `step_batches` (a `StepBatches`)."""
    for c in chunks:
        c.eval()
    total, tokens = 0.0, 0.0
    try:
        with torch.no_grad():
            for _ in range(iters):
                batches, _ = step_batches.next_step()
                out = forward_backward(chunks, batches, forward_only=True)
                total += out["loss"] * out["tokens"]
                tokens += out["tokens"]
    finally:
        for c in chunks:
            c.train()
    return total / tokens if tokens else float("nan")


def _find(seq: list[int], sub: list[int], start: int = 0) -> int:
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


def caption_attribute_accuracy(
    chunks: list,
    batches: list[dict],
    tokenizer: Any,
    labels: dict[str, list[str]],
) -> dict[str, float]:
    """Colour- and shape-word accuracy on the caption samples among `batches`.

    Args:
        chunks: Model chunks (PP=1, so exactly one).
        batches: Validation micro-batches (model inputs; images may be blanked).
        tokenizer: The HF tokenizer (to find the words' tokens).
        labels: ``{"colours": [...], "shapes": [...]}`` from the dataset's info.

    Returns:
        ``{"colour_acc": ..., "shape_acc": ..., "captions": n}``.
    """
    if len(chunks) != 1:
        raise ValueError("caption accuracy needs PP=1")
    model = unwrap_model(chunks[0])
    if model.language_model.config.context_parallel_size > 1:
        raise ValueError("caption accuracy needs CP=1")
    colours, shapes = labels["colours"], labels["shapes"]
    caption_re = re.compile(rf"^\s*a ({'|'.join(colours)}) ({'|'.join(shapes)}) ")
    word_ids = {
        w: tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in colours + shapes
    }
    correct = {"colour": 0, "shape": 0}
    n = 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                tokens = batch.get("image_tokens")
                logits = model(
                    batch["images"],
                    batch["input_ids"],
                    None,
                    batch["num_images"],
                    image_tokens=tokens,
                    num_tiles=batch.get("num_tiles"),
                    image_sizes=batch.get("image_sizes"),  # a tiling arrangement reads these
                )
                pred = logits.argmax(dim=-1)  # [b, s_out]
                plan = model.plan(
                    batch["input_ids"], batch["labels"], batch["num_images"], image_tokens=tokens
                )
                expanded = plan.labels  # [b, s_out], unshifted
                for row in range(expanded.shape[0]):
                    pos = (expanded[row] != IGNORE_INDEX).nonzero().flatten().tolist()
                    ids = expanded[row, pos].tolist()
                    m = caption_re.match(tokenizer.decode(ids))
                    if not m:
                        continue
                    n += 1
                    at = 0
                    for kind, word in (("colour", m.group(1)), ("shape", m.group(2))):
                        want = word_ids[word]
                        i = _find(ids, want, at)
                        if i < 0:
                            continue
                        at = i + len(want)
                        # the logits at position p - 1 predict the token at p
                        got = [int(pred[row, pos[i + k] - 1]) for k in range(len(want))]
                        correct[kind] += int(got == want)
    finally:
        model.train()
    return {
        "colour_acc": correct["colour"] / n if n else float("nan"),
        "shape_acc": correct["shape"] / n if n else float("nan"),
        "captions": n,
    }


def run_evaluation(trainer) -> dict[str, float]:
    """The trainer's evaluation: validation loss, caption accuracy on synthetic data, and a few
    held-out images captioned into TensorBoard; collective."""
    t = trainer.job.train
    out: dict[str, float] = {}
    if trainer.val_loader is not None:
        trainer.val_loader.load_state_dict({"sample_position": 0})
        val = StepBatches(trainer.val_loader, trainer.num_microbatches, t.blank_images)
        out["val_loss"] = validation_loss(trainer.chunks, val, t.eval_iters)
    if trainer.caption_eval:
        out.update(caption_accuracy(trainer))
    if out:
        shown = " | ".join(f"{k}: {v:.4f}" for k, v in out.items())
        trainer.writer.print(f"[eval] iteration {trainer.iteration} | {shown}")
        trainer.writer.scalars(trainer.iteration, out, prefix="eval")
        trainer.result.evals[trainer.iteration] = out
    if trainer.heldout:  # a few held-out images with the model's captions, to TensorBoard
        d = trainer.data.config
        transform = ImageTransform(d.image_size, d.image_aspect, d.image_norm)
        answers = caption_samples(
            unwrap_model(trainer.chunks[0]),
            trainer.tokenizer,
            d.template,
            transform,
            trainer.heldout,
        )
        trainer.writer.samples(trainer.iteration, trainer.heldout, answers)
        trainer.writer.print(
            f"[eval] sample {trainer.heldout[0].key}: {answers[0]!r} "
            f"(reference {trainer.heldout[0].reference!r})"
        )
    return out


def caption_accuracy(trainer) -> dict[str, float]:
    """Colour/shape accuracy over the whole held-out split (same on every rank)."""
    loader = build_dataloader(
        trainer.data.config,
        trainer.tokenizer,
        dp_rank=0,
        dp_size=1,
        micro_batch_size=max(trainer.job.train.micro_batch_size, 16),
        image_tokens=ImageTokenCounter.from_config(trainer.job.model),
        seed=trainer.job.train.seed,
        tiling=trainer.job.model.tiling,
        split="val",
    )
    batches = []
    for batch in loader:
        batch.pop("sample_keys")
        batch.pop("expanded_lens")
        if trainer.job.train.blank_images:
            batch["images"] = torch.zeros_like(batch["images"])
        batches.append(batch)
    return caption_attribute_accuracy(
        trainer.chunks, batches, trainer.tokenizer.tokenizer, trainer.data.labels
    )
