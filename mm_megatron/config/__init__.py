"""Configuration dataclasses and the preset registry."""

from mm_megatron.config.model_config import (
    LanguageConfig,
    LlavaConfig,
    ProjectorConfig,
    VisionConfig,
)
from mm_megatron.config.parallel_config import ParallelConfig
from mm_megatron.config.presets import PRESETS, get_preset, list_presets, register_preset

__all__ = [
    "LanguageConfig",
    "LlavaConfig",
    "ParallelConfig",
    "PRESETS",
    "ProjectorConfig",
    "VisionConfig",
    "get_preset",
    "list_presets",
    "register_preset",
]
