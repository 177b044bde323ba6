"""The LLaVA model on the local spec, one rank: forward/backward, merge, freezing, variants."""

from __future__ import annotations

import pytest
import torch

from mm_megatron.config import get_preset
from mm_megatron.model.build import build_llava_model, freeze
from mm_megatron.model.image_tokens import image_token_count


def batch(cfg, b=3, s=16, seed=0, images_per_sample=(1, 2, 0)):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, cfg.lm.vocab_size, (b, s), generator=gen)
    for i, n in enumerate(images_per_sample):
        ids[i, 1 : 1 + 3 * n : 3] = cfg.image_token_id
    labels = ids.clone()
    labels[:, :2] = -100
    n_img = torch.tensor(images_per_sample)
    v = cfg.vision
    images = torch.randn(int(n_img.sum()), 3, v.image_size, v.image_size, generator=gen)
    return dict(images=images, input_ids=ids, labels=labels, num_images=n_img)


def mean_loss(model, b):
    loss, mask = model(**b)
    return (loss * mask).sum() / mask.sum()


@pytest.fixture
def tiny(single_rank):
    cfg = get_preset("debug-tiny")
    torch.manual_seed(0)
    return cfg, build_llava_model(cfg)


def test_forward_backward_local_spec(tiny):
    cfg, model = tiny
    b = batch(cfg)
    loss, mask = model(**b)
    t = image_token_count(cfg)
    assert loss.shape == (3, 16 + 2 * (t - 1))
    assert mask[2, 16:].sum() == 0  # text-only sample has nothing past its 16 tokens
    lm = (loss * mask).sum() / mask.sum()
    assert abs(lm.item() - torch.log(torch.tensor(512.0)).item()) < 1.0  # ~uniform at init
    lm.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.vision_model.conv1.weight.grad.abs().sum() > 0


def test_logits_shape_strips_vocab_padding(tiny):
    cfg, model = tiny
    b = batch(cfg)
    b.pop("labels")
    logits = model(**b)
    assert logits.shape[-1] == cfg.lm.vocab_size


def test_text_only_batch_touches_vision_with_zero_grad(tiny):
    cfg, model = tiny
    b = batch(cfg, images_per_sample=(0, 0, 0))
    mean_loss(model, b).backward()
    g = model.vision_model.conv1.weight.grad
    assert g is not None and (g == 0).all()
    assert model.vision_projection.encoder.linear_fc1.weight.grad is not None


def test_image_changes_only_with_image(tiny):
    cfg, model = tiny
    model.eval()
    b = batch(cfg)
    with torch.no_grad():
        l1, _ = model(**b)
        b2 = dict(b, images=b["images"] + 1.0)
        l2, _ = model(**b2)
    assert not torch.allclose(l1[0], l2[0])  # sample with an image
    torch.testing.assert_close(l1[2], l2[2])  # text-only sample is unaffected


def test_freezing(single_rank):
    cfg = get_preset("debug-tiny")
    cfg.freeze_vision, cfg.freeze_projector, cfg.freeze_lm = True, False, True
    model = build_llava_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("vision_projection.") for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mean_loss(model, batch(cfg)).backward()
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == (n in trainable), n
    freeze(model, vision=False, projector=False, lm=False)
    assert all(p.requires_grad for p in model.parameters())


def test_siglip_linear_qwen2_variant(single_rank):
    cfg = get_preset("debug-tiny")
    cfg.vision.style = "siglip"
    cfg.vision.feature_layer = -1
    cfg.projector.type = "linear"
    cfg.lm.qkv_bias = True
    cfg.lm.tie_embeddings = True
    cfg.lm.rope_theta = 1e6
    model = build_llava_model(cfg)
    names = dict(model.named_parameters())
    assert "vision_model.class_token" not in names
    assert "vision_model.conv1.bias" in names
    assert "vision_model.post_layernorm.weight" in names
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.bias" in names
    assert "language_model.output_layer.weight" not in names  # tied
    assert image_token_count(cfg) == 16
    mean_loss(model, batch(cfg)).backward()


def test_unknown_projector_lists_registered(single_rank):
    cfg = get_preset("debug-tiny")
    cfg.projector.type = "qformer?"
    with pytest.raises(
        ValueError, match=r"choose one of \['linear', 'mlp2x_gelu', 'mlp2x_gelu_pool2'"
    ):
        build_llava_model(cfg)


def test_te_spec_needs_te_clear_error(single_rank):
    from mm_megatron.model.specs import have_te

    if have_te():
        pytest.skip("TE installed")
    cfg = get_preset("debug-tiny")
    cfg.set_spec("te")
    with pytest.raises(RuntimeError, match="needs Transformer Engine"):
        build_llava_model(cfg)


def test_debug_tiny_learns_a_fixed_batch(tiny):
    """A few optimizer steps on CPU: the loss goes down."""
    cfg, model = tiny
    b = batch(cfg, seed=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = mean_loss(model, b)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_loss_ignores_vocab_padding(single_rank):
    """megatron pads the vocab (500 -> 512); the padded rows must not enter the softmax."""
    cfg = get_preset("debug-tiny")
    cfg.lm.vocab_size = 500
    model = build_llava_model(cfg)
    model.eval()
    assert model.padded_vocab_size == 512
    b = batch(cfg)
    with torch.no_grad():
        loss, mask = model(**b)
        logits = model(**{k: v for k, v in b.items() if k != "labels"})
    assert logits.shape[-1] == 500
    from mm_megatron.model.merge import shift_labels

    targets, ref_mask = shift_labels(model.plan(b["input_ids"], b["labels"]).labels)
    ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    torch.testing.assert_close(mask, ref_mask)
    torch.testing.assert_close(loss * mask, ref * ref_mask, rtol=1e-5, atol=1e-5)
