"""The logits check's inputs and comparison for ``convert verify``.

What this file does:
- `tower_tokens_per_image(model, pixel_values)`: the image features the HF model's own vision
  path (tower, feature layer(s), select strategy, projector) produces per image. Placeholders
  are expanded by this count, not by ``config.json``'s ``image_seq_length``, which may disagree
  with the tower (transformers would then stop with "Image features and image tokens do not
  match").
- `make_verify_inputs(hf_cfg, tokens_per_image)`: one batch for both models with the cases a
  converter gets wrong: a sample with several images at different positions (their order
  matters), a text-only sample, a shorter sample (right padding; HF gets an attention mask) and
  sequences of a few hundred tokens.
- `compare_logits(ours, ref, lengths, rtol)`: compares only the real (unpadded) positions, with
  a tolerance relative to the logits' scale (`rtol` x max |logit|), and requires the same argmax
  wherever the reference's top two logits are further apart than that tolerance.

What it does not do: build or load either model (`verify.py` does).
"""

from __future__ import annotations

import torch

MIN_TOKENS = 300
"""Expanded length of the longest samples (the check's sequences)."""


@torch.no_grad()
def tower_tokens_per_image(model, pixel_values: torch.Tensor) -> int:
    """Image embeddings the HF LLaVA `model` makes of one image (its real token count).

    Args:
        model: A transformers `LlavaForConditionalGeneration`.
        pixel_values: float [n, 3, H, W]; the first image is used.
    """
    cfg = model.config
    out = model.get_image_features(
        pixel_values=pixel_values[:1],
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    return int(features[0].shape[0])


def image_side(hf_cfg) -> int:
    """The vision tower's square input side (InternVL states it as ``[h, w]``)."""
    size = hf_cfg.vision_config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def image_token_of(hf_cfg) -> int:
    """The image placeholder id (LLaVA: ``image_token_index``, InternVL: ``image_token_id``)."""
    index = getattr(hf_cfg, "image_token_index", None)
    return int(index if index is not None else hf_cfg.image_token_id)


def _text(gen: torch.Generator, n: int, vocab: int, avoid: set[int]) -> torch.Tensor:
    ids = torch.randint(6, vocab, (n,), generator=gen)
    for token in avoid:
        ids[ids == token] = 6
    return ids


def make_verify_inputs(
    hf_cfg, tokens_per_image: int, *, seed: int = 0, min_tokens: int = MIN_TOKENS
) -> dict:
    """Inputs for both models: ``ours`` (one placeholder per image), ``hf`` (expanded, padded,
    with an attention mask) and ``lengths`` (each sample's real expanded length).

    Samples: 0 has two images (at positions 3 and in the middle), 1 is text-only, 2 has one
    image and is shorter than the others (right padding). Samples 0 and 1 reach `min_tokens`
    expanded tokens.

    Args:
        hf_cfg: The HF `LlavaConfig`.
        tokens_per_image: Embeddings per image (`tower_tokens_per_image`).
        seed: Seed of the random ids and pixels.
        min_tokens: Expanded length of the long samples.
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = hf_cfg.text_config.vocab_size
    image = image_token_of(hf_cfg)
    pad = getattr(hf_cfg, "pad_token_id", None)
    pad = int(pad) if pad is not None and 0 <= int(pad) < vocab else 0
    avoid = {image, pad}
    t = tokens_per_image
    long_text = max(min_tokens - 2 * t, 8) + 2
    # (text pieces between images): an image follows every piece but the last
    layouts = [
        [3, long_text // 2 - 3, long_text - long_text // 2],  # two images, in order
        [max(min_tokens, long_text)],  # text only
        [5, max(long_text // 3, 6)],  # one image, shorter: right padding
    ]
    rows, images = [], []
    for pieces in layouts:
        parts = []
        for i, n in enumerate(pieces):
            parts.append(_text(gen, n, vocab, avoid))
            if i < len(pieces) - 1:
                parts.append(torch.tensor([image]))
        rows.append(torch.cat(parts))
        images += [len(pieces) - 1]
    size = image_side(hf_cfg)
    pixels = torch.randn(sum(images), 3, size, size, generator=gen)
    s = max(len(r) for r in rows)
    ours_ids = torch.full((len(rows), s), pad, dtype=torch.long)
    expanded = []
    for i, row in enumerate(rows):
        ours_ids[i, : len(row)] = row
        parts = [torch.full((t,), image) if tok == image else tok.view(1) for tok in row]
        expanded.append(torch.cat(parts))
    lengths = [len(e) for e in expanded]
    hf_ids = torch.full((len(rows), max(lengths)), pad, dtype=torch.long)
    mask = torch.zeros_like(hf_ids)
    for i, e in enumerate(expanded):
        hf_ids[i, : len(e)] = e
        mask[i, : len(e)] = 1
    ours = dict(images=pixels, input_ids=ours_ids, num_images=torch.tensor(images))
    hf = dict(pixel_values=pixels, input_ids=hf_ids, attention_mask=mask)
    return {"ours": ours, "hf": hf, "lengths": lengths}


def compare_logits(
    ours: torch.Tensor, ref: torch.Tensor, lengths: list[int], rtol: float
) -> tuple[bool, str]:
    """(ok, detail) for logits [b, >=len, vocab] over each sample's first `lengths[i]` positions.

    Args:
        ours: Our model's logits.
        ref: transformers' logits.
        lengths: Real expanded length of every sample.
        rtol: Allowed max |difference| as a fraction of the largest |reference logit|.
    """
    if ours.shape[0] != ref.shape[0] or ours.shape[-1] != ref.shape[-1]:
        return False, f"shape {list(ours.shape)} vs HF {list(ref.shape)}"
    if min(ours.shape[1], ref.shape[1]) < max(lengths):
        return False, f"{ours.shape[1]} positions for samples of up to {max(lengths)} tokens"
    a = torch.cat([ours[i, :n].float() for i, n in enumerate(lengths)])  # [tokens, vocab]
    b = torch.cat([ref[i, :n].float() for i, n in enumerate(lengths)])
    scale = b.abs().max().item()
    tol = rtol * scale
    diff = (a - b).abs().max().item()
    top2 = b.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol  # positions whose argmax is well defined
    agree = (a.argmax(-1) == b.argmax(-1))[clear].float().mean().item() if clear.any() else 1.0
    ok = diff <= tol and agree == 1.0
    detail = (
        f"max |diff| {diff:.3g} <= {rtol:g} x max |logit| {scale:.3g}"
        if diff <= tol
        else f"max |diff| {diff:.3g} > {rtol:g} x max |logit| {scale:.3g}"
    )
    return ok, f"{detail}; argmax agree {agree:.1%}; {sum(lengths)} tokens of {lengths} per sample"
