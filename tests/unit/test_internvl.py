"""InternVL on one rank against transformers: pixel shuffle, projector, InternViT, whole model.

Weights go from a tiny random ``InternVLForConditionalGeneration`` into our model through the
converter's rules (``convert/internvl.py``), so these tests check the mapping too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mm_megatron.config import ParallelConfig, get_preset
from mm_megatron.convert.internvl import hf_internvl_config
from mm_megatron.convert.mapping import build_rules
from mm_megatron.model.build import build_llava_model
from mm_megatron.model.flops import projector_forward_flops
from mm_megatron.model.image_tokens import ImageTokenCounter
from mm_megatron.model.projector import projector_class
from mm_megatron.model.projector_pixel_shuffle import pixel_shuffle
from mm_megatron.parallel.layout import LayoutError, validate_layout


def _hf_model(cfg, seed=0):
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    hf_cfg = hf_internvl_config(cfg)
    hf_cfg._attn_implementation = "eager"
    model = InternVLForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1/0 and lambdas to a constant: randomise all
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _load(ours, hf, cfg, only: str = "") -> None:
    sd = hf.state_dict()
    params = {k: p for k, p in ours.named_parameters() if k.startswith(only)}
    rules = [r for r in build_rules(cfg) if r.param.startswith(only)]
    assert sorted(r.param for r in rules) == sorted(params)  # one rule per parameter
    with torch.no_grad():
        for r in rules:
            t = r.to_mcore([sd[k] for k in r.hf])
            assert t.shape == params[r.param].shape, r.param
            params[r.param].copy_(t)


def _variant(**vision) -> object:
    cfg = get_preset("debug-tiny-internvl")
    cfg.vision = dataclasses.replace(cfg.vision, **vision)
    if not cfg.vision.drop_class_token:  # pixel shuffle needs the square grid
        cfg.projector = dataclasses.replace(cfg.projector, type="mlp2x_gelu")
    cfg.validate()
    return cfg


def test_pixel_shuffle_is_transformers_order():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    side = 8
    x = torch.randn(3, side * side, 5)
    for ratio in (0.5, 0.25):
        want = InternVLModel.pixel_shuffle(None, x.reshape(3, side, side, 5), ratio)
        got = pixel_shuffle(x, ratio)
        assert torch.equal(got, want.reshape(3, -1, want.shape[-1]))


def test_pixel_shuffle_counts_and_checks():
    cfg = get_preset("internvl2-2b")
    counter = ImageTokenCounter.from_config(cfg)
    assert counter() == 256  # 1024 patches of a 448 tile
    proj = projector_class("pixel_shuffle_mlp")
    pcfg = cfg.projector
    # LN not counted; 4h_v -> h_lm -> h_lm per output token
    assert proj.matmul_params(pcfg, 1024, 2048) == 4096 * 2048 + 2048 * 2048
    assert projector_forward_flops(cfg, 1) == 2 * (4096 * 2048 + 2048 * 2048) * 256
    with pytest.raises(ValueError, match="side divides by 2.*1025 tokens"):
        proj.num_output_tokens(pcfg, 1025)
    bad = dataclasses.replace(pcfg, pixel_shuffle_ratio=0.4)
    with pytest.raises(ValueError, match="pixel_shuffle_ratio=0.4 must be 1/k"):
        proj.num_output_tokens(bad, 1024)


def test_heads_not_dividing_tp_fail_layout_validation():
    cfg = get_preset("internvl2-2b")
    cfg.vision.num_attention_heads, cfg.vision.hidden_size = 25, 3200  # InternViT-6B
    with pytest.raises(LayoutError) as e:
        validate_layout(cfg, ParallelConfig(tp=2))
    assert "vision.num_attention_heads=25 is not divisible by TP=2" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "vision",
    [
        dict(),  # LayerNorm, QK norm, layer scale, feature layer -2, class token dropped
        dict(norm="RMSNorm", qk_norm=False, feature_layer=-1),
        dict(feature_layer=-1, post_layernorm=True, drop_class_token=False),
    ],
    ids=["ln-qknorm-fl-2", "rms-fl-1", "postln-full"],
)
def test_internvit_matches_transformers(single_rank, vision):
    from transformers import InternVLVisionModel

    cfg = _variant(**vision)
    hf = _hf_model(cfg)
    torch.manual_seed(0)
    ours = build_llava_model(cfg).eval()
    _load(ours, hf, cfg, only="vision_model.")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tower: InternVLVisionModel = hf.model.vision_tower
        out = tower(pixel_values=images, output_hidden_states=True)
        want = out.last_hidden_state if cfg.vision.feature_layer == -1 else None
        if want is None:
            want = out.hidden_states[cfg.vision.feature_layer]
        if cfg.vision.drop_class_token:
            want = want[:, 1:]
        got = ours.vision_model(images)
        assert (got - want).abs().max() < 1e-5
        if cfg.vision.drop_class_token:
            _load(ours, hf, cfg, only="vision_projection.")
            feats = hf.model.get_image_features(pixel_values=images).pooler_output
            assert (ours.encode_images(images) - feats).abs().max() < 1e-5


def test_whole_model_logits_match_transformers(single_rank):
    cfg = get_preset("debug-tiny-internvl")
    hf = _hf_model(cfg, seed=1)
    ours = build_llava_model(cfg).eval()
    _load(ours, hf, cfg)
    n_tok = ImageTokenCounter.from_config(cfg)()
    tiles = (5, 2)  # two images: a 2x2 grid + thumbnail, a 2x1 grid (no thumbnail at 1)
    ids = torch.randint(10, cfg.lm.vocab_size, (1, 12))
    ids[0, [2, 7]] = cfg.image_token_id
    images = torch.randn(sum(tiles), 3, 32, 32)
    hf_ids = []  # HF: one placeholder per image token
    img = 0
    for t in ids[0].tolist():
        if t == cfg.image_token_id:
            hf_ids += [t] * (n_tok * tiles[img])
            img += 1
        else:
            hf_ids.append(t)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([hf_ids]), pixel_values=images).logits
        got = ours(
            images,
            ids,
            num_images=torch.tensor([2]),
            num_tiles=torch.tensor(tiles),
            image_tokens=torch.tensor([n_tok * t for t in tiles]),
        )
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))
