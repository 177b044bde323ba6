"""Image-token merge: expand each ``<image>`` placeholder into the image's embeddings.

Given text ``input_ids [b, s]`` where every image is ONE placeholder token, and image features
``[N, T, h]`` (images in sample order, left to right within a sample), build the decoder input of
length ``s_out = s + max_b(n_images_b) * (T - 1)`` (per sample: ``text - n_image_tokens +
n_images * T``). All index arithmetic is vectorised (no Python loop over samples or tokens).

Split in two so pipeline stages without the embeddings can still compute labels:

* :func:`plan_merge` (cheap, integer-only; every stage): destination of every text token and
  image embedding, expanded labels (-100 and loss mask 0 at image positions), lengths;
* :func:`merge_embeddings` (first stage): scatter text and image embeddings into place.

Errors name the sample: a sample whose placeholder count differs from its image count raises
``ImageTokenMismatchError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


class ImageTokenMismatchError(ValueError):
    """Placeholders and images disagree for some sample."""


@dataclass
class MergePlan:
    """Where each text token and image embedding lands after expansion."""

    seq_len: int
    """Expanded (and padded) sequence length ``s_out``."""
    lengths: torch.Tensor
    """long [b]: valid expanded length of each sample."""
    text_index: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    """(batch, source column, destination column) of every kept text token."""
    image_index: tuple[torch.Tensor, torch.Tensor]
    """(batch, destination column) of every image embedding row, image-major."""
    num_images: int
    """Total images N."""
    labels: torch.Tensor | None
    """long [b, s_out]: unshifted labels, -100 at image and padding positions."""
    segment_lengths: torch.Tensor | None = None
    """long [b, k]: expanded lengths of packed sub-sequences (0-padded), if packed."""


def plan_merge(
    input_ids: torch.Tensor,
    image_token_id: int,
    tokens_per_image: int,
    *,
    num_images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    text_lengths: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    seq_multiple: int = 1,
    min_seq_len: int = 0,
) -> MergePlan:
    """Compute the expansion layout.

    Args:
        input_ids: long [b, s] with one ``image_token_id`` per image.
        image_token_id: the placeholder id.
        tokens_per_image: embeddings per image (T).
        num_images: long [b] images per sample; checked against the placeholders.
        labels: long [b, s] unshifted labels (-100 = no loss), or None.
        text_lengths: long [b] valid text tokens per sample (rest is padding); default s.
        seq_lens: long [b, k] text lengths of packed sub-sequences (0-padded), or None.
        seq_multiple: round ``s_out`` up to a multiple of this (e.g. TP under SP).
        min_seq_len: make ``s_out`` at least this (fixed shapes across micro-batches).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [b, s], got shape {tuple(input_ids.shape)}")
    b, s = input_ids.shape
    t = int(tokens_per_image)
    is_img = input_ids == image_token_id  # [b, s]
    n_img = is_img.sum(1)  # [b]
    if num_images is not None:
        num_images = num_images.to(n_img.device)
        bad = (num_images != n_img).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ImageTokenMismatchError(
                f"sample {i}: {int(n_img[i])} <image> placeholder(s) (id {image_token_id}) but "
                f"{int(num_images[i])} image(s)"
            )
    if text_lengths is None:
        text_lengths = torch.full((b,), s, dtype=torch.long, device=input_ids.device)
    width = torch.where(is_img, t, 1)  # [b, s]
    start = torch.cumsum(width, 1) - width  # [b, s]: destination column of each source token
    lengths = text_lengths + n_img * (t - 1)  # [b]
    s_out = s + (int(n_img.max()) if b else 0) * (t - 1)
    s_out = max(s_out, int(min_seq_len))
    s_out = -(-s_out // seq_multiple) * seq_multiple

    tb, ts = (~is_img).nonzero(as_tuple=True)
    td = start[tb, ts]
    ib, isrc = is_img.nonzero(as_tuple=True)  # row-major = image order
    offs = torch.arange(t, device=input_ids.device)
    img_b = ib.repeat_interleave(t)  # [N*T]
    img_d = (start[ib, isrc][:, None] + offs[None, :]).reshape(-1)  # [N*T]

    out_labels = None
    if labels is not None:
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        out_labels = labels.new_full((b, s_out), IGNORE_INDEX)
        out_labels[tb, td] = labels[tb, ts]

    seg = None
    if seq_lens is not None:
        seg = _segment_lengths(is_img, seq_lens, t)
    return MergePlan(
        seq_len=s_out,
        lengths=lengths,
        text_index=(tb, ts, td),
        image_index=(img_b, img_d),
        num_images=int(ib.numel()),
        labels=out_labels,
        segment_lengths=seg,
    )


def _segment_lengths(is_img: torch.Tensor, seq_lens: torch.Tensor, t: int) -> torch.Tensor:
    """Expanded length of each packed sub-sequence: text_len + n_img * (T - 1)."""
    b, s = is_img.shape
    k = seq_lens.shape[1]
    ends = torch.cumsum(seq_lens, 1)  # [b, k]
    if bool((ends[:, -1] > s).any()):
        i = int((ends[:, -1] > s).nonzero()[0, 0])
        raise ValueError(f"sample {i}: packed seq_lens sum {int(ends[i, -1])} > row length {s}")
    col = torch.arange(s, device=is_img.device).expand(b, s)
    seg_id = torch.searchsorted(ends, col, right=True).clamp(max=k - 1)  # [b, s]
    n_img = torch.zeros(b, k, dtype=torch.long, device=is_img.device)
    n_img.scatter_add_(1, seg_id, is_img.long())
    return seq_lens + n_img * (t - 1) * (seq_lens > 0)


def merge_embeddings(
    text_embeds: torch.Tensor, image_embeds: torch.Tensor, plan: MergePlan
) -> torch.Tensor:
    """Scatter text and image embeddings into the expanded sequence.

    Args:
        text_embeds: [b, s, h] embeddings of ``input_ids``.
        image_embeds: [N, T, h] projected image features.
        plan: from :func:`plan_merge` on the same ``input_ids``.

    Returns:
        [b, s_out, h]; positions past a sample's length are zero.
    """
    b, _, h = text_embeds.shape
    if image_embeds.shape[0] != plan.num_images:
        raise ImageTokenMismatchError(
            f"batch has {plan.num_images} <image> placeholder(s) but {image_embeds.shape[0]} "
            "image(s) were encoded"
        )
    tb, ts, td = plan.text_index
    ib, idst = plan.image_index
    out = text_embeds.new_zeros(b, plan.seq_len, h)
    out = out.index_put((tb, td), text_embeds[tb, ts])
    if plan.num_images:
        if image_embeds.shape[1] * plan.num_images != ib.numel():
            raise ImageTokenMismatchError(
                f"image features have {image_embeds.shape[1]} tokens per image, expected "
                f"{ib.numel() // max(plan.num_images, 1)}"
            )
        out = out.index_put((ib, idst), image_embeds.reshape(-1, h).to(out.dtype))
    return out


def shift_labels(
    labels: torch.Tensor, segment_lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets from unshifted labels.

    Args:
        labels: long [b, s] unshifted (-100 = ignore).
        segment_lengths: long [b, k] packed sub-sequence lengths; the last token of each segment
            gets no target (it must not predict the next sequence's first token).

    Returns:
        (targets [b, s] with -100 replaced by 0, loss_mask float [b, s]).
    """
    target = torch.full_like(labels, IGNORE_INDEX)
    target[:, :-1] = labels[:, 1:]
    if segment_lengths is not None:
        ends = torch.cumsum(segment_lengths, 1) - 1  # [b, k]
        valid = (segment_lengths > 0) & (ends < labels.shape[1])
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(ends)
        target[rows[valid], ends[valid]] = IGNORE_INDEX
    mask = target != IGNORE_INDEX
    return target.masked_fill(~mask, 0), mask.float()
