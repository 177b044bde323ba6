"""MiniCPM-V's Perceiver resampler: a fixed number of learned queries cross-attend to a tile.

The connector of MiniCPM-V 2.x (and Qwen-VL, where it comes from; Bai et al. 2023, sec. 2.1):

* ``N`` learned queries (``projector.resampler.num_queries``, default 64) plus fixed 2D sin-cos
  positions of an ``sqrt(N) x sqrt(N)`` grid (MAE's ``get_2d_sincos_pos_embed``; He et al. 2021);
* the ViT features of one tile go through ``kv_proj`` (``h_v -> D``, no bias) and LayerNorm;
  the keys add absolute 2D sin-cos positions: the query grid's table, bicubically interpolated
  to the key grid (any square grid: Qwen-VL's ``get_abs_pos``); the values do not;
* one multi-head cross-attention (``D / head`` heads, as ``nn.MultiheadAttention``), then
  LayerNorm (``ln_post``) and a projection to the LM width (``proj``, no bias). The query, value
  and output projections carry biases; the key projection does not: a key bias adds the same
  ``q . b`` to every score of a query, which softmax ignores, so its gradient is exactly zero
  (a checkpoint's key bias may be dropped without changing the output).

``D`` is ``projector.hidden_size`` or the LM width (MiniCPM-V's ``embed_dim``); heads default to
``D // 128``. Every tile becomes exactly ``num_queries`` LM embeddings, whatever its grid.

Tensor parallelism (megatron's linears): ``kv_proj`` and ``proj`` are column-parallel with their
outputs gathered (their LayerNorms need the full width); ``linear_q/k/v`` are column-parallel,
so each rank owns ``heads / TP`` heads; ``linear_out`` is row-parallel (one all-reduce). Norms,
the queries and the positions are replicated; their gradients arrive whole on every rank through
the column-parallel layers' input all-reduce, so no extra reduction is needed.

This module computes; it never looks up process groups itself (they arrive in ``pg_collection``).
What it does not do: slice images (``data/tiling_minicpm.py``), or mask keys (every tile of a
batch has the same grid).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel

from mm_megatron.model.norm import LocalNorm
from mm_megatron.model.projector import Projector, register_projector
from mm_megatron.model.specs import projector_linears

LN_EPS = 1e-6
"""LayerNorm epsilon of MiniCPM-V's resampler (``partial(nn.LayerNorm, eps=1e-6)``)."""


