"""Image-token merge vs a simple per-sample reference implementation."""

from __future__ import annotations

import pytest
import torch

from mm_megatron.model.merge import (
    IGNORE_INDEX,
    ImageTokenMismatchError,
    merge_embeddings,
    plan_merge,
    shift_labels,
)

IMG = 7


def reference_merge(input_ids, labels, image_embeds, h):
    """Loop-based LLaVA merge over a list of per-image embeddings [T_i, h] (T_i may differ):
    returns the text embeddings and a list of (embeds [L, h], labels [L]) per sample."""
    out, k = [], 0
    text_embeds = torch.nn.functional.one_hot(input_ids, 50).float() @ torch.arange(
        50 * h, dtype=torch.float
    ).reshape(50, h)
    for b in range(input_ids.shape[0]):
        es, ls = [], []
        for j in range(input_ids.shape[1]):
            if int(input_ids[b, j]) == IMG:
                es.append(image_embeds[k])
                ls.append(torch.full((image_embeds[k].shape[0],), IGNORE_INDEX))
                k += 1
            else:
                es.append(text_embeds[b, j : j + 1])
                ls.append(labels[b, j : j + 1])
        out.append((torch.cat(es), torch.cat(ls)))
    return text_embeds, out


def make_batch(gen, b, s, max_imgs):
    ids = torch.randint(10, 50, (b, s), generator=gen)
    n = torch.randint(0, max_imgs + 1, (b,), generator=gen)
    n[0] = 0  # always one text-only sample
    for i in range(b):
        pos = torch.randperm(s, generator=gen)[: int(n[i])]
        ids[i, pos] = IMG
    labels = torch.where(torch.rand(b, s, generator=gen) < 0.3, IGNORE_INDEX, ids)
    return ids, labels, n


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("t", [1, 3, 5])
def test_merge_matches_reference(seed, t):
    gen = torch.Generator().manual_seed(seed)
    b, s, h = 4, 12, 6
    ids, labels, n = make_batch(gen, b, s, max_imgs=3)
    imgs = torch.randn(int(n.sum()), t, h, generator=gen)
    text, ref = reference_merge(ids, labels, list(imgs), h)
    plan = plan_merge(ids, IMG, t, num_images=n, labels=labels)
    merged = merge_embeddings(text, imgs.flatten(0, 1), plan)
    assert plan.seq_len == s + int(n.max()) * (t - 1)
    for i, (e, lab) in enumerate(ref):
        length = s - int(n[i]) + int(n[i]) * t  # text - n_image_tokens + n_images * T
        assert e.shape[0] == length == int(plan.lengths[i])
        torch.testing.assert_close(merged[i, :length], e, rtol=0, atol=0)
        assert torch.equal(plan.labels[i, :length], lab)
        assert (merged[i, length:] == 0).all()
        assert (plan.labels[i, length:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("seed", range(5))
def test_merge_variable_tokens_per_image_matches_reference(seed):
    # every image has its own count (tiles, pooling, newline rows): still one vectorised merge
    gen = torch.Generator().manual_seed(seed)
    b, s, h = 5, 14, 4
    ids, labels, n = make_batch(gen, b, s, max_imgs=3)
    counts = torch.randint(1, 9, (int(n.sum()),), generator=gen)
    per_image = [torch.randn(int(c), h, generator=gen) for c in counts]
    text, ref = reference_merge(ids, labels, per_image, h)
    flat = torch.cat(per_image) if per_image else torch.zeros(0, h)
    plan = plan_merge(ids, IMG, counts, num_images=n, labels=labels)
    merged = merge_embeddings(text, flat, plan)
    assert plan.seq_len == max(e.shape[0] for e, _ in ref)
    for i, (e, lab) in enumerate(ref):
        length = e.shape[0]
        assert length == int(plan.lengths[i])
        torch.testing.assert_close(merged[i, :length], e, rtol=0, atol=0)
        assert torch.equal(plan.labels[i, :length], lab)
        assert (merged[i, length:] == 0).all()


def test_packed_segments_with_variable_counts():
    # row: [seg0: 1 IMG 2] [seg1: 3 IMG IMG 4]; images of 2, 5 and 1 embeddings
    ids = torch.tensor([[1, IMG, 2, 3, IMG, IMG, 4, 0]])
    plan = plan_merge(ids, IMG, torch.tensor([2, 5, 1]), seq_lens=torch.tensor([[3, 4, 0]]))
    assert plan.segment_lengths.tolist() == [[3 + 1, 4 + 4 + 0, 0]]
    with pytest.raises(ImageTokenMismatchError, match="image_tokens has shape"):
        plan_merge(ids, IMG, torch.tensor([2, 5]))


def test_merge_gradients_flow_to_both_sources():
    gen = torch.Generator().manual_seed(0)
    ids, labels, n = make_batch(gen, 3, 8, 2)
    ids[1, 2] = IMG
    n = (ids == IMG).sum(1)
    text = torch.randn(3, 8, 4, requires_grad=True)
    imgs = torch.randn(int(n.sum()), 2, 4, requires_grad=True)
    merged = merge_embeddings(text, imgs.flatten(0, 1), plan_merge(ids, IMG, 2, num_images=n))
    merged.sum().backward()
    assert torch.equal(imgs.grad, torch.ones_like(imgs))
    assert torch.equal(text.grad[ids != IMG], torch.ones_like(text.grad[ids != IMG]))
    assert (text.grad[ids == IMG] == 0).all()


def test_mismatch_names_sample():
    ids = torch.tensor([[1, IMG, 2], [IMG, IMG, 3]])
    with pytest.raises(ImageTokenMismatchError, match="sample 1: 2 <image> placeholder"):
        plan_merge(ids, IMG, 4, num_images=torch.tensor([1, 1]))
    plan = plan_merge(ids, IMG, 4)
    with pytest.raises(ImageTokenMismatchError, match="3 <image> placeholder.*12 embeddings"):
        merge_embeddings(torch.zeros(2, 3, 5), torch.zeros(8, 5), plan)


def test_image_positions_have_no_loss_and_shift():
    ids = torch.tensor([[1, IMG, 2, 3]])
    labels = ids.clone()
    plan = plan_merge(ids, IMG, 3, labels=labels)
    assert plan.labels.tolist() == [[1, -100, -100, -100, 2, 3]]
    target, mask = shift_labels(plan.labels)
    # the last image token predicts the first text token after the image, like HF LLaVA
    assert target.tolist() == [[0, 0, 0, 2, 3, 0]]
    assert mask.tolist() == [[0, 0, 0, 1, 1, 0]]


def test_seq_multiple_and_min_len():
    ids = torch.tensor([[1, IMG, 2]])
    assert plan_merge(ids, IMG, 4, seq_multiple=4).seq_len == 8
    assert plan_merge(ids, IMG, 4, min_seq_len=11, seq_multiple=4).seq_len == 12


def test_packed_segments_expand_and_stop_at_boundaries():
    # row: [seg0: 1 IMG 2] [seg1: 3 IMG IMG 4] [pad]
    ids = torch.tensor([[1, IMG, 2, 3, IMG, IMG, 4, 0]])
    seq_lens = torch.tensor([[3, 4, 0]])
    plan = plan_merge(ids, IMG, 3, labels=ids.clone(), seq_lens=seq_lens)
    assert plan.segment_lengths.tolist() == [[5, 8, 0]]
    target, mask = shift_labels(plan.labels, plan.segment_lengths)
    assert mask[0, 4] == 0  # last token of segment 0 does not predict segment 1
    assert mask[0, 3] == 1  # last image token of seg 0 predicts "2"
