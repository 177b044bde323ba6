"""Preset registry: name -> function returning a fresh :class:`LlavaConfig`.

Add a preset by decorating a zero-argument function with ``@register_preset("name")``; nothing
else needs to change (the CLI, YAML loading and tests iterate the registry). YAML files in
``examples/`` name a preset and override fields on top of it.
"""

from __future__ import annotations

from collections.abc import Callable

from mm_megatron.config.model_config import (
    LanguageConfig,
    LlavaConfig,
    ProjectorConfig,
    VisionConfig,
)

PresetFn = Callable[[], LlavaConfig]
PRESETS: dict[str, tuple[PresetFn, str]] = {}


def register_preset(name: str, description: str = "") -> Callable[[PresetFn], PresetFn]:
    """Decorator registering ``fn`` as preset ``name``."""

    def deco(fn: PresetFn) -> PresetFn:
        if name in PRESETS:
            raise ValueError(f"preset {name!r} registered twice")
        PRESETS[name] = (fn, description or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


def get_preset(name: str) -> LlavaConfig:
    """A fresh config for preset ``name`` (KeyError lists the known names)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[name][0]()
    cfg.validate()
    return cfg


def list_presets() -> dict[str, str]:
    """name -> one-line description."""
    return {k: v[1] for k, v in sorted(PRESETS.items())}


# --- building blocks ---------------------------------------------------------------------------


def clip_vit_l_336(num_layers: int = 24, feature_layer: int = -2) -> VisionConfig:
    """OpenAI CLIP ViT-L/14 at 336 px (LLaVA-1.5's encoder)."""
    return VisionConfig(
        style="clip",
        image_size=336,
        patch_size=14,
        num_layers=num_layers,
        feature_layer=feature_layer,
        hidden_size=1024,
        ffn_hidden_size=4096,
        num_attention_heads=16,
    )


def vicuna(num_layers: int, hidden: int, ffn: int, heads: int) -> LanguageConfig:
    """Vicuna-v1.5 (Llama-2 architecture) with llava-hf's 32064 vocab."""
    return LanguageConfig(
        flavor="vicuna",
        num_layers=num_layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        vocab_size=32064,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        norm_eps=1e-5,
    )


def debug_lm() -> LanguageConfig:
    """The debug presets' Llama-style LM: 2 layers, width 64, GQA 4/2, vocab 512."""
    return LanguageConfig(
        flavor="llama",
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=176,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=512,
        make_vocab_size_divisible_by=32,
        max_position_embeddings=512,
        rope_theta=10000.0,
    )


# --- presets -----------------------------------------------------------------------------------


@register_preset("debug-tiny")
def debug_tiny() -> LlavaConfig:
    """A few hundred thousand parameters; runs on CPU in seconds (64 px images, 16 image tokens)."""
    return LlavaConfig(
        vision=VisionConfig(
            style="clip",
            image_size=64,
            patch_size=16,
            num_layers=3,
            feature_layer=-2,
            hidden_size=64,
            ffn_hidden_size=128,
            num_attention_heads=4,
        ),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        lm=debug_lm(),
        image_token_id=4,
        freeze_vision=False,
        # Widths of 64 need a wider init than GPT's 0.02 (~1/sqrt(64)): at 0.02 the fresh ViT
        # learns colours but left shape accuracy at chance after 700 steps (learning test).
        init_method_std=0.08,
    )


@register_preset("minimind-v")
def minimind_v() -> LlavaConfig:
    """MiniMind-V-like: 26M LM (d512 L8 GQA 8/2, vocab 6400, tied) + CLIP-B/16 + linear."""
    return LlavaConfig(
        vision=VisionConfig(
            style="clip",
            image_size=224,
            patch_size=16,
            num_layers=12,
            feature_layer=-1,
            hidden_size=768,
            ffn_hidden_size=3072,
            num_attention_heads=12,
        ),
        projector=ProjectorConfig(type="linear"),
        lm=LanguageConfig(
            flavor="llama",
            num_layers=8,
            hidden_size=512,
            ffn_hidden_size=1408,
            num_attention_heads=8,
            num_query_groups=2,
            vocab_size=6400,
            make_vocab_size_divisible_by=64,
            max_position_embeddings=2048,
            rope_theta=1e6,
            tie_embeddings=True,
        ),
        image_token_id=6,
    )


@register_preset("llava-1.5-7b")
def llava_15_7b() -> LlavaConfig:
    """LLaVA-1.5-7B: CLIP-L/336 (feature layer -2) + MLP2x-GELU + Vicuna-7B-v1.5."""
    return LlavaConfig(
        vision=clip_vit_l_336(),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        lm=vicuna(num_layers=32, hidden=4096, ffn=11008, heads=32),
    )


@register_preset("llava-1.5-13b")
def llava_15_13b() -> LlavaConfig:
    """LLaVA-1.5-13B: CLIP-L/336 (feature layer -2) + MLP2x-GELU + Vicuna-13B-v1.5."""
    return LlavaConfig(
        vision=clip_vit_l_336(),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        lm=vicuna(num_layers=40, hidden=5120, ffn=13824, heads=40),
    )


@register_preset("ref-1.4b")
def ref_1_4b() -> LlavaConfig:
    """Performance reference: CLIP-L/336 (23 layers) + MLP2x + Llama 1.2B (L16 h2048 GQA 32/8)."""
    lm = LanguageConfig(
        flavor="llama",
        num_layers=16,
        hidden_size=2048,
        ffn_hidden_size=8192,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=32064,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    )
    return LlavaConfig(
        vision=clip_vit_l_336(),  # 24 published layers, feature_layer -2 -> 23 built
        projector=ProjectorConfig(type="mlp2x_gelu"),
        lm=lm,
    )


# Preset families in their own files register themselves on import.
from mm_megatron.config import (  # noqa: E402
    presets_blip2,  # noqa: F401
    presets_internvl,  # noqa: F401
    presets_llava_next,  # noqa: F401
    presets_mgm,  # noqa: F401
    presets_minicpm,  # noqa: F401
)
