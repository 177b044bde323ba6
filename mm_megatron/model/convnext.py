"""ConvNeXt image encoder with multi-stage feature output (MGM's high-resolution tower).

ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s"): a 4x4 stride-4 stem conv + channels-first
LayerNorm, then stages of blocks ``x + gamma * pw2(gelu(pw1(LN(dwconv7x7(x)))))``, each later
stage entered through LayerNorm + a 2x2 stride-2 conv. Parameter names are transformers'
``ConvNextModel`` names (``embeddings.*``, ``encoder.stages.{i}.*``), so a transformers state dict
loads as it is (without its pooling ``layernorm.*``); ``tests/unit/test_mgm.py`` checks the
output against ``ConvNextModel`` with random weights.

:meth:`ConvNeXt.multi_stage_features` is MGM's use of it: every stage's map upsampled
bilinearly (``align_corners=False``) to the first stage's size and concatenated on channels.

What it does not do: tensor parallelism (the tower is replicated on every TP rank of the first
pipeline stage; its input and output are identical there), drop path, or the classification
head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm_megatron.config.hires_config import HighResConfig


def _layer_norm_channels_first(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channel dim of ``x`` [N, C, H, W]."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # [N, C, H, W]


class ConvNextBlock(torch.nn.Module):
    """One residual block: depthwise 7x7 conv, LayerNorm, MLP (4x), layer scale."""

    def __init__(self, dim: int, eps: float, layer_scale_init: float, dtype: torch.dtype):
        super().__init__()
        self.dwconv = torch.nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, dtype=dtype)
        self.layernorm = torch.nn.LayerNorm(dim, eps=eps, dtype=dtype)
        self.pwconv1 = torch.nn.Linear(dim, 4 * dim, dtype=dtype)
        self.pwconv2 = torch.nn.Linear(4 * dim, dim, dtype=dtype)
        self.layer_scale_parameter = (
            torch.nn.Parameter(torch.full((dim,), layer_scale_init, dtype=dtype))
            if layer_scale_init > 0
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # [N, H, W, C]
        y = self.pwconv2(F.gelu(self.pwconv1(self.layernorm(y))))  # [N, H, W, C]
        if self.layer_scale_parameter is not None:
            y = self.layer_scale_parameter * y
        return x + y.permute(0, 3, 1, 2)  # [N, C, H, W]


class ConvNextStage(torch.nn.Module):
    """Optional downsampling (LayerNorm + 2x2 stride-2 conv), then ``depth`` blocks."""

    def __init__(self, cin: int, cout: int, depth: int, first: bool, hcfg: HighResConfig, dtype):
        super().__init__()
        self.downsampling_layer = torch.nn.ModuleList()
        if not first:
            self.downsampling_layer.append(
                torch.nn.LayerNorm(cin, eps=hcfg.layernorm_eps, dtype=dtype)
            )
            self.downsampling_layer.append(
                torch.nn.Conv2d(cin, cout, kernel_size=2, stride=2, dtype=dtype)
            )
        self.layers = torch.nn.ModuleList(
            ConvNextBlock(cout, hcfg.layernorm_eps, hcfg.layer_scale_init, dtype)
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.downsampling_layer):
            norm, conv = self.downsampling_layer
            x = conv(_layer_norm_channels_first(norm, x))  # [N, C', H/2, W/2]
        for layer in self.layers:
            x = layer(x)
        return x


class _Embeddings(torch.nn.Module):
    def __init__(self, hcfg: HighResConfig, num_channels: int, dtype):
        super().__init__()
        c0 = hcfg.dims[0]
        k = hcfg.patch_size
        self.patch_embeddings = torch.nn.Conv2d(num_channels, c0, k, stride=k, dtype=dtype)
        self.layernorm = torch.nn.LayerNorm(c0, eps=hcfg.layernorm_eps, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _layer_norm_channels_first(self.layernorm, self.patch_embeddings(x))


class _Encoder(torch.nn.Module):
    def __init__(self, hcfg: HighResConfig, dtype):
        super().__init__()
        dims = hcfg.dims
        self.stages = torch.nn.ModuleList(
            ConvNextStage(dims[max(i - 1, 0)], dims[i], hcfg.depths[i], i == 0, hcfg, dtype)
            for i in range(len(dims))
        )


class ConvNeXt(torch.nn.Module):
    """images [N, C, H, W] -> per-stage maps ``[N, dims[i], H / (4 * 2^i), W / (4 * 2^i)]``.

    Args:
        hcfg: the high-resolution config (depths, dims, stem stride, eps, layer scale).
        num_channels: input channels.
        dtype: parameter dtype.
        init_std: std of the normal init of conv and linear weights (biases zero), as
            ConvNeXt's trunc-normal init at 0.02.
    """

    def __init__(
        self,
        hcfg: HighResConfig,
        num_channels: int = 3,
        dtype: torch.dtype = torch.float32,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.hcfg = hcfg
        self.embeddings = _Embeddings(hcfg, num_channels, dtype)
        self.encoder = _Encoder(hcfg, dtype)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                    torch.nn.init.normal_(m.weight, std=init_std)
                    torch.nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.embeddings(images.to(self.embeddings.patch_embeddings.weight.dtype))
        maps = []
        for stage in self.encoder.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def multi_stage_features(self, images: torch.Tensor) -> torch.Tensor:
        """MGM's high-resolution features: [N, sum(dims), S, S], S = image side / patch_size.

        Every later stage is upsampled bilinearly (in fp32) to the first stage's size, then all
        are concatenated on channels (MGM ``OpenCLIPVisionTower.backbone``).
        """
        maps = self(images)
        size = maps[0].shape[-2:]
        ups = [maps[0]] + [
            F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False).to(m.dtype)
            for m in maps[1:]
        ]
        return torch.cat(ups, dim=1)  # [N, sum(dims), S, S]

    @staticmethod
    def forward_flops(hcfg: HighResConfig, num_channels: int = 3, num_images: int = 1) -> int:
        """Model FLOPs of one forward pass over ``num_images`` images at ``hcfg.image_size``.

        Stem ``2 * (C_in k^2 c_0) * pixels_0``; a later stage's downsampling conv
        ``2 * (4 c_{i-1} c_i) * pixels_i``; per block ``2 * pixels * (49 c + 8 c^2)`` (depthwise
        7x7, then the 4x MLP). Norms, activations, the bilinear upsampling and biases are ignored.
        """
        side = hcfg.map_size()
        k = hcfg.patch_size
        total = 2 * num_channels * k * k * hcfg.dims[0] * side * side
        for i, (c, depth) in enumerate(zip(hcfg.dims, hcfg.depths)):
            if i:
                side //= 2
                total += 2 * 4 * hcfg.dims[i - 1] * c * side * side
            total += depth * 2 * side * side * (49 * c + 8 * c * c)
        return num_images * total
