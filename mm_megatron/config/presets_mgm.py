"""MGM (Mini-Gemini) presets: CLIP-L/14 at 336 + ConvNeXt-L at 768 (HD: 1536), patch-info mining.

``mgm-7b`` / ``mgm-7b-hd`` follow MGM's published 7B models (Vicuna-7B, CLIP ViT-L/14-336 with
``mm_vision_select_layer=-2``, open_clip ConvNeXt-L (``convnext_large_d_320``: depths 3, 3, 27, 3,
dims 192, 384, 768, 1536), ``mlp2x_gelu``). Stage 1 (these presets): both towers frozen, the
mining and the projector trained (the mining freezes with the projector: ``freeze_projector``),
the LM frozen; stage 2 sets ``model.freeze_lm=false``. ``debug-tiny-mgm`` and
``debug-tiny-mgm-hd`` are the same structure with widths of 16-64, for CPU tests.

What this file does not do: build anything, or load MGM's open_clip/HF checkpoints.
"""

from __future__ import annotations

from mm_megatron.config.hires_config import HighResConfig
from mm_megatron.config.model_config import (
    LlavaConfig,
    ProjectorConfig,
    VisionConfig,
)
from mm_megatron.config.presets import clip_vit_l_336, debug_lm, register_preset, vicuna


def _mgm_7b(hires: HighResConfig) -> LlavaConfig:
    vision = clip_vit_l_336()
    vision.style = "mgm"
    vision.hires = hires
    return LlavaConfig(
        vision=vision,
        projector=ProjectorConfig(type="mlp2x_gelu"),
        lm=vicuna(num_layers=32, hidden=4096, ffn=11008, heads=32),
        freeze_vision=True,
        freeze_projector=False,
        freeze_lm=True,
    )


@register_preset("mgm-7b")
def mgm_7b() -> LlavaConfig:
    """MGM-7B: CLIP-L/336 (576 tokens) mined from ConvNeXt-L at 768 + MLP2x + Vicuna-7B."""
    return _mgm_7b(HighResConfig(type="convnext", image_size=768))


@register_preset("mgm-7b-hd")
def mgm_7b_hd() -> LlavaConfig:
    """MGM-7B-HD: 2x2 CLIP-L/336 crops + global image (5 x 576 tokens), ConvNeXt-L at 1536."""
    return _mgm_7b(HighResConfig(type="convnext", image_size=1536, grid=2, global_image=True))


def _debug_tiny_mgm(hires: HighResConfig) -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(
            style="mgm",
            image_size=32,
            patch_size=8,
            num_layers=3,
            feature_layer=-2,
            hidden_size=64,
            ffn_hidden_size=128,
            num_attention_heads=4,
            hires=hires,
        ),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        lm=debug_lm(),
        image_token_id=4,
        freeze_vision=False,
        init_method_std=0.08,  # as debug-tiny: widths of 64 need a wider init than 0.02
    )


@register_preset("debug-tiny-mgm")
def debug_tiny_mgm() -> LlavaConfig:
    """MGM in miniature: 64 px in, a 32 px CLIP (16 tokens) mined from a 2-stage ConvNeXt (4x4
    features per token)."""
    return _debug_tiny_mgm(
        HighResConfig(type="convnext", image_size=64, depths=[1, 1], dims=[16, 32])
    )


@register_preset("debug-tiny-mgm-hd")
def debug_tiny_mgm_hd() -> LlavaConfig:
    """MGM-HD in miniature: 128 px in, 2x2 crops + global of a 32 px CLIP (5 x 16 tokens)."""
    return _debug_tiny_mgm(
        HighResConfig(
            type="convnext",
            image_size=128,
            depths=[1, 1],
            dims=[16, 32],
            grid=2,
            global_image=True,
        )
    )
