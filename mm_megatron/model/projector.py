"""Vision -> language projectors, in a registry so architecture variants can add their own.

A projector maps the vision features of one image (or tile) ``[N, T, h_vision]`` to
``[N, T', h_lm]``. Each projector is a ``Projector`` subclass registered with
``@register_projector("name")``; the class itself states everything the rest of the system needs
to know about it, without being built:

* ``num_output_tokens(pcfg, tokens_in) -> T'`` — the data pipeline, the merge, the FLOPs and the
  converters all get the image-token count from here (through
  :mod:`mm_megatron.model.image_tokens`), never from a constant;
* ``forward_flops(pcfg, vision_hidden, lm_hidden, tokens_in)`` — forward FLOPs for one tile;
* ``check(pcfg, tokens_in)`` — a one-line ValueError when the vision geometry does not fit it.

Shipped:

* ``mlp2x_gelu`` (LLaVA-1.5): Linear(h_v, h) -> GELU -> Linear(h, h_lm). Column- then
  row-parallel under TP (one all-reduce).
* ``linear`` (LLaVA-1.0, MiniMind-V): Linear(h_v, h_lm), column-parallel with gathered output.
* ``mlp2x_gelu_pool2``: 2x2 average pooling over the patch grid (4x fewer tokens, as the pooled
  connectors of LLaVA-OneVision's video path), then ``mlp2x_gelu``.

This module computes; it never looks up process groups itself (they arrive in ``pg_collection``).
"""

from __future__ import annotations

import math

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mm_megatron.config.model_config import ProjectorConfig
from mm_megatron.config.registry import Registry
from mm_megatron.model.specs import projector_linears

PROJECTORS: Registry[type[Projector]] = Registry("projector.type")
"""``projector.type`` -> ``Projector`` subclass (the base is checked once the class exists)."""


def register_projector(name: str):
    """Class decorator adding a ``Projector`` subclass under ``name``."""
    return PROJECTORS.register(name)


def projector_class(name: str) -> type[Projector]:
    """The registered class of projector ``name`` (ValueError lists the registered names)."""
    return PROJECTORS.lookup(name)


def build_projector(
    config: TransformerConfig,
    pcfg: ProjectorConfig,
    vision_hidden: int,
    pg_collection: ProcessGroupCollection,
) -> Projector:
    """Build projector ``pcfg.type``."""
    return projector_class(pcfg.type)(config, pcfg, vision_hidden, pg_collection)


class Projector(MegatronModule):
    """Base class: ``forward(x [N, T, h_v]) -> [N, num_output_tokens(T), h_lm]``."""

    @classmethod
    def check(cls, pcfg: ProjectorConfig, tokens_in: int) -> None:
        """Raise ValueError (one line) if ``tokens_in`` vision tokens per tile do not fit."""

    @classmethod
    def num_output_tokens(cls, pcfg: ProjectorConfig, tokens_in: int) -> int:
        """LM embeddings produced from ``tokens_in`` vision tokens of one tile."""
        return tokens_in

    @classmethod
    def matmul_params(cls, pcfg: ProjectorConfig, vision_hidden: int, lm_hidden: int) -> int:
        """Weights each output token is multiplied by (biases excluded)."""
        raise NotImplementedError

    @classmethod
    def forward_flops(
        cls, pcfg: ProjectorConfig, vision_hidden: int, lm_hidden: int, tokens_in: int
    ) -> int:
        """Forward FLOPs for one tile of ``tokens_in`` vision tokens (matmuls only)."""
        tokens = cls.num_output_tokens(pcfg, tokens_in)
        return 2 * cls.matmul_params(pcfg, vision_hidden, lm_hidden) * tokens


PROJECTORS.base = Projector  # entries must subclass it


@register_projector("mlp2x_gelu")
class MLPProjector(Projector):
    """Two-layer MLP projector (megatron ``MLP``: fc1 column-parallel, fc2 row-parallel)."""

    def __init__(self, config, pcfg, vision_hidden, pg_collection):
        super().__init__(config=config)
        col, row = projector_linears(pcfg.spec)
        self.encoder = MLP(
            config=config,
            submodules=MLPSubmodules(linear_fc1=col, linear_fc2=row),
            input_size=vision_hidden,
            tp_group=pg_collection.tp,
        )

    @classmethod
    def matmul_params(cls, pcfg, vision_hidden, lm_hidden):
        inner = pcfg.hidden_size or lm_hidden
        return vision_hidden * inner + inner * lm_hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [N, T, h_v] -> [T, N, h_v] (megatron layers are sequence-first) -> [N, T, h_lm]
        out, bias = self.encoder(x.transpose(0, 1))
        if bias is not None:
            out = out + bias
        return out.transpose(0, 1)


@register_projector("linear")
class LinearProjector(Projector):
    """One linear layer, column-parallel with the output gathered on every TP rank."""

    def __init__(self, config, pcfg, vision_hidden, pg_collection):
        super().__init__(config=config)
        col, _ = projector_linears(pcfg.spec)
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

    @classmethod
    def matmul_params(cls, pcfg, vision_hidden, lm_hidden):
        return vision_hidden * lm_hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.linear(x.transpose(0, 1))  # [T, N, h_lm]
        return out.transpose(0, 1)


@register_projector("mlp2x_gelu_pool2")
class PooledMLPProjector(MLPProjector):
    """2x2 average pool over the square patch grid, then the two-layer MLP (4x fewer tokens)."""

    @classmethod
    def check(cls, pcfg, tokens_in):
        side = math.isqrt(tokens_in)
        if side * side != tokens_in or side % 2:
            raise ValueError(
                f"projector.type={pcfg.type!r} needs a square patch grid with an even side; the "
                f"vision encoder gives {tokens_in} tokens per image (keep the class token out: "
                "vision.drop_class_token=true)"
            )

    @classmethod
    def num_output_tokens(cls, pcfg, tokens_in):
        cls.check(pcfg, tokens_in)
        return tokens_in // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, h = x.shape
        side = math.isqrt(t)
        grid = x.reshape(n, side // 2, 2, side // 2, 2, h)  # [N, g/2, 2, g/2, 2, h_v]
        pooled = grid.mean(dim=(2, 4)).reshape(n, t // 4, h)  # [N, T/4, h_v]
        return super().forward(pooled)


# Connectors in their own files register themselves on import.
from mm_megatron.model import (  # noqa: E402
    projector_pixel_shuffle,  # noqa: F401
    projector_qformer,  # noqa: F401
    projector_resampler,  # noqa: F401
)
