"""Invariants that layout parity cannot see, because both sides of a parity check share the bug.

- Packing: a packed row's per-token loss and loss mask equal those of the same samples unpacked
  (a sequence's last token must not be trained on the next sample's first token).
- Loss normalisation: one step over micro-batches of unequal token counts gives the gradient of
  the global token mean, computed by hand with plain autograd.
"""

from __future__ import annotations

import pytest
import torch

from mm_megatron.config import get_preset

IMG_SIZE = 32


def _config():
    cfg = get_preset("debug-tiny")
    cfg.vision.image_size = IMG_SIZE
    cfg.vision.patch_size = 8
    cfg.freeze_vision = False
    return cfg


def _sample(cfg, gen, length: int, n_images: int):
    """One sample whose EVERY token has a label (the model must not rely on the data's -100s)."""
    ids = torch.randint(10, cfg.lm.vocab_size, (length,), generator=gen)
    if n_images:
        ids[torch.randperm(length - 1, generator=gen)[:n_images] + 1] = cfg.image_token_id
    labels = torch.where(ids == cfg.image_token_id, -100, ids)
    images = torch.randn(n_images, 3, IMG_SIZE, IMG_SIZE, generator=gen)
    return ids, labels, images


def test_packed_row_loss_equals_unpacked(single_rank):
    from mm_megatron.model.build import build_llava_model

    cfg = _config()
    torch.manual_seed(0)
    model = build_llava_model(cfg)
    gen = torch.Generator().manual_seed(1)
    samples = [_sample(cfg, gen, n, k) for n, k in ((9, 1), (6, 0), (11, 2))]
    with torch.no_grad():
        separate = []
        for ids, labels, images in samples:
            loss, mask = model(images, ids[None], labels[None], torch.tensor([int(len(images))]))
            separate.append((loss[0], mask[0]))
        ids = torch.cat([s[0] for s in samples])[None]
        labels = torch.cat([s[1] for s in samples])[None]
        images = torch.cat([s[2] for s in samples])
        seq_lens = torch.tensor([[len(s[0]) for s in samples]])
        loss, mask = model(images, ids, labels, torch.tensor([len(images)]), seq_lens)
    # the packed output is one THD row: the samples' expanded tokens back to back
    at = 0
    for i, (ref_loss, ref_mask) in enumerate(separate):
        n = int(ref_mask.shape[0])
        n_real = model.plan(samples[i][0][None]).lengths.item()
        got_mask = mask[0, at : at + n_real]
        torch.testing.assert_close(got_mask, ref_mask[:n_real], rtol=0, atol=0)
        torch.testing.assert_close(
            loss[0, at : at + n_real] * got_mask, ref_loss[:n_real] * ref_mask[:n_real]
        )
        assert n >= n_real
        at += n_real
        # the last token of every sample predicts nothing
        assert got_mask[-1] == 0, f"sample {i}'s last token is trained on the next sample"


def test_loss_is_the_global_token_mean_over_unequal_microbatches(single_rank):
    """forward_backward's gradient == autograd of (sum of token losses / all tokens)."""
    from mm_megatron.config import ParallelConfig
    from mm_megatron.model.build import build_llava_model, build_model_chunks
    from mm_megatron.parallel.schedule import forward_backward
    from tests.distributed.resharding import gather_full

    cfg = _config()
    torch.manual_seed(0)
    chunks = build_model_chunks(cfg, ParallelConfig())
    gen = torch.Generator().manual_seed(2)
    micro = []
    for length, k in ((30, 1), (7, 0), (18, 2)):  # very unequal token counts
        ids, labels, images = _sample(cfg, gen, length, k)
        micro.append(
            dict(
                images=images,
                input_ids=ids[None],
                labels=labels[None],
                num_images=torch.tensor([k]),
            )
        )
    for c in chunks:
        c.zero_grad_buffer()
    out = forward_backward(chunks, micro)
    got = gather_full(chunks, tp_rank=0, pp_rank=0, grads=True)

    model = build_llava_model(cfg)  # plain autograd, no DDP hooks: the same weights
    model.load_state_dict(chunks[0].module.state_dict())
    ref_model_grads = {}
    total_loss, total_tokens = 0.0, 0.0
    sums = []
    for mb in micro:
        loss, mask = model(**mb)
        sums.append((loss * mask).sum())
        total_tokens += float(mask.sum())
    total = torch.stack(sums).sum() / total_tokens
    total.backward()
    total_loss = float(total)
    for name, p in model.named_parameters():
        if p.grad is not None:
            ref_model_grads[name] = p.grad.detach().clone()
    assert out["tokens"] == total_tokens
    assert out["loss"] == pytest.approx(total_loss, rel=1e-6)
    assert ref_model_grads, "no gradients in the reference"
    for name, ref in ref_model_grads.items():
        err = (got[name] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err < 1e-5, f"{name}: relative error {err:.2e} (loss not the global token mean?)"
