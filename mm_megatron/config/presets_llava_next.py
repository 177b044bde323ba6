"""Presets of the anyres LLaVA family: LLaVA-NeXT (v1.6), LLaVA-OneVision, and a CPU debug model.

Each preset states the model as llava-hf publishes it (``config.json`` of the named checkpoint);
``mm_megatron.model.anyres`` and ``mm_megatron.data.tiling_anyres`` implement the tiling. What
this file does not do: load weights (``mm-megatron convert``), or set the data pipeline's image
normalisation (``data.image_norm``: clip for LLaVA-NeXT, siglip for OneVision).
"""

from __future__ import annotations

from mm_megatron.config.model_config import (
    LanguageConfig,
    LlavaConfig,
    ProjectorConfig,
    TilingConfig,
    VisionConfig,
)
from mm_megatron.config.presets import clip_vit_l_336, debug_tiny, register_preset, vicuna

LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
"""``image_grid_pinpoints`` of llava-hf/llava-v1.6-vicuna-7b-hf (up to 2x2, 1x3, 3x1 tiles)."""

ONEVISION_PINPOINTS = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]
"""llava-hf/llava-onevision-qwen2-0.5b-ov-hf: every grid from 1x1 to 6x6 tiles of 384 px."""


@register_preset("llava-next-7b")
def llava_next_7b() -> LlavaConfig:
    """LLaVA-NeXT-7B (v1.6 Vicuna): CLIP-L/336 + MLP2x-GELU + Vicuna-7B, anyres up to 672x672."""
    return LlavaConfig(
        vision=clip_vit_l_336(),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        lm=vicuna(num_layers=32, hidden=4096, ffn=11008, heads=32),
        tiling=TilingConfig(type="anyres", grid_pinpoints=LLAVA_NEXT_PINPOINTS),
        image_token_id=32000,
    )


@register_preset("llava-onevision-0.5b")
def llava_onevision_05b() -> LlavaConfig:
    """LLaVA-OneVision-0.5B: SigLIP so400m/14 at 384 + MLP2x-GELU + Qwen2-0.5B, anyres_max_9;
    the images of a multi-image sample are one padded square tile each."""
    return LlavaConfig(
        vision=VisionConfig(
            style="siglip",
            image_size=384,
            patch_size=14,
            num_layers=26,  # HF drops SigLIP's last layer (vision_feature_layer=-1 of 26)
            feature_layer=-1,
            hidden_size=1152,
            ffn_hidden_size=4304,
            num_attention_heads=16,
            layernorm_eps=1e-6,
            post_layernorm=False,  # HF reads hidden_states[-1], before the post-LayerNorm
        ),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        lm=LanguageConfig(
            flavor="qwen2",
            num_layers=24,
            hidden_size=896,
            ffn_hidden_size=4864,
            num_attention_heads=14,
            num_query_groups=2,
            vocab_size=152000,
            make_vocab_size_divisible_by=128,
            max_position_embeddings=32768,
            rope_theta=1e6,
            qkv_bias=True,
            tie_embeddings=True,
            norm_eps=1e-6,
        ),
        tiling=TilingConfig(
            type="anyres",
            grid_pinpoints=ONEVISION_PINPOINTS,
            max_grid_patches=9,
            multi_image_single_tile=True,  # several images in a sample: one tile each
        ),
        image_token_id=151646,
    )


@register_preset("debug-tiny-anyres")
def debug_tiny_anyres() -> LlavaConfig:
    """debug-tiny with anyres tiling (64 px tiles, grids up to 2x2): runs on CPU in seconds."""
    cfg = debug_tiny()
    cfg.tiling = TilingConfig(type="anyres", grid_pinpoints=[[64, 128], [128, 64], [128, 128]])
    return cfg