def sincos_2d(width: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2D sin-cos positions ``[grid_h * grid_w, width]`` (row-major), MAE's layout.

    The first half of the channels encodes the column, the second half the row; each half is
    ``[sin(p * w_k), cos(p * w_k)]`` with ``w_k = 10000^(-k / (width / 4))``.
    """
    if width % 4:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]  # [g_h * g_w, width / 4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()


def interpolate_positions(table: torch.Tensor, side: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """A ``[side * side, D]`` position table resized bicubically to ``[grid_h * grid_w, D]``."""
    if (grid_h, grid_w) == (side, side):
        return table
    img = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # [1, D, side, side]
    out = F.interpolate(img, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)


def _square_side(n: int, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what}={n} is not a square number (the 2D positions need a square grid)")
    return side


@register_projector("resampler")
class ResamplerProjector(Projector):
    """``[N, T, h_v] -> [N, num_queries, h_lm]``: MiniCPM-V's resampler (module docstring)."""

    def __init__(self, config, pcfg, vision_hidden, pg_collection):
        super().__init__(config=config)
        width = pcfg.hidden_size or config.hidden_size
        heads = self.heads(pcfg, width)
        tp = config.tensor_model_parallel_size
        if width % heads or heads % tp:
            raise ValueError(
                f"projector.resampler.num_heads={heads} must divide the resampler width {width} "
                f"and be divisible by TP={tp}"
            )
        self.width, self.heads_local, self.head_dim = width, heads // tp, width // heads
        self.grid = _square_side(pcfg.resampler.num_queries, "projector.resampler.num_queries")
        self.tp_group = pg_collection.tp
        col, row = projector_linears(pcfg.spec)
        init = config.init_method

        def column(n_in: int, n_out: int, bias: bool):
            return col(
                n_in,
                n_out,
                config=config,
                init_method=init,
                bias=bias,
                gather_output=False,
                skip_bias_add=False,
                is_expert=False,
                tp_group=pg_collection.tp,
            )

        def norm() -> LocalNorm:
            # the norms run on whole tiles, outside any sequence-parallel region
            return LocalNorm(
                config, width, eps=LN_EPS, normalization="LayerNorm", sequence_parallel=False
            )

        self.query = torch.nn.Parameter(
            torch.empty(pcfg.resampler.num_queries, width, dtype=config.params_dtype)
        )
        with torch.no_grad():
            init(self.query)
        self.kv_proj = column(vision_hidden, width, bias=False)
        self.ln_q, self.ln_kv, self.ln_post = norm(), norm(), norm()
        self.linear_q = column(width, width, bias=True)
        self.linear_k = column(width, width, bias=False)  # a key bias cannot change softmax
        self.linear_v = column(width, width, bias=True)
        self.linear_out = row(
            width,
            width,
            config=config,
            init_method=config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
            is_expert=False,
            tp_group=pg_collection.tp,
        )
        self.proj = column(width, config.hidden_size, bias=False)
        self.register_buffer("query_pos", sincos_2d(width, self.grid, self.grid), persistent=False)

    # --- what the rest of the system asks the class ---------------------------------------
    @staticmethod
    def heads(pcfg, width: int) -> int:
        """Heads: ``projector.resampler.num_heads``, else ``width // 128`` (MiniCPM-V), >= 1."""
        return pcfg.resampler.heads(width)

    @classmethod
    def check(cls, pcfg, tokens_in):
        _square_side(tokens_in, "vision tokens per tile (drop the class token)")
        _square_side(pcfg.resampler.num_queries, "projector.resampler.num_queries")

    @classmethod
    def num_output_tokens(cls, pcfg, tokens_in):
        return pcfg.resampler.num_queries

    @classmethod
    def matmul_params(cls, pcfg, vision_hidden, lm_hidden):
        width = pcfg.hidden_size or lm_hidden
        return vision_hidden * width + 4 * width * width + width * lm_hidden

    @classmethod
    def forward_flops(cls, pcfg, vision_hidden, lm_hidden, tokens_in):
        """Per tile of ``T`` keys, ``Q`` queries, width ``D``: ``kv_proj`` ``2 T h_v D``, keys and
        values ``4 T D^2``, scores and weighted sum ``4 Q T D``, output and ``proj``
        ``2 Q D (D + h_lm)``. The query projection ``2 Q D^2`` does not depend on the images and
        runs once per call, so it is not counted per tile."""
        d, q, t = pcfg.hidden_size or lm_hidden, pcfg.resampler.num_queries, tokens_in
        return (
            2 * t * vision_hidden * d + 4 * t * d * d + 4 * q * t * d + 2 * q * d * (d + lm_hidden)
        )

    @classmethod
    def activation_elements(cls, pcfg, vision_hidden, lm_hidden, tokens_in, tp):
        """Elements one tile saves for backward (the planner's memory model)."""
        d, q, t = pcfg.hidden_size or lm_hidden, pcfg.resampler.num_queries, tokens_in
        keys = t * (vision_hidden + 3 * d + 2 * d / tp)  # kv_proj in/out, LN out, k+pos, k, v
        return keys + q * (3 * d / tp + 2 * d)  # q, attention out, out-proj in; ln_post, proj

    # --------------------------------------------------------------------------------------
    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return tensor_parallel.gather_from_tensor_model_parallel_region(x, group=self.tp_group)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [s, b, D/tp] -> [b, heads/tp, s, d]
        s, b, _ = x.shape
        return x.reshape(s, b, self.heads_local, self.head_dim).permute(1, 2, 0, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        side = _square_side(t, "vision tokens per tile")
        kv, _ = self.kv_proj(x.transpose(0, 1))  # [T, N, D/tp]
        kv = self.ln_kv(self._gather(kv))  # [T, N, D]
        pos = interpolate_positions(self.query_pos, self.grid, side, side).to(kv.dtype)  # [T, D]
        k, _ = self.linear_k(kv + pos[:, None])  # [T, N, D/tp]
        v, _ = self.linear_v(kv)  # [T, N, D/tp]
        q_in = self.ln_q(self.query) + self.query_pos.to(self.query.dtype)  # [Q, D]
        q, _ = self.linear_q(q_in[:, None])  # [Q, 1, D/tp]
        q = self._split_heads(q).expand(n, -1, -1, -1)  # [N, heads/tp, Q, d]
        out = F.scaled_dot_product_attention(q, self._split_heads(k), self._split_heads(v))
        out = out.permute(2, 0, 1, 3).reshape(q.shape[2], n, -1)  # [Q, N, D/tp]
        out, _ = self.linear_out(out)  # [Q, N, D], all-reduced over TP
        out, _ = self.proj(self.ln_post(out))  # [Q, N, h_lm/tp]
        return self._gather(out).transpose(0, 1)  # [N, Q, h_lm]
