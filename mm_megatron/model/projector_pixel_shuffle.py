"""InternVL's connector: pixel shuffle of the patch grid, then LayerNorm + two-layer MLP.

Pixel shuffle (InternVL, "downsample_ratio") folds each ``k x k`` block of the square patch grid
into one token ``k^2`` times wider (``k = 1 / ProjectorConfig.pixel_shuffle_ratio``; 0.5 gives
``k = 2``: the 1024 patches of a 448 px tile at patch 14 become 256 tokens of ``4 h_v``). The
folding order is transformers' ``InternVLModel.pixel_shuffle`` (its width/height swaps included),
so converted checkpoints see the channels in the order they were trained with. Then
``LayerNorm(k^2 h_v) -> Linear(k^2 h_v, h) -> act -> Linear(h, h_lm)`` (HF
``InternVLMultiModalProjector``): the LayerNorm runs replicated on every TP rank, fc1 is
column-parallel and fc2 row-parallel (one all-reduce), as in ``mlp2x_gelu``.

What it does not do: take the class token (the grid must be square: keep
``vision.drop_class_token=true``) or tile images (``data/tiling_internvl.py`` does).
"""

from __future__ import annotations

import math

import torch

from mm_megatron.model.norm import LocalNorm
from mm_megatron.model.projector import MLPProjector, register_projector


def shuffle_factor(ratio: float) -> int:
    """``k`` with ``ratio == 1 / k`` (ValueError if ``ratio`` is not one over an integer)."""
    k = round(1 / ratio) if ratio > 0 else 0
    if k < 1 or not math.isclose(1 / k, ratio, rel_tol=1e-9):
        raise ValueError(
            f"projector.pixel_shuffle_ratio={ratio} must be 1/k for an integer k >= 1 (0.5: k=2)"
        )
    return k


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """transformers' ``InternVLModel.pixel_shuffle`` on a flat token axis.

    Args:
        x: ``[N, T, h]`` with ``T`` a square grid (row-major) whose side ``k = 1/ratio`` divides.
        ratio: the downsample ratio (0.5 folds 2x2 blocks).

    Returns:
        ``[N, T / k^2, h k^2]``.
    """
    k = shuffle_factor(ratio)
    n, t, h = x.shape
    side = math.isqrt(t)
    grid = x.reshape(n, side, side, h)  # [N, W, H, h] in HF's naming
    grid = grid.reshape(n, side, side // k, h * k)  # [N, W, H/k, h k]
    grid = grid.permute(0, 2, 1, 3).contiguous()  # [N, H/k, W, h k]
    grid = grid.reshape(n, side // k, side // k, h * k * k)  # [N, H/k, W/k, h k^2]
    grid = grid.permute(0, 2, 1, 3).contiguous()  # [N, W/k, H/k, h k^2]
    return grid.reshape(n, t // (k * k), h * k * k)  # [N, T/k^2, h k^2]


@register_projector("pixel_shuffle_mlp")
class PixelShuffleProjector(MLPProjector):
    """Pixel shuffle -> LayerNorm -> MLP (InternVL); ``k^2`` fewer, ``k^2`` wider tokens."""

    def __init__(self, config, pcfg, vision_hidden, pg_collection):
        k = shuffle_factor(pcfg.pixel_shuffle_ratio)
        super().__init__(config, pcfg, vision_hidden * k * k, pg_collection)
        self.ratio = pcfg.pixel_shuffle_ratio
        # Runs on the whole (replicated) tile, outside any sequence-parallel region.
        self.layer_norm = LocalNorm(
            config,
            vision_hidden * k * k,
            eps=pcfg.layernorm_eps,
            normalization="LayerNorm",
            sequence_parallel=False,
        )

    @classmethod
    def check(cls, pcfg, tokens_in):
        k = shuffle_factor(pcfg.pixel_shuffle_ratio)
        side = math.isqrt(tokens_in)
        if side * side != tokens_in or side % k:
            raise ValueError(
                f"projector.type={pcfg.type!r} with pixel_shuffle_ratio={pcfg.pixel_shuffle_ratio}"
                f" needs a square patch grid whose side divides by {k}; the vision encoder gives "
                f"{tokens_in} tokens per tile (keep the class token out: "
                "vision.drop_class_token=true)"
            )

    @classmethod
    def num_output_tokens(cls, pcfg, tokens_in):
        cls.check(pcfg, tokens_in)
        return tokens_in // shuffle_factor(pcfg.pixel_shuffle_ratio) ** 2

    @classmethod
    def matmul_params(cls, pcfg, vision_hidden, lm_hidden):
        k = shuffle_factor(pcfg.pixel_shuffle_ratio)
        return super().matmul_params(pcfg, vision_hidden * k * k, lm_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pixel_shuffle(x, self.ratio)  # [N, T/k^2, h_v k^2]
        return super().forward(self.layer_norm(x))  # [N, T/k^2, h_lm]
