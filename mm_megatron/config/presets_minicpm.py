"""MiniCPM-V presets: a SigLIP encoder, the Perceiver resampler (``projector.type=resampler``),
a Qwen2 language model, and MiniCPM-V's ``slice_image`` tiling.

``minicpm-v-2.6`` has MiniCPM-V 2.6's shapes (SigLIP-400M/14 with its last layer dropped,
resampler 64 x 3584 with 28 heads, Qwen2-7B with MiniCPM-V's 151666-token vocab); the encoder
sees every slice at 448 x 448 (32 x 32 patches). ``debug-tiny-resampler`` is ``debug-tiny``
with the resampler: it trains on CPU in seconds.

What it does not do: build models or convert checkpoints (no transformers class exists for
MiniCPM-V; its weights are loaded nowhere here).
"""

from __future__ import annotations

from mm_megatron.config.model_config import (
    LanguageConfig,
    LlavaConfig,
    ProjectorConfig,
    TilingConfig,
    VisionConfig,
)
from mm_megatron.config.presets import debug_tiny, register_preset
from mm_megatron.config.resampler_config import ResamplerConfig


@register_preset("minicpm-v-2.6")
def minicpm_v_26() -> LlavaConfig:
    """MiniCPM-V-2.6-like: SigLIP-400M/14 at 448 (26 layers) + resampler 64 + Qwen2-7B."""
    return LlavaConfig(
        vision=VisionConfig(
            style="siglip",
            image_size=448,
            patch_size=14,
            num_layers=27,
            feature_layer=-2,  # MiniCPM-V drops SigLIP's last layer
            hidden_size=1152,
            ffn_hidden_size=4304,
            num_attention_heads=16,
            layernorm_eps=1e-6,
            post_layernorm=True,
        ),
        projector=ProjectorConfig(
            type="resampler", resampler=ResamplerConfig(num_queries=64, num_heads=28)
        ),
        lm=LanguageConfig(
            flavor="qwen2",
            num_layers=28,
            hidden_size=3584,
            ffn_hidden_size=18944,
            num_attention_heads=28,
            num_query_groups=4,
            vocab_size=151666,
            make_vocab_size_divisible_by=128,
            max_position_embeddings=32768,
            rope_theta=1e6,
            qkv_bias=True,
            norm_eps=1e-6,
        ),
        tiling=TilingConfig(type="minicpm_slice", max_slice_nums=9, scale_resolution=448),
        image_token_id=151646,  # first id after Qwen2's 151646 base tokens: match your tokenizer
    )


@register_preset("debug-tiny-resampler")
def debug_tiny_resampler() -> LlavaConfig:
    """debug-tiny with MiniCPM-V's resampler (16 queries) and slices (64 px: source + 1 x 2)."""
    cfg = debug_tiny()
    cfg.projector = ProjectorConfig(
        type="resampler", resampler=ResamplerConfig(num_queries=16, num_heads=4)
    )
    # 64 x 64 images at a 48 px scale resolution: 1.8 slices' worth -> a 1 x 2 grid + source
    cfg.tiling = TilingConfig(
        type="minicpm_slice", max_slice_nums=4, scale_resolution=48, slice_patch_size=16
    )
    return cfg
