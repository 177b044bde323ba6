"""Presets with the BLIP-2 / MiniGPT-4 Q-Former connector (``projector.type: qformer``).

* ``minigpt4``: MiniGPT-4-like: a ViT-g/14 at 224 px of EVA/CLIP shape (width 1408, 40 layers
  published, the last one dropped as BLIP-2 does, post-LayerNorm applied, class token kept:
  257 features), BLIP-2's Q-Former (32 queries, BERT-base width, 12 layers, cross-attention every
  second layer) and Vicuna-7B. Each image is 32 LM embeddings.
* ``debug-tiny-qformer``: ``debug-tiny`` with a 2-layer Q-Former of 8 queries (layer 0 cross-
  attends, layer 1 does not); runs on CPU in seconds.

What our ``VisionConfig`` expresses of EVA ViT-g: its shape (widths, layers, heads, patch,
resolution, eps 1e-6), the feature layer, the class token and the post-LayerNorm. What it does
not: EVA has no pre-LayerNorm, a patch conv with bias, no key bias, and exact GELU, while the
``clip`` style has a pre-LayerNorm, no conv bias and quick_gelu; so BLIP-2's own vision weights do
not load into it (the Q-Former's do: ``convert assemble --qformer-from``).
"""

from __future__ import annotations

from mm_megatron.config.model_config import (
    LanguageConfig,
    LlavaConfig,
    ProjectorConfig,
    VisionConfig,
)
from mm_megatron.config.presets import debug_tiny, register_preset, vicuna
from mm_megatron.config.qformer_config import QFormerConfig


def vit_g_224() -> VisionConfig:
    """ViT-g/14 at 224 px in BLIP-2's use: 39 of 40 layers, post-LN, class token kept."""
    return VisionConfig(
        style="clip",
        image_size=224,
        patch_size=14,
        num_layers=40,
        feature_layer=-2,
        hidden_size=1408,
        ffn_hidden_size=6144,
        num_attention_heads=16,
        layernorm_eps=1e-6,
        drop_class_token=False,
        post_layernorm=True,
    )


@register_preset("minigpt4")
def minigpt4() -> LlavaConfig:
    """MiniGPT-4-like: ViT-g/14 (EVA/CLIP shape) + BLIP-2 Q-Former (32 queries) + Vicuna-7B."""
    lm: LanguageConfig = vicuna(num_layers=32, hidden=4096, ffn=11008, heads=32)
    return LlavaConfig(
        vision=vit_g_224(),
        projector=ProjectorConfig(type="qformer", qformer=QFormerConfig()),
        lm=lm,
    )


@register_preset("debug-tiny-qformer")
def debug_tiny_qformer() -> LlavaConfig:
    """debug-tiny with a 2-layer, 8-query Q-Former connector (CPU, seconds)."""
    cfg = debug_tiny()
    cfg.projector = ProjectorConfig(
        type="qformer",
        qformer=QFormerConfig(
            num_query_tokens=8,
            hidden_size=32,
            num_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            cross_attention_frequency=2,
        ),
    )
    return cfg
