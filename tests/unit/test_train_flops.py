"""Model FLOPs per step, checked against a hand computation for debug-tiny."""

from __future__ import annotations

import pytest

from mm_megatron.config import get_preset
from mm_megatron.train.flops import (
    lm_forward_flops,
    projector_forward_flops,
    train_step_flops,
    training_multipliers,
    vit_forward_flops,
)

# debug-tiny by hand. LM: L=2, h=64, ffn=176, 4 heads, 2 KV groups, head dim 16, vocab 512
# (already a multiple of 32).
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


def test_forward_flops_match_hand_computation():
    cfg = get_preset("debug-tiny")
    assert lm_forward_flops(cfg.lm, [30, 50]) == LM_FWD
    assert vit_forward_flops(cfg.vision, 3) == VIT_FWD
    assert projector_forward_flops(cfg, 3) == PROJ_FWD


def test_everything_trained_is_three_forwards():
    cfg = get_preset("debug-tiny")  # nothing frozen
    assert training_multipliers(cfg) == (3, 3, 3)
    f = train_step_flops(cfg, [30, 50], 3)
    assert f.total == 3 * (LM_FWD + VIT_FWD + PROJ_FWD) == 100_477_440


def test_stage1_counts_frozen_parts_correctly():
    cfg = get_preset("debug-tiny")
    cfg.freeze_vision, cfg.freeze_projector, cfg.freeze_lm = True, False, True
    # ViT frozen at the front: forward only (1x). Projector trained: 3x. LM frozen but the
    # projector's gradient flows through it: forward + input-gradient backward (2x).
    assert training_multipliers(cfg) == (1, 3, 2)
    f = train_step_flops(cfg, [30, 50], 3)
    assert (f.vision, f.projector, f.lm) == (VIT_FWD, 3 * PROJ_FWD, 2 * LM_FWD)
    assert f.total == 55_924_224


@pytest.mark.parametrize(
    "frozen,expected",
    [
        ((True, True, False), (1, 1, 3)),  # LM only: nothing before it needs gradients
        ((False, True, True), (3, 2, 2)),  # ViT only: everything after it passes gradients
        ((True, False, False), (1, 3, 3)),  # stage 2
    ],
)
def test_multipliers(frozen, expected):
    cfg = get_preset("debug-tiny")
    cfg.freeze_vision, cfg.freeze_projector, cfg.freeze_lm = frozen
    assert training_multipliers(cfg) == expected


def test_padding_does_not_count_and_eval_is_one_forward():
    cfg = get_preset("debug-tiny")
    f = train_step_flops(cfg, [30, 50], 3, training=False)
    assert f.total == LM_FWD + VIT_FWD + PROJ_FWD
    # the LM term depends on real lengths only: one 80-token sequence costs more attention
    assert lm_forward_flops(cfg.lm, [80]) - LM_FWD == 256 * (80**2 - 3400)


def test_linear_projector_and_unknown_type():
    cfg = get_preset("minimind-v")  # linear 768 -> 512, 196 tokens per image
    assert projector_forward_flops(cfg, 2) == 2 * 768 * 512 * 196 * 2
    cfg.projector.type = "resampler"
    with pytest.raises(ValueError, match="unknown projector.type 'resampler'; registered"):
        projector_forward_flops(cfg, 1)


def test_pooled_projector_counts_its_own_tokens():
    cfg = get_preset("debug-tiny")  # 4x4 patch grid of width 64 -> 2x2 pooled, LM width 64
    cfg.projector.type = "mlp2x_gelu_pool2"
    assert projector_forward_flops(cfg, 3) == 2 * (64 * 64 + 64 * 64) * 4 * 3
