"""Synthetic micro-batches of a fixed expanded length, for benchmarks and memory measurements.

What this file does: builds batches that follow the batch contract (`mm_megatron/data/batch.py`):
every row holds ``images`` copies of the model's representative image
(`model.image_tokens.representative_image`: tiled and counted by the model's own scheme, its
placeholders right after the row's first token) and random text up to an expanded length of
exactly ``seq`` tokens, loss on every text token but the first; tiles are standard-normal
pixels. Nothing is padded, so every token is real and the FLOPs count is exact.

What it does not do: tokenize, decode images, or pack; the real pipeline is `mm_megatron.data`.
"""

from __future__ import annotations

import torch

from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.data.batch import IGNORE_INDEX
from mm_megatron.model.image_tokens import representative_image


def text_length(cfg: LlavaConfig, seq: int, images: int) -> int:
    """Text tokens (placeholders included) of a row whose expanded length is ``seq``."""
    img = representative_image(cfg)
    n = seq - images * (img.tokens - img.placeholders)
    if n < images * img.placeholders + 2:
        raise ValueError(
            f"--seq {seq} is too short for {images} image(s) of {img.tokens} tokens plus two "
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
        cfg: The model (image size, tiling, token ids, vocabulary).
        seq: Expanded length of every row (image tokens included).
        rows: Rows (the micro-batch size).
        images: Images per row (each the model's `representative_image`).
        generator: RNG for the tokens and pixels.
        device: Where the tensors go.
    """
    img = representative_image(cfg)
    n = text_length(cfg, seq, images)
    ph = images * img.placeholders  # placeholders per row
    low = cfg.image_token_id + 1
    if low >= cfg.lm.vocab_size:
        low = 0
    ids = torch.randint(low, cfg.lm.vocab_size, (rows, n), generator=generator)  # [b, s_text]
    ids[ids == cfg.image_token_id] = (cfg.image_token_id + 1) % cfg.lm.vocab_size
    ids[:, 1 : 1 + ph] = cfg.image_token_id
    labels = ids.clone()
    labels[:, : 1 + ph] = IGNORE_INDEX
    size = img.tile_size
    tiles = rows * images * img.tiles
    pixels = torch.randn(tiles, cfg.vision.num_channels, size, size, generator=generator)
    per_row = rows * images
    batch = {
        "images": pixels,  # [N_tiles, C, H, W]
        "input_ids": ids,
        "labels": labels,
        "num_images": torch.full((rows,), ph, dtype=torch.long),
        "num_tiles": torch.tensor(img.tiles_per_placeholder * per_row, dtype=torch.long),
        "image_tokens": torch.tensor(img.tokens_per_placeholder * per_row, dtype=torch.long),
        "image_sizes": torch.full((rows * ph, 2), img.side, dtype=torch.long),
        "expanded_lens": torch.full((rows,), seq, dtype=torch.long),
    }
    return {k: t.to(device) for k, t in batch.items()}
