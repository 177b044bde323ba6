"""Presets with the BLIP-2 / MiniGPT-4 Q-Former connector (``projector.type: qformer``).

* ``minigpt4``: MiniGPT-4: BLIP-2's vision side, i.e. its EVA ViT-g/14 at 224 px
  (``vision.style="blip2"``: transformers' ``Blip2VisionModel``; width 1408, the 39 of EVA's 40
  layers that BLIP-2 ships, all read, post-LayerNorm applied, class token kept: 257 features)
  and its Q-Former (32 queries, BERT-base width, 12 layers, cross-attention every second
  layer), then a new linear layer into Vicuna-7B. Each image is 32 LM embeddings.
  ``convert assemble --vision BLIP2_DIR --qformer-from BLIP2_DIR --lm VICUNA --preset minigpt4``
  loads both BLIP-2 parts (:mod:`mm_megatron.convert.blip2_vision`,
  :mod:`mm_megatron.convert.qformer`).
* ``debug-tiny-qformer``: ``debug-tiny`` with a ``blip2``-style tower of its two built layers
  (17 features: the class token kept) and a 2-layer Q-Former of 8 queries (layer 0
  cross-attends, layer 1 does not); runs on CPU in seconds.
"""

from __future__ import annotations

import dataclasses

from mm_megatron.config.model_config import (
    LanguageConfig,
    LlavaConfig,
    ProjectorConfig,
    VisionConfig,
)
from mm_megatron.config.presets import debug_tiny, register_preset, vicuna
from mm_megatron.config.qformer_config import QFormerConfig


def vit_g_224() -> VisionConfig:
    """BLIP-2's EVA ViT-g/14 at 224 px (HF ``Blip2VisionConfig``), read at last_hidden_state."""
    return VisionConfig(
        style="blip2",
        image_size=224,
        patch_size=14,
        num_layers=39,
        feature_layer=-1,
        hidden_size=1408,
        ffn_hidden_size=6144,
        num_attention_heads=16,
        layernorm_eps=1e-6,
        drop_class_token=False,
        post_layernorm=True,
        activation="gelu",
    )


@register_preset("minigpt4")
def minigpt4() -> LlavaConfig:
    """MiniGPT-4: BLIP-2's ViT-g/14 and Q-Former (32 queries) + a linear layer + Vicuna-7B."""
    lm: LanguageConfig = vicuna(num_layers=32, hidden=4096, ffn=11008, heads=32)
    return LlavaConfig(
        vision=vit_g_224(),
        projector=ProjectorConfig(type="qformer", qformer=QFormerConfig()),
        lm=lm,
    )


def as_blip2_tower(vision: VisionConfig) -> VisionConfig:
    """``vision`` with BLIP-2's tower style and its two first layers, read as BLIP-2 reads its
    tower: the last layer, post-LN, class token kept (the tiny presets' and tests' tower)."""
    return dataclasses.replace(
        vision,
        style="blip2",
        num_layers=2,
        feature_layer=-1,
        drop_class_token=False,
        post_layernorm=True,
        activation="gelu",
    )


@register_preset("debug-tiny-qformer")
def debug_tiny_qformer() -> LlavaConfig:
    """debug-tiny with a BLIP-2-style tower and a 2-layer, 8-query Q-Former (CPU, seconds)."""
    cfg = debug_tiny()
    cfg.vision = as_blip2_tower(cfg.vision)
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
