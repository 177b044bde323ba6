"""Synthetic micro-batches of a fixed expanded length, for benchmarks and memory measurements.

What this file does: builds batches that follow the batch contract (`mm_megatron/data/batch.py`):
every row holds ``images`` one-tile images (placeholders right after its first token) and random
text up to an expanded length of exactly ``seq`` tokens (``seq - images * image_token_count``
text tokens plus the placeholders), loss on every text token but the first; images are
standard-normal pixels. Nothing is padded, so every token is real and the FLOPs count is exact.

What it does not do: tokenize, decode images, or pack; the real pipeline is `mm_megatron.data`.
"""

from __future__ import annotations

import torch

from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.data.batch import IGNORE_INDEX
from mm_megatron.model.image_tokens import image_token_count


def text_length(cfg: LlavaConfig, seq: int, images: int) -> int:
    """Text tokens (placeholders included) of a row whose expanded length is ``seq``."""
    per_image = image_token_count(cfg)
    n = seq - images * per_image + images
    if n < images + 2:
        raise ValueError(
            f"--seq {seq} is too short for {images} image(s) of {per_image} tokens plus two "
            "text tokens"
        )
    return n


def synthetic_batch(
    cfg: LlavaConfig,
    seq: int,
    rows: int,
    *,
    images: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """One micro-batch of ``rows`` rows, each of expanded length ``seq`` with ``images`` images.

    Args:
        cfg: The model (image size, token ids, vocabulary).
        seq: Expanded length of every row (image tokens included).
        rows: Rows (the micro-batch size).
        images: Images per row.
        generator: RNG for the tokens and pixels.
        device: Where the tensors go.
    """
    n = text_length(cfg, seq, images)
    low = cfg.image_token_id + 1
    if low >= cfg.lm.vocab_size:
        low = 0
    ids = torch.randint(low, cfg.lm.vocab_size, (rows, n), generator=generator)  # [b, s_text]
    ids[ids == cfg.image_token_id] = (cfg.image_token_id + 1) % cfg.lm.vocab_size
    ids[:, 1 : 1 + images] = cfg.image_token_id
    labels = ids.clone()
    labels[:, : 1 + images] = IGNORE_INDEX
    v = cfg.vision
    pixels = torch.randn(
        rows * images, v.num_channels, v.image_size, v.image_size, generator=generator
    )
    batch = {
        "images": pixels,  # [N, C, H, W]
        "input_ids": ids,
        "labels": labels,
        "num_images": torch.full((rows,), images, dtype=torch.long),
        "num_tiles": torch.ones(rows * images, dtype=torch.long),
        "image_tokens": torch.full((rows * images,), image_token_count(cfg), dtype=torch.long),
        "expanded_lens": torch.full((rows,), seq, dtype=torch.long),
    }
    return {k: t.to(device) for k, t in batch.items()}
