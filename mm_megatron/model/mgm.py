"""MGM (Mini-Gemini) dual vision encoder: low-resolution ViT + high-resolution ConvNeXt, mined.

Follows the published code (github.com/dvlab-research/MGM, ``mgm_arch.py`` ``encode_images`` /
``unified_resampler``, ``openclip_encoder.py``, ``train.py``) with one placement change: MGM's
data loader resizes the image to the high resolution and derives the low-resolution one from it
by bilinear interpolation (``align_corners=False``); here the data pipeline delivers only the
high-resolution image ``[N, 3, R, R]`` (``hires.image_size``) and this module derives the
low-resolution input the same way, so the batch contract is unchanged.

One image goes through:

1. low resolution: ``interpolate(image, vision.image_size * grid)``; with ``hires.grid > 1``
   (MGM-HD) cut into ``grid x grid`` crops (row-major) plus, with ``hires.global_image``, the
   whole low-resolution image resized to ``vision.image_size``; the ViT encodes all of them in
   one call: ``T`` tokens each (CLIP-L/14 at 336: 576);
2. high resolution: ConvNeXt multi-stage features ``[N, C_aux, S, S]`` (every stage upsampled
   to the first stage's map; ConvNeXt-L at 768: 2880 channels, S = 192);
3. patch-info mining (:class:`PatchInfoMining`): each low-resolution token is a query
   (LayerNorm + Linear), the keys and values are the high-resolution features of its own
   sub-region (LayerNorm + Linear; (S / sqrt(T))^2 = 8x8 per query at 768), softmax attention
   scaled by 1/sqrt(C), and the result is added to the token. MGM-HD's crops mine their quadrant
   of the map; the global image mines the map downsampled by ``grid``.

Output ``[N, L * T, C]`` (``L`` = ``hires.low_res_images``; MGM-HD's order is the global image's
tokens first, then the crops'), which the configured projector (``mlp2x_gelu`` in MGM) maps to
the language model.

What it does not do: tensor-parallel sharding of the ConvNeXt or the mining (both are replicated
on the TP ranks of the first pipeline stage, where their inputs are identical; the ViT shards as
usual), pipeline placement or freezing (``model/build.py``; the mining trains with the projector,
:meth:`MGMDualEncoder.connector_modules`), or loading MGM's open_clip checkpoints.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mm_megatron.config.hires_config import HighResConfig
from mm_megatron.config.model_config import VisionConfig
from mm_megatron.model.convnext import ConvNeXt
from mm_megatron.model.vision import VisionEncoder, register_vision_encoder


def _norm_linear(cin: int, cout: int, eps: float, dtype: torch.dtype) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.LayerNorm(cin, eps=eps, dtype=dtype), torch.nn.Linear(cin, cout, dtype=dtype)
    )


class PatchInfoMining(torch.nn.Module):
    """``x + Attn(q = LN-Linear(x), k, v = LN-Linear(own sub-region of the map))``.

    Parameter names follow MGM: ``query`` / ``key`` / ``value`` are its
    ``vlm_uni_query_projector`` / ``vlm_uni_aux_projector`` / ``vlm_uni_val_projector``
    (``.0`` the LayerNorm, ``.1`` the Linear).

    Args:
        hidden: width of the low-resolution tokens (C).
        aux_channels: channels of the high-resolution map (C_aux).
        eps: LayerNorm epsilon.
        dtype: parameter dtype.
        init_std: std of the normal init of the Linear weights (biases zero).
    """

    def __init__(
        self, hidden: int, aux_channels: int, eps: float, dtype: torch.dtype, init_std: float
    ):
        super().__init__()
        self.query = _norm_linear(hidden, hidden, eps, dtype)
        self.key = _norm_linear(aux_channels, hidden, eps, dtype)
        self.value = _norm_linear(aux_channels, hidden, eps, dtype)
        with torch.no_grad():
            for seq in (self.query, self.key, self.value):
                torch.nn.init.normal_(seq[1].weight, std=init_std)
                torch.nn.init.zeros_(seq[1].bias)

    def forward(self, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """x [N, T, C] (T a square grid), aux [N, C_aux, S, S] -> [N, T, C]."""
        n, t, c = x.shape
        g = math.isqrt(t)
        s = aux.shape[-1]
        if g * g != t or s % g or aux.shape[-2] != s:
            raise ValueError(
                f"patch-info mining needs a square token grid dividing the square map: {t} "
                f"tokens, map {tuple(aux.shape[-2:])}"
            )
        p = s // g
        a = aux.to(x.dtype).permute(0, 2, 3, 1)  # [N, S, S, C_aux]
        # LayerNorm + Linear act per pixel, so they run before the windowing (MGM's order).
        k, v = self.key(a), self.value(a)  # [N, S, S, C]

        def windows(m: torch.Tensor) -> torch.Tensor:
            m = m.reshape(n, g, p, g, p, c).permute(0, 1, 3, 2, 4, 5)  # [N, g, g, p, p, C]
            return m.reshape(n, t, p * p, c)  # [N, T, p^2, C]

        q = self.query(x).unsqueeze(2)  # [N, T, 1, C]
        # softmax(q k^T / sqrt(C)) v per token over its own p^2 features (MGM divides by sqrt(C))
        mined = F.scaled_dot_product_attention(q, windows(k), windows(v))  # [N, T, 1, C]
        return x + mined.squeeze(2)

    @staticmethod
    def forward_flops(hidden: int, aux_channels: int, tokens: int, pixels: int) -> int:
        """FLOPs of ``tokens`` queries over ``pixels`` map features (each read by one query).

        Query ``2 T C^2``, key and value ``2 * 2 S^2 C_aux C``, ``QK^T`` and ``AV``
        ``2 * 2 S^2 C`` (S^2 = ``pixels``)."""
        return (
            2 * tokens * hidden * hidden + 4 * pixels * aux_channels * hidden + 4 * pixels * hidden
        )


@register_vision_encoder("mgm")
class MGMDualEncoder(MegatronModule):
    """high-resolution images [N, 3, R, R] -> mined low-resolution features [N, L * T, C].

    ``vcfg`` describes the low-resolution ViT (CLIP-L/14 at 336 in MGM; its own style is
    ``vcfg.hires.vit_style``) and ``vcfg.hires`` the ConvNeXt, grid and global image.

    Args:
        config: the ViT's TransformerConfig.
        vcfg: the vision config (``style="mgm"``, ``hires.type="convnext"``).
        pg_collection: process groups (TP for the ViT).
    """

    def __init__(
        self,
        config: TransformerConfig,
        vcfg: VisionConfig,
        pg_collection: ProcessGroupCollection,
    ):
        super().__init__(config=config)
        if not vcfg.hires.enabled:
            raise ValueError(
                f"vision.style={vcfg.style!r} needs vision.hires.type='convnext' (the "
                "high-resolution tower), got 'none'"
            )
        self.vcfg, self.hcfg = vcfg, vcfg.hires
        dtype, std = config.params_dtype, config.init_method_std
        self.vit = VisionEncoder.build(config, self.vit_config(vcfg), pg_collection)
        self.hires = ConvNeXt(self.hcfg, vcfg.num_channels, dtype, std)
        self.mining = PatchInfoMining(
            vcfg.feature_width,
            self.hcfg.feature_channels,
            self.hcfg.mining_layernorm_eps,
            dtype,
            std,
        )

    @classmethod
    def build(
        cls, config: TransformerConfig, vcfg: VisionConfig, pg_collection: ProcessGroupCollection
    ) -> MGMDualEncoder:
        """The registry's constructor."""
        return cls(config, vcfg, pg_collection)

    @staticmethod
    def vit_config(vcfg: VisionConfig) -> VisionConfig:
        """The low-resolution ViT on its own (its style, no second tower)."""
        return dataclasses.replace(vcfg, style=vcfg.vit_style, hires=HighResConfig())

    def connector_modules(self) -> list[torch.nn.Module]:
        """Parts that train with the projector (MGM's stage 1 trains the mining and the MLP)."""
        return [self.mining]

    def set_input_tensor(self, input_tensor) -> None:
        """The encoder is never pipelined; megatron's schedules may still call this."""
        return None

    def low_res_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, R, R] -> the ViT inputs [N * L, 3, r, r]: crops (row-major) then globals.

        Resized in fp32 (MGM resizes in its data loader), returned in the ViT's dtype."""
        n, g, r = images.shape[0], self.hcfg.grid, self.vcfg.image_size
        dtype = self.vit.conv1.weight.dtype
        lr = F.interpolate(
            images.float(), size=(r * g, r * g), mode="bilinear", align_corners=False
        )
        if g == 1:
            return lr.to(dtype)  # [N, 3, r, r]
        crops = lr.reshape(n, -1, g, r, g, r).permute(0, 2, 4, 1, 3, 5)  # [N, g, g, 3, r, r]
        parts = [crops.reshape(n * g * g, -1, r, r)]
        if self.hcfg.global_image:
            parts.append(F.interpolate(lr, size=(r, r), mode="bilinear", align_corners=False))
        return torch.cat(parts).to(dtype)  # [N * g^2 (+ N), 3, r, r]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, g = images.shape[0], self.hcfg.grid
        feats = self.vit(self.low_res_images(images))  # [N * L, T, C]
        aux = self.hires.multi_stage_features(images)  # [N, C_aux, S, S]
        t, c = feats.shape[1:]
        if g == 1:
            return self.mining(feats, aux)  # [N, T, C]
        crops, globals_ = feats[: n * g * g], feats[n * g * g :]
        s = aux.shape[-1] // g
        # each crop mines its own quadrant of the map, in the crops' row-major order
        quads = aux.reshape(n, -1, g, s, g, s).permute(0, 2, 4, 1, 3, 5)  # [N, g, g, C_aux, s, s]
        out = self.mining(crops, quads.reshape(n * g * g, -1, s, s)).reshape(n, g * g * t, c)
        if self.hcfg.global_image:
            small = F.interpolate(
                aux.float(), scale_factor=1 / g, mode="bilinear", align_corners=False
            ).to(aux.dtype)
            out = torch.cat([self.mining(globals_, small), out], dim=1)  # global first
        return out  # [N, L * T, C]

    @staticmethod
    def forward_flops(vcfg: VisionConfig, num_images: int = 1) -> int:
        """Both towers over ``num_images`` images: the ViT ``L`` times, the ConvNeXt once."""
        hcfg = vcfg.hires
        vit_cfg = MGMDualEncoder.vit_config(vcfg)
        vit = VisionEncoder.forward_flops(vit_cfg, num_images * hcfg.low_res_images)
        return vit + ConvNeXt.forward_flops(hcfg, vcfg.num_channels, num_images)

    @staticmethod
    def connector_activation_elements(vcfg: VisionConfig) -> int:
        """Elements the mining saves per image for backward (replicated, so not divided by TP).

        Per map pixel: the map (LayerNorm input), the key and value LayerNorm outputs (Linear
        inputs), the keys and values (attention inputs): ``3 C_aux + 2 C``; per token: the
        token, its LayerNorm output, the query and the attention output ``4 C``, and the
        softmax weights ``p^2``. MGM-HD's global image adds its downsampled map.
        """
        hcfg = vcfg.hires
        c, ca = vcfg.feature_width, hcfg.feature_channels
        t = MGMDualEncoder.vit_config(vcfg).num_output_tokens
        side = hcfg.map_size()
        pixels = side * side + ((side // hcfg.grid) ** 2 if hcfg.global_image else 0)
        tokens = hcfg.low_res_images * t
        return pixels * (3 * ca + 2 * c) + tokens * 4 * c + pixels

    @staticmethod
    def connector_forward_flops(vcfg: VisionConfig, num_images: int = 1) -> int:
        """The mining over ``num_images`` images (it trains with the projector): the crops read
        the whole map, a global image the map downsampled by ``grid``."""
        hcfg = vcfg.hires
        c, ca = vcfg.feature_width, hcfg.feature_channels
        t = MGMDualEncoder.vit_config(vcfg).num_output_tokens
        side = hcfg.map_size()
        per = PatchInfoMining.forward_flops(c, ca, hcfg.grid**2 * t, side * side)
        if hcfg.global_image:
            per += PatchInfoMining.forward_flops(c, ca, t, (side // hcfg.grid) ** 2)
        return num_images * per
