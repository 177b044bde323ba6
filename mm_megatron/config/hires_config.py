"""Config of a high-resolution auxiliary encoder beside the ViT (MGM / Mini-Gemini's dual encoder).

MGM (Li et al. 2024, "Mini-Gemini: Mining the Potential of Multi-modality Vision Language
Models", github.com/dvlab-research/MGM) feeds the language model the low-resolution CLIP tokens,
each refined by attending to the ConvNeXt features of its own sub-region of a high-resolution
copy of the image ("patch-info mining"). :class:`HighResConfig` describes that second encoder and
the low-resolution grid; ``VisionConfig.hires`` holds it (with ``vision.style="mgm"``), and
``type="none"`` (the default) means a plain single-encoder model.

What this file does not do: build anything (``mm_megatron/model/mgm.py`` does), or know the
parallel layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HIRES_TYPES = ("none", "convnext")
"""Known high-resolution encoders: ``none`` (no dual encoder) or ``convnext`` (MGM)."""


@dataclass
class HighResConfig:
    """A ConvNeXt high-resolution encoder + patch-info mining (MGM); ``type="none"`` disables it."""

    type: str = "none"
    """``none`` (single encoder) or ``convnext`` (MGM dual encoder: the data pipeline delivers
    the image at ``image_size``; the model derives the low-resolution CLIP input from it)."""
    image_size: int = 768
    """Square resolution of the high-resolution image the data pipeline delivers (MGM: 768;
    MGM-HD: 1536)."""
    depths: list[int] = field(default_factory=lambda: [3, 3, 27, 3])
    """ConvNeXt blocks per stage (ConvNeXt-L: 3, 3, 27, 3)."""
    dims: list[int] = field(default_factory=lambda: [192, 384, 768, 1536])
    """ConvNeXt channels per stage (ConvNeXt-L: 192, 384, 768, 1536); the mined features have
    their sum (2880) channels."""
    patch_size: int = 4
    """ConvNeXt stem stride (the first stage's map is ``image_size / patch_size`` on a side)."""
    layernorm_eps: float = 1e-6
    """Epsilon of the ConvNeXt LayerNorms."""
    layer_scale_init: float = 1e-6
    """Initial ConvNeXt layer-scale value (0 disables layer scale)."""
    mining_layernorm_eps: float = 1e-5
    """Epsilon of the mining's query/key/value LayerNorms (``torch.nn.LayerNorm`` default)."""
    grid: int = 1
    """Low-resolution crops per side: 1 is MGM (one 336 image); 2 is MGM-HD (a 2x2 grid of 336
    crops of a 672 image, high resolution 1536)."""
    global_image: bool = False
    """With ``grid > 1``, also encode the whole image at low resolution (MGM-HD: 5 x 576
    tokens, the global image's first)."""
    vit_style: str = "clip"
    """Style of the low-resolution ViT (``clip``: MGM's CLIP-L/14; ``siglip``)."""

    @property
    def enabled(self) -> bool:
        """A dual encoder is configured."""
        return self.type != "none"

    @property
    def feature_channels(self) -> int:
        """Channels of the concatenated multi-stage high-resolution map."""
        return sum(self.dims)

    @property
    def low_res_images(self) -> int:
        """ViT passes per image: the grid crops plus the global image."""
        return self.grid * self.grid + (1 if self.global_image and self.grid > 1 else 0)

    def map_size(self) -> int:
        """Side of the first stage's (and so the concatenated) high-resolution map."""
        return self.image_size // self.patch_size

    def validate(self, low_res_grid: int) -> None:
        """Raise ValueError (one line, naming the field) if the geometry does not fit.

        Args:
            low_res_grid: the ViT's patch grid side (``vision.image_size // patch_size``).
        """
        if self.type not in HIRES_TYPES:
            raise ValueError(f"vision.hires.type must be one of {HIRES_TYPES}, got {self.type!r}")
        if not self.enabled:
            return
        if len(self.depths) != len(self.dims) or not self.dims:
            raise ValueError(
                f"vision.hires.depths {self.depths} and vision.hires.dims {self.dims} must be "
                "non-empty lists of the same length (one entry per ConvNeXt stage)"
            )
        if self.grid < 1:
            raise ValueError(f"vision.hires.grid must be >= 1, got {self.grid}")
        stride = self.patch_size * 2 ** (len(self.dims) - 1)
        if self.image_size % stride:
            raise ValueError(
                f"vision.hires.image_size={self.image_size} is not a multiple of the ConvNeXt's "
                f"total stride {stride} (patch_size {self.patch_size} x 2 per later stage)"
            )
        side = self.map_size()
        cells = low_res_grid * self.grid
        if side % cells:
            raise ValueError(
                f"vision.hires.image_size={self.image_size} gives a {side}x{side} feature map, not "
                f"divisible into {cells}x{cells} sub-regions (vision grid {low_res_grid} x "
                f"vision.hires.grid {self.grid}); use a multiple of {cells * self.patch_size}"
            )
        if self.global_image and self.grid == 1:
            raise ValueError("vision.hires.global_image=true needs vision.hires.grid > 1 (MGM-HD)")
