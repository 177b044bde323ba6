"""Model FLOPs per step (`mm_megatron.model.flops`) against hand computations.

debug-tiny, ref-1.4b and llava-1.5-7b are worked out below from the rules in
architecture.md ("FLOPs for MFU"); every constant is the arithmetic in its comment.
"""

from __future__ import annotations

import pytest

from mm_megatron.config import get_preset
from mm_megatron.model.flops import (
    format_sample_flops,
    lm_forward_flops,
    projector_forward_flops,
    train_step_flops,
    training_multipliers,
    vision_forward_flops,
)
from mm_megatron.model.image_tokens import image_token_count

# --- debug-tiny --------------------------------------------------------------------------------
# LM: L=2, h=64, ffn=176, 4 heads, 2 KV groups, head dim 16, vocab 512 (a multiple of 32).
#   QKV 64 * (4 + 2*2) * 16 = 8192; out proj 4*16*64 = 4096; SwiGLU 3*64*176 = 33792
#   per layer 46080; 2 layers 92160; output layer 64*512 = 32768; N = 124928
# Two sequences of 30 and 50 real tokens:
#   matmuls 2 * 124928 * 80 = 19_988_480; causal attention 2 * L * 64 * (30^2 + 50^2)
#   = 256 * 3400 = 870_400  -> 20_858_880
LM_FWD = 20_858_880
# ViT: 64 px / 16 -> 16 patches + class token = 17 positions, h=64, ffn=128, 3 layers with
# feature_layer=-2 -> 2 built.
#   patch conv 2 * (3*16*16*64) * 16 = 1_572_864
#   per layer 2*17*(4*64^2 + 2*64*128) + 4*17^2*64 = 1_114_112 + 73_984 = 1_188_096
#   per image 1_572_864 + 2 * 1_188_096 = 3_949_056; 3 images -> 11_847_168
VIT_FWD = 11_847_168
# Projector mlp2x_gelu 64 -> 64 -> 64: 8192 weights, 16 tokens per image, 3 images:
#   2 * 8192 * 16 * 3 = 786_432
PROJ_FWD = 786_432

# --- ref-1.4b, one sample of 1 image (576 tokens) + 448 text tokens = 1024 -------------------
# LM: L16, h2048, ffn 8192, 32 heads / 8 groups, d 64, vocab 32064 (= 501 * 64, no padding).
#   QKV 2048*(32+16)*64 = 6_291_456; out 32*64*2048 = 4_194_304; SwiGLU 3*2048*8192 = 50_331_648
#   per layer 60_817_408; x16 = 973_078_528; output 2048*32064 = 65_667_072; N = 1_038_745_600
#   matmuls 2 * N * 1024 = 2_127_350_988_800; attention 2 * 16 * 2048 * 1024^2 = 68_719_476_736
REF_LM = 2_127_350_988_800 + 68_719_476_736
# ViT CLIP-L/336, 23 layers built: 576 patches + class = 577 positions, h 1024, ffn 4096.
#   patch conv 2 * (3*14*14*1024) * 576 = 693_633_024
#   per layer 2*577*(4*1024^2 + 2*1024*4096) = 14_520_680_448, + 4*577^2*1024 = 1_363_677_184
#   -> 15_884_357_632; x23 = 365_340_225_536; per image 366_033_858_560
REF_VIT = 366_033_858_560
# Projector 1024 -> 2048 -> 2048: 2_097_152 + 4_194_304 = 6_291_456 weights; x2 x576 tokens
REF_PROJ = 7_247_757_312

# --- llava-1.5-7b, same sample -----------------------------------------------------------------
# LM: L32, h4096, ffn 11008, 32 heads (MHA), d 128, vocab 32064.
#   QKV 4096*96*128 = 50_331_648; out 16_777_216; SwiGLU 3*4096*11008 = 135_266_304
#   per layer 202_375_168; x32 = 6_476_005_376; output 4096*32064 = 131_334_144
#   N = 6_607_339_520; matmuls 2*N*1024 = 13_531_831_336_960; attention 2*32*4096*1024^2
#   = 274_877_906_944
L7_LM = 13_531_831_336_960 + 274_877_906_944
# Projector 1024 -> 4096 -> 4096: 4_194_304 + 16_777_216 = 20_971_520; x2 x576
L7_PROJ = 24_159_191_040


