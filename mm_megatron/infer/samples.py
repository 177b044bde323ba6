"""Held-out images and the model's captions of them: for TensorBoard, the run summary and tests.

What this file does: `heldout_samples(val_shards, k)` reads the first `k` single-image samples of a
validation split (raw image bytes, the user's question, the reference answer); `caption_samples`
generates the model's answers to them with `Generator` (greedy, KV cache).

What it does not do: score answers (the tests and `train/evaluate.py` do) or write files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from mm_megatron.data.image import ImageTransform, decode_image
from mm_megatron.data.shards import ShardMembers, resolve_shards
from mm_megatron.infer.generate import Generator, build_prompt, model_image_inputs

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Member extensions taken as images (`0.jpg`, ...)."""


@dataclass
class HeldOutSample:
    """One validation sample with one image."""

    key: str
    """Sample key in its shard."""
    image_bytes: bytes
    """The encoded image, as stored."""
    image_ext: str
    """Its extension (jpg, png, ...)."""
    prompt: str
    """The first user turn."""
    reference: str
    """The first assistant turn."""


def heldout_samples(val_shards: str, k: int) -> list[HeldOutSample]:
    """The first `k` samples of `val_shards` that have exactly one image and a caption."""
    out: list[HeldOutSample] = []
    for shard in resolve_shards(val_shards, "val"):
        members = ShardMembers(shard.path)
        try:
            for key in members.keys:
                images = [e for e in members.members[key] if e.split(".")[-1] in IMAGE_EXTS]
                if len(images) != 1 or "json" not in members.members[key]:
                    continue
                record = json.loads(members.read(key, "json"))
                turns = record.get("conversations") or []
                if len(turns) < 2:
                    continue
                out.append(
                    HeldOutSample(
                        key=key,
                        image_bytes=members.read(key, images[0]),
                        image_ext=images[0].split(".")[-1],
                        prompt=turns[0]["value"],
                        reference=turns[1]["value"],
                    )
                )
                if len(out) == k:
                    return out
        finally:
            members.close()
    return out


def caption_samples(
    model: Any,
    tokenizer_info: Any,
    template: str,
    transform: ImageTransform,
    samples: list[HeldOutSample],
    *,
    max_new_tokens: int = 32,
    system_prompt: str | None = None,
) -> list[str]:
    """Greedy answers of `model` to each sample's prompt and image."""
    generator = Generator(model, tokenizer_info, template)
    answers = []
    for sample in samples:
        # [tiles, 3, H, W]: one tile, or the model's tiling scheme's tiles
        image, extras = model_image_inputs(
            model, transform, [decode_image(sample.image_bytes)], tokenizer_info
        )
        prompt = build_prompt(tokenizer_info, template, sample.prompt, 1, system_prompt)
        with torch.no_grad():
            out = generator.generate(
                image, prompt, max_new_tokens=max_new_tokens, image_inputs=extras
            )
            answers.append(out.text.strip())
    return answers
