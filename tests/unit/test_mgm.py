"""MGM dual encoder: the ConvNeXt against transformers, the mining against a plain reference written
from MGM's description, the HD crop/global arrangement, token count, FLOPs from the modules, and
one forward/backward of the whole model on CPU with the two-stage freezing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mm_megatron.config import get_preset
from mm_megatron.config.hires_config import HighResConfig
from mm_megatron.model.convnext import ConvNeXt
from mm_megatron.model.mgm import MGMDualEncoder, PatchInfoMining

TINY = HighResConfig(type="convnext", image_size=64, depths=[2, 1, 1], dims=[8, 16, 24])


def test_convnext_matches_transformers():
    from transformers import ConvNextConfig, ConvNextModel

    torch.manual_seed(0)
    hf = ConvNextModel(
        ConvNextConfig(
            num_channels=3,
            num_stages=len(TINY.dims),
            patch_size=4,
            depths=TINY.depths,
            hidden_sizes=TINY.dims,
            layer_scale_init_value=0.5,  # not 1e-6: the blocks must matter in the comparison
        )
    ).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    ours = ConvNeXt(dataclasses.replace(TINY, layer_scale_init=0.5))
    sd = {k: v for k, v in hf.state_dict().items() if not k.startswith("layernorm.")}
    ours.load_state_dict(sd, strict=True)  # same parameter names
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = hf(x, output_hidden_states=True).hidden_states[-len(TINY.dims) :]
        got = ours(x)
        feats = ours.multi_stage_features(x)
    assert [tuple(g.shape) for g in got] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 24, 4, 4)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # MGM: every stage upsampled bilinearly to the first stage's map, concatenated on channels
    assert feats.shape == (2, 48, 16, 16)
    up = F.interpolate(want[2], size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(feats[:, 24:], up, atol=1e-5, rtol=1e-5)


def reference_mining(mining: PatchInfoMining, x, aux):
    """MGM's token attention, one token at a time: query = LN-Linear(token); keys and values =
    LN-Linear of the p x p map features of the token's own cell; softmax(q k / sqrt(C)) v added
    to the token."""
    n, t, c = x.shape
    g = int(t**0.5)
    p = aux.shape[-1] // g
    out = x.clone()
    for b in range(n):
        for i in range(g):
            for j in range(g):
                cell = aux[b, :, i * p : (i + 1) * p, j * p : (j + 1) * p]  # [C_aux, p, p]
                feats = cell.reshape(cell.shape[0], -1).T  # [p^2, C_aux]
                q = mining.query(x[b, i * g + j])  # [C]
                k, v = mining.key(feats), mining.value(feats)  # [p^2, C]
                w = torch.softmax(k @ q / c**0.5, dim=0)  # [p^2]
                out[b, i * g + j] = x[b, i * g + j] + w @ v
    return out


def test_mining_matches_reference():
    torch.manual_seed(0)
    mining = PatchInfoMining(16, 24, 1e-5, torch.float32, init_std=0.3)
    x, aux = torch.randn(2, 9, 16), torch.randn(2, 24, 12, 12)  # 3x3 tokens, 4x4 per token
    with torch.no_grad():
        torch.testing.assert_close(mining(x, aux), reference_mining(mining, x, aux))
    with pytest.raises(ValueError, match="square token grid"):
        mining(torch.randn(1, 8, 16), aux[:1])


def _encoder(preset: str) -> MGMDualEncoder:
    from mm_megatron.model.build import build_llava_model

    return build_llava_model(get_preset(preset)).vision_model


def test_hd_arrangement_matches_mgm(single_rank):
    """MGM-HD: crops row-major + a global image into the ViT; the crops mine their quadrant of the
    map, the global image the map downsampled by the grid; output tokens global first."""
    torch.manual_seed(0)
    enc = _encoder("debug-tiny-mgm-hd").eval()
    vcfg, hcfg = enc.vcfg, enc.hcfg
    images = torch.randn(2, 3, hcfg.image_size, hcfg.image_size)
    with torch.no_grad():
        got = enc(images)
        r = vcfg.image_size
        lr = F.interpolate(images, size=(2 * r, 2 * r), mode="bilinear", align_corners=False)
        crops = [lr[:, :, a * r : (a + 1) * r, b * r : (b + 1) * r] for a in (0, 1) for b in (0, 1)]
        glob = F.interpolate(lr, size=(r, r), mode="bilinear", align_corners=False)
        aux = enc.hires.multi_stage_features(images)
        s = aux.shape[-1] // 2
        quads = [
            aux[:, :, a * s : (a + 1) * s, b * s : (b + 1) * s] for a in (0, 1) for b in (0, 1)
        ]
        small = F.interpolate(aux, scale_factor=0.5, mode="bilinear", align_corners=False)
        want = [reference_mining(enc.mining, enc.vit(glob), small)]
        want += [reference_mining(enc.mining, enc.vit(c), q) for c, q in zip(crops, quads)]
    t = enc.vit.vcfg.num_output_tokens
    assert got.shape == (2, 5 * t, vcfg.hidden_size) and vcfg.num_output_tokens == 5 * t
    torch.testing.assert_close(got, torch.cat(want, dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["debug-tiny-mgm", "debug-tiny-mgm-hd"])
def test_token_count_and_flops_from_the_modules(single_rank, preset):
    from mm_megatron.model.flops import projector_forward_flops, vision_forward_flops
    from mm_megatron.model.image_tokens import image_token_count

    cfg = get_preset(preset)
    v, h = cfg.vision, cfg.vision.hires
    t = (v.image_size // v.patch_size) ** 2  # class token dropped
    assert image_token_count(cfg) == (h.grid**2 + (1 if h.global_image else 0)) * t
    enc = _encoder(preset).eval()
    images = torch.randn(3, 3, v.input_image_size, v.input_image_size)
    with torch.no_grad():
        assert enc(images).shape == (3, image_token_count(cfg), v.hidden_size)
        with FlopCounterMode(display=False) as towers:
            enc.vit(enc.low_res_images(images))
            enc.hires.multi_stage_features(images)
        with FlopCounterMode(display=False) as all_:
            enc(images)
    # torch's counter skips the CPU SDPA kernel: add the attention terms of the formulas
    # (ViT: 4 p^2 h per layer and image; mining: 4 S^2 C per image's map)
    p, layers = t + 1, v.num_layers_built
    vit_attn = 4 * p * p * v.hidden_size * layers * 3 * h.low_res_images
    assert towers.get_total_flops() + vit_attn == vision_forward_flops(cfg, 3)
    side = h.map_size()
    pixels = side**2 + ((side // h.grid) ** 2 if h.global_image else 0)
    mining = all_.get_total_flops() - towers.get_total_flops() + 4 * pixels * v.hidden_size * 3
    mlp = 3 * 2 * image_token_count(cfg) * (v.hidden_size + cfg.lm.hidden_size) * cfg.lm.hidden_size
    assert mining == MGMDualEncoder.connector_forward_flops(v, 3)
    assert projector_forward_flops(cfg, 3) == mlp + mining


def test_bad_geometry_is_one_line():
    cfg = get_preset("debug-tiny-mgm")
    cfg.vision.hires.image_size = 72  # 18x18 map, 4x4 token grid
    with pytest.raises(ValueError, match=r"^vision\.hires\.image_size=72 .*multiple of"):
        cfg.validate()
    cfg = get_preset("debug-tiny")
    cfg.vision.hires = HighResConfig(type="convnext", image_size=64, depths=[1], dims=[8])
    from mm_megatron.model.vision import VisionEncoder

    with pytest.raises(ValueError, match="needs a dual-encoder vision.style"):
        VisionEncoder.build(None, cfg.vision, None)
    cfg = get_preset("debug-tiny-mgm")
    cfg.vision.hires.type = "none"  # the dual encoder without its second tower: at validation
    with pytest.raises(ValueError, match=r"^vision\.style='mgm' with vision\.hires\.type='none'"):
        cfg.validate()


@pytest.mark.parametrize("preset", ["debug-tiny-mgm", "debug-tiny-mgm-hd"])
def test_forward_backward_and_two_stage_freezing(single_rank, preset):
    from mm_megatron.model.build import build_llava_model

    torch.manual_seed(0)
    cfg = get_preset(preset)
    size = cfg.vision.input_image_size
    ids = torch.tensor([[1, 4, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6]])
    labels = torch.tensor([[-100, -100, 7, 8, 9, 10], [-100, -100, -100, -100, 5, 6]])
    images = torch.randn(2, 3, size, size)

    for stage, (fv, fp, fl) in {1: (True, False, True), 2: (True, False, False)}.items():
        cfg.freeze_vision, cfg.freeze_projector, cfg.freeze_lm = fv, fp, fl
        model = build_llava_model(cfg)
        loss, mask = model(images, ids, labels=labels)
        assert torch.isfinite(loss).all() and mask.sum() == 6
        (loss * mask).sum().backward()
        enc = model.vision_model
        trained = {n for n, p in model.named_parameters() if p.grad is not None}
        # stage 1 trains the connector (mining + MLP); stage 2 adds the LM; towers stay frozen
        assert all(f"vision_model.mining.{n}" in trained for n, _ in enc.mining.named_parameters())
        assert any(n.startswith("vision_projection.") for n in trained)
        assert not any(n.startswith(("vision_model.vit.", "vision_model.hires.")) for n in trained)
        assert any(n.startswith("language_model.decoder.") for n in trained) == (stage == 2)
    # trained from scratch (debug presets): every parameter of both towers gets a gradient
    cfg.freeze_vision = False
    model = build_llava_model(cfg)
    loss, mask = model(images, ids, labels=labels)
    (loss * mask).sum().backward()
    missing = [n for n, p in model.vision_model.named_parameters() if p.grad is None]
    assert not missing


def hand_convnext_l(side: int) -> int:
    """ConvNeXt-L (depths 3, 3, 27, 3; dims 192, 384, 768, 1536) forward FLOPs at ``side`` px."""
    dims, depths = [192, 384, 768, 1536], [3, 3, 27, 3]
    s = side // 4
    total = 2 * 3 * 16 * 192 * s * s  # stem 4x4
    for i, (c, d) in enumerate(zip(dims, depths)):
        if i:
            s //= 2
            total += 2 * dims[i - 1] * 4 * c * s * s  # 2x2 stride-2 downsampling
        total += d * s * s * (2 * 49 * c + 2 * 2 * 4 * c * c)  # dwconv 7x7, fc1, fc2
    return total


def test_planner_counts_both_towers_and_the_mining():
    from mm_megatron.bench.memory import Workload, projector_elements
    from mm_megatron.bench.planner import vision_cost_in_layers
    from mm_megatron.config import ParallelConfig
    from mm_megatron.model.flops import forward_flops
    from mm_megatron.model.vision import VisionEncoder

    clip = get_preset("llava-1.5-7b")
    for name, side, crops, pixels in [
        ("mgm-7b", 768, 1, 192 * 192),
        ("mgm-7b-hd", 1536, 5, 384 * 384 + 192 * 192),
    ]:
        cfg = get_preset(name)
        f, c = forward_flops(cfg, [1000], 2), forward_flops(clip, [1000], 2)
        vit = VisionEncoder.forward_flops(clip.vision, 2 * crops)
        assert f.vision == vit + 2 * hand_convnext_l(side)
        mlp = crops * c.projector  # same MLP, ``crops`` x 576 tokens
        mining = 2 * (2 * crops * 576 * 1024**2 + pixels * (4 * 2880 * 1024 + 4 * 1024))
        assert f.projector == mlp + mining
        assert f.lm == c.lm
        w = Workload(seq=1000)
        saved = pixels * (3 * 2880 + 2 * 1024 + 1) + crops * 576 * 4 * 1024
        par = ParallelConfig()
        assert projector_elements(cfg, par, w) == crops * projector_elements(clip, par, w) + saved
        assert vision_cost_in_layers(cfg, w) > vision_cost_in_layers(clip, w)
