"""Vision -> language projectors, in a registry so architecture variants can add their own.

A projector maps vision features ``[N, T, h_vision]`` to ``[N, T', h_lm]``. Register a new one
with ``@register_projector("name")`` on a builder ``fn(config, proj_cfg, vision_hidden, spec,
pg_collection) -> MegatronModule`` whose module exposes ``num_output_tokens(T) -> T'``
(identity for token-preserving projectors; resamplers/pixel-shuffle change it).

Shipped:
* ``mlp2x_gelu`` (LLaVA-1.5): Linear(h_v, h) -> GELU -> Linear(h, h_lm). Column- then
  row-parallel under TP (one all-reduce).
* ``linear`` (LLaVA-1.0, MiniMind-V): Linear(h_v, h_lm), column-parallel with gathered output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mm_megatron.config.model_config import ProjectorConfig
from mm_megatron.model.specs import projector_linears

ProjectorBuilder = Callable[..., MegatronModule]
PROJECTORS: dict[str, ProjectorBuilder] = {}


def register_projector(name: str) -> Callable[[ProjectorBuilder], ProjectorBuilder]:
    """Decorator adding a projector builder under ``name``."""

    def deco(fn: ProjectorBuilder) -> ProjectorBuilder:
        if name in PROJECTORS:
            raise ValueError(f"projector {name!r} registered twice")
        PROJECTORS[name] = fn
        return fn

    return deco


def build_projector(
    config: TransformerConfig,
    pcfg: ProjectorConfig,
    vision_hidden: int,
    pg_collection: ProcessGroupCollection,
) -> MegatronModule:
    """Build projector ``pcfg.type`` (ValueError lists the registered names)."""
    if pcfg.type not in PROJECTORS:
        raise ValueError(
            f"unknown projector.type {pcfg.type!r}; registered: {', '.join(sorted(PROJECTORS))}"
        )
    return PROJECTORS[pcfg.type](config, pcfg, vision_hidden, pcfg.spec, pg_collection)


class MLPProjector(MegatronModule):
    """Two-layer MLP projector (megatron ``MLP``: fc1 column-parallel, fc2 row-parallel)."""

    def __init__(self, config, pcfg, vision_hidden, spec, pg_collection):
        super().__init__(config=config)
        col, row = projector_linears(spec)
        self.encoder = MLP(
            config=config,
            submodules=MLPSubmodules(linear_fc1=col, linear_fc2=row),
            input_size=vision_hidden,
            tp_group=pg_collection.tp,
        )

    def num_output_tokens(self, tokens: int) -> int:
        return tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [N, T, h_v] -> [T, N, h_v] (megatron layers are sequence-first) -> [N, T, h_lm]
        out, bias = self.encoder(x.transpose(0, 1))
        if bias is not None:
            out = out + bias
        return out.transpose(0, 1)


class LinearProjector(MegatronModule):
    """One linear layer, column-parallel with the output gathered on every TP rank."""

    def __init__(self, config, pcfg, vision_hidden, spec, pg_collection):
        super().__init__(config=config)
        col, _ = projector_linears(spec)
        self.linear = col(
            vision_hidden,
            config.hidden_size,
            config=config,
            init_method=config.init_method,
            bias=pcfg.bias,
            gather_output=True,
            skip_bias_add=False,
            tp_group=pg_collection.tp,
        )

    def num_output_tokens(self, tokens: int) -> int:
        return tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.linear(x.transpose(0, 1))  # [T, N, h_lm]
        return out.transpose(0, 1)


@register_projector("mlp2x_gelu")
def _mlp2x_gelu(config, pcfg, vision_hidden, spec, pg_collection):
    return MLPProjector(config, pcfg, vision_hidden, spec, pg_collection)


@register_projector("linear")
def _linear(config, pcfg, vision_hidden, spec, pg_collection):
    return LinearProjector(config, pcfg, vision_hidden, spec, pg_collection)
