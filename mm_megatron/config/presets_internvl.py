"""InternVL presets: InternViT + pixel shuffle 0.5 + LayerNorm/MLP + a Llama-class LM, tiled.

Language models: this project's GPT spec is a pre-RMSNorm SwiGLU decoder with RoPE and GQA, which
expresses InternLM2/2.5 (InternVL2-2B, InternVL2.5-8B; their fused ``wqkv`` is a converter
concern, transformers' InternVL checkpoints already store them as Llama ``q/k/v_proj``), Qwen2
(QKV bias; InternVL2-1B/InternVL2.5-1B..4B) and Llama. Not expressible: InternLM2.5's *dynamic*
NTK RoPE scaling (``rope_scaling: {type: dynamic}``) — the 8B preset uses plain RoPE, which is
exact up to its 32k positions; Phi-3 (InternVL2-4B) needs fused ``qkv``/``gate_up`` handling in the
converter only, and is not preset here.

What it does not do: register the encoder, projector or tiler (their modules do).
"""

from __future__ import annotations

import dataclasses

from mm_megatron.config.model_config import (
    LanguageConfig,
    LlavaConfig,
    ProjectorConfig,
    TilingConfig,
    VisionConfig,
)
from mm_megatron.config.presets import debug_lm, register_preset

INTERNLM2_VOCAB = 92553
"""InternLM2's vocabulary."""
INTERNLM2_IMG_CONTEXT = 92546
"""InternVL's ``<IMG_CONTEXT>`` token id in the InternLM2 tokenizer."""
INTERNVL_MARKERS = "<img> </img>"
"""Text InternVL puts before and after each image's tokens (``model.tiling.image_markers``)."""


def internvit_300m_448() -> VisionConfig:
    """InternViT-300M-448px (and its V2.5): 24 layers, h1024, 16 heads, layer scale, LN."""
    return VisionConfig(
        style="internvit",
        image_size=448,
        patch_size=14,
        num_layers=24,
        feature_layer=-1,
        hidden_size=1024,
        ffn_hidden_size=4096,
        num_attention_heads=16,
        layernorm_eps=1e-6,
        drop_class_token=True,
        post_layernorm=False,
        norm="LayerNorm",
        activation="gelu",
        qkv_bias=True,
        qk_norm=False,
        layer_scale_init=0.1,
    )


def internlm2(num_layers: int, hidden: int, ffn: int, heads: int, groups: int) -> LanguageConfig:
    """InternLM2/2.5 chat models (Llama architecture, 92553 vocab, RoPE base 1e6)."""
    return LanguageConfig(
        flavor="llama",
        num_layers=num_layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=groups,
        vocab_size=INTERNLM2_VOCAB,
        max_position_embeddings=32768,
        rope_theta=1e6,
        norm_eps=1e-5,
    )


@register_preset("internvl2-2b")
def internvl2_2b() -> LlavaConfig:
    """InternVL2-2B-like: InternViT-300M-448px + pixel shuffle 0.5 + InternLM2-1.8B, 12 tiles."""
    return LlavaConfig(
        vision=internvit_300m_448(),
        projector=ProjectorConfig(type="pixel_shuffle_mlp", pixel_shuffle_ratio=0.5),
        lm=internlm2(num_layers=24, hidden=2048, ffn=8192, heads=16, groups=8),
        tiling=TilingConfig(
            type="internvl_dynamic", min_patches=1, max_patches=12, image_markers=INTERNVL_MARKERS
        ),
        image_token_id=INTERNLM2_IMG_CONTEXT,
    )


@register_preset("internvl2.5-8b")
def internvl25_8b() -> LlavaConfig:
    """InternVL2.5-8B-like: InternViT-300M-448px-V2.5 + pixel shuffle 0.5 + InternLM2.5-7B."""
    return LlavaConfig(
        vision=internvit_300m_448(),
        projector=ProjectorConfig(type="pixel_shuffle_mlp", pixel_shuffle_ratio=0.5),
        lm=internlm2(num_layers=32, hidden=4096, ffn=14336, heads=32, groups=8),
        tiling=TilingConfig(
            type="internvl_dynamic", min_patches=1, max_patches=12, image_markers=INTERNVL_MARKERS
        ),
        image_token_id=INTERNLM2_IMG_CONTEXT,
    )


@register_preset("debug-tiny-internvl")
def debug_tiny_internvl() -> LlavaConfig:
    """InternVL in miniature for CPU: 32 px tiles of 16 patches -> 4 tokens, up to 4 tiles + thumb.

    The encoder uses every InternViT option (layer scale, full-width QK norm, class token dropped,
    feature layer -2) so that the layout tests cover them; the LM is Qwen2-like (QKV bias).
    """
    return LlavaConfig(
        vision=VisionConfig(
            style="internvit",
            image_size=32,
            patch_size=8,
            num_layers=3,
            feature_layer=-2,
            hidden_size=64,
            ffn_hidden_size=128,
            num_attention_heads=4,
            layernorm_eps=1e-6,
            post_layernorm=False,
            norm="LayerNorm",
            activation="gelu",
            qkv_bias=True,
            qk_norm=True,
            layer_scale_init=0.1,
        ),
        projector=ProjectorConfig(type="pixel_shuffle_mlp", pixel_shuffle_ratio=0.5),
        lm=dataclasses.replace(  # a Qwen2-style debug LM: qkv bias, RoPE base 1e6
            debug_lm(), flavor="qwen2", max_position_embeddings=1024, rope_theta=1e6, qkv_bias=True
        ),
        tiling=TilingConfig(
            type="internvl_dynamic", min_patches=1, max_patches=4, image_markers=INTERNVL_MARKERS
        ),
        image_token_id=4,
        freeze_vision=False,
        init_method_std=0.08,
    )
