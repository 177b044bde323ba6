"""Image-token merge: expand each ``<image>`` placeholder into the image's embeddings.

Given text ``input_ids [b, s]`` where every image is ONE placeholder token, the number of
embeddings of every image ``image_tokens [N]`` (images in sample order, left to right within a
sample; counts may differ per image), and the images' features flattened to
``[sum(image_tokens), h]``, build the decoder input of length ``s_out = max_b(s - n_images_b +
sum of sample b's image_tokens)`` (per sample: ``text - n_image_tokens + sum(image_tokens)``). All
index arithmetic is vectorised (no Python loop over samples, images or tokens).

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
    image_tokens: torch.Tensor
    """long [N]: embeddings of each image."""
    labels: torch.Tensor | None
    """long [b, s_out]: unshifted labels, -100 at image and padding positions."""
    segment_lengths: torch.Tensor | None = None
    """long [b, k]: expanded lengths of packed sub-sequences (0-padded), if packed."""

    @property
    def num_images(self) -> int:
        """Total images N."""
        return int(self.image_tokens.numel())

    @property
    def num_image_embeddings(self) -> int:
        """Image embedding rows the merge expects: sum(image_tokens)."""
        return int(self.image_index[0].numel())


def plan_merge(
    input_ids: torch.Tensor,
    image_token_id: int,
    image_tokens: torch.Tensor | int,
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
        image_tokens: long [N] embeddings of each image (placeholder order), or one int for all.
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
    device = input_ids.device
    is_img = input_ids == image_token_id  # [b, s]
    n_img = is_img.sum(1)  # [b]
    if num_images is not None:
        num_images = num_images.to(device)
        bad = (num_images != n_img).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ImageTokenMismatchError(
                f"sample {i}: {int(n_img[i])} <image> placeholder(s) (id {image_token_id}) but "
                f"{int(num_images[i])} image(s)"
            )
    ib, isrc = is_img.nonzero(as_tuple=True)  # [N], row-major = image order
    counts = _image_counts(image_tokens, int(ib.numel()), device)  # [N]
    if text_lengths is None:
        text_lengths = torch.full((b,), s, dtype=torch.long, device=device)
    width = torch.ones(b, s, dtype=torch.long, device=device)  # [b, s]: columns per source token
    width[ib, isrc] = counts
    start = torch.cumsum(width, 1) - width  # [b, s]: destination column of each source token
    valid = torch.arange(s, device=device)[None] < text_lengths[:, None]  # [b, s]
    lengths = (width * valid).sum(1)  # [b]
    s_out = int(width.sum(1).max()) if b else 0
    s_out = max(s_out, int(min_seq_len))
    s_out = -(-s_out // seq_multiple) * seq_multiple

    tb, ts = (~is_img).nonzero(as_tuple=True)
    td = start[tb, ts]
    total = int(counts.sum())
    first = torch.cumsum(counts, 0) - counts  # [N]: first embedding row of each image
    img_b = ib.repeat_interleave(counts, output_size=total)  # [sum(counts)]
    offs = torch.arange(total, device=device) - first.repeat_interleave(counts, output_size=total)
    img_d = start[ib, isrc].repeat_interleave(counts, output_size=total) + offs  # [sum(counts)]

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
        seg = _segment_lengths(width, seq_lens)
    return MergePlan(
        seq_len=s_out,
        lengths=lengths,
        text_index=(tb, ts, td),
        image_index=(img_b, img_d),
        image_tokens=counts,
        labels=out_labels,
        segment_lengths=seg,
    )


def _image_counts(image_tokens: torch.Tensor | int, n: int, device) -> torch.Tensor:
    """long [n] embeddings per image; a ValueError when the batch's counts do not match."""
    if isinstance(image_tokens, int):
        return torch.full((n,), image_tokens, dtype=torch.long, device=device)
    counts = image_tokens.to(device=device, dtype=torch.long)
    if counts.shape != (n,):
        raise ImageTokenMismatchError(
            f"{n} <image> placeholder(s) but image_tokens has shape {tuple(counts.shape)}"
        )
    if n and int(counts.min()) < 1:
        raise ImageTokenMismatchError(f"image_tokens must be >= 1, got {counts.tolist()}")
    return counts


def _segment_lengths(width: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Expanded length of each packed sub-sequence: the sum of its tokens' widths."""
    b, s = width.shape
    k = seq_lens.shape[1]
    ends = torch.cumsum(seq_lens, 1)  # [b, k]
    if bool((ends[:, -1] > s).any()):
        i = int((ends[:, -1] > s).nonzero()[0, 0])
        raise ValueError(f"sample {i}: packed seq_lens sum {int(ends[i, -1])} > row length {s}")
    col = torch.arange(s, device=width.device).expand(b, s).contiguous()
    seg_id = torch.searchsorted(ends, col, right=True).clamp(max=k - 1)  # [b, s]
    extra = torch.zeros(b, k, dtype=torch.long, device=width.device)
    extra.scatter_add_(1, seg_id, width - 1)
    return seq_lens + extra * (seq_lens > 0)


def merge_embeddings(
    text_embeds: torch.Tensor, image_embeds: torch.Tensor, plan: MergePlan
) -> torch.Tensor:
    """Scatter text and image embeddings into the expanded sequence.

    Args:
        text_embeds: [b, s, h] embeddings of ``input_ids``.
        image_embeds: [sum(image_tokens), h] projected image features, image-major.
        plan: from :func:`plan_merge` on the same ``input_ids``.

    Returns:
        [b, s_out, h]; positions past a sample's length are zero.
    """
    b, _, h = text_embeds.shape
    expected = plan.num_image_embeddings
    if image_embeds.dim() != 2 or image_embeds.shape[0] != expected:
        raise ImageTokenMismatchError(
            f"batch has {plan.num_images} <image> placeholder(s) expanding to {expected} "
            f"embeddings, but the image features have shape {tuple(image_embeds.shape)}"
        )
    tb, ts, td = plan.text_index
    ib, idst = plan.image_index
    out = text_embeds.new_zeros(b, plan.seq_len, h)
    out = out.index_put((tb, td), text_embeds[tb, ts])
    if expected:
        out = out.index_put((ib, idst), image_embeds.to(out.dtype))
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