def test_debug_tiny_forward_matches_hand_computation():
    cfg = get_preset("debug-tiny")
    assert lm_forward_flops(cfg, [30, 50]) == LM_FWD
    assert vision_forward_flops(cfg, 3) == VIT_FWD
    assert projector_forward_flops(cfg, 3) == PROJ_FWD


@pytest.mark.parametrize(
    "preset,lm,vit,proj",
    [("ref-1.4b", REF_LM, REF_VIT, REF_PROJ), ("llava-1.5-7b", L7_LM, REF_VIT, L7_PROJ)],
)
def test_reference_presets_match_hand_computation(preset, lm, vit, proj):
    cfg = get_preset(preset)
    assert image_token_count(cfg) == 576
    assert lm_forward_flops(cfg, [1024]) == lm
    assert vision_forward_flops(cfg, 1) == vit
    assert projector_forward_flops(cfg, 1) == proj
    # stage 2 (ViT frozen at the front): 1x ViT, 3x projector, 3x LM
    f = train_step_flops(cfg, [1024], 1)
    assert (f.vision, f.projector, f.lm) == (vit, 3 * proj, 3 * lm)
    # stage 1 (only the projector trains): the LM passes input gradients back to it (2x)
    cfg.freeze_lm = True
    f = train_step_flops(cfg, [1024], 1)
    assert (f.vision, f.projector, f.lm) == (vit, 3 * proj, 2 * lm)


def test_everything_trained_is_three_forwards():
    cfg = get_preset("debug-tiny")  # nothing frozen
    assert training_multipliers(cfg) == (3, 3, 3)
    f = train_step_flops(cfg, [30, 50], 3)
    assert f.total == 3 * (LM_FWD + VIT_FWD + PROJ_FWD) == 100_477_440


@pytest.mark.parametrize(
    "frozen,expected",
    [
        ((True, False, True), (1, 3, 2)),  # stage 1
        ((True, True, False), (1, 1, 3)),  # LM only: nothing before it needs gradients
        ((False, True, True), (3, 2, 2)),  # ViT only: everything after it passes gradients
        ((True, False, False), (1, 3, 3)),  # stage 2
    ],
)
def test_multipliers(frozen, expected):
    cfg = get_preset("debug-tiny")
    cfg.freeze_vision, cfg.freeze_projector, cfg.freeze_lm = frozen
    assert training_multipliers(cfg) == expected


def test_packed_subsequences_and_padding():
    cfg = get_preset("debug-tiny")
    f = train_step_flops(cfg, [30, 50], 3, training=False)
    assert f.total == LM_FWD + VIT_FWD + PROJ_FWD
    # one 80-token sequence attends over 80^2, two packed ones over 30^2 + 50^2 only
    assert lm_forward_flops(cfg, [80]) - LM_FWD == 256 * (80**2 - 3400)


def test_projectors_state_their_own_count():
    cfg = get_preset("minimind-v")  # linear 768 -> 512, 196 tokens per image
    assert projector_forward_flops(cfg, 2) == 2 * 768 * 512 * 196 * 2
    cfg = get_preset("debug-tiny")  # 4x4 patch grid of width 64 -> 2x2 pooled, LM width 64
    cfg.projector.type = "mlp2x_gelu_pool2"
    assert projector_forward_flops(cfg, 3) == 2 * (64 * 64 + 64 * 64) * 4 * 3
    cfg.projector.type = "no-such-connector"
    with pytest.raises(ValueError, match="projector.type='no-such-connector'; choose one of"):
        projector_forward_flops(cfg, 1)


def test_model_flops_table():
    out = format_sample_flops(get_preset("ref-1.4b"), 1, 448, "ref-1.4b")
    assert "sequence 1024" in out and "frozen: vision" in out
    assert f"{REF_VIT:.4e}" in out and f"{3 * REF_LM:.4e}" in out
