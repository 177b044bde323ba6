"""Image decoding and preprocessing for the vision encoder (pillow + torch, CPU).

What this file does: decodes encoded image bytes with pillow (`decode_image`), makes the image
square (`pad`: LLaVA's expand2square, pasting it centred on a canvas filled with the
normalisation mean colour; `resize`: stretch; `crop`: resize the short side and centre-crop, as
CLIPImageProcessor does), resizes with bicubic resampling and normalises to a float32 [3, H, W]
tensor with CLIP or SigLIP mean/std (`ImageTransform`).

What it does not do: augmentation, dynamic resolution / tiling (AnyRes), or video.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP image mean (RGB, 0..1)."""

CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP image std (RGB, 0..1)."""

SIGLIP_MEAN = (0.5, 0.5, 0.5)
"""SigLIP image mean."""

SIGLIP_STD = (0.5, 0.5, 0.5)
"""SigLIP image std."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""ImageNet mean (InternVL's processors)."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""ImageNet std (InternVL's processors)."""
NORMALIZATIONS = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "siglip": (SIGLIP_MEAN, SIGLIP_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}
"""Normalisation name -> (mean, std)."""


class ImageDecodeError(ValueError):
    """Image bytes that pillow cannot decode (corrupt, truncated or not an image)."""


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully into an RGB pillow image.

    Args:
        data: The encoded file (jpeg, png, webp, ...).

    Raises:
        ImageDecodeError: on any decoding failure, truncated files included.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:  # pillow raises OSError, SyntaxError, ValueError, DecompressionBomb...
        raise ImageDecodeError(f"{type(e).__name__}: {e}") from e


def expand_to_square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square canvas of side max(w, h), image centred (LLaVA's expand2square).

    Args:
        img: RGB image.
        background: Fill colour, 0..255 per channel.
    """
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), background)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def _resize_short_side_and_crop(img: Image.Image, size: int) -> Image.Image:
    # The long side is truncated, as transformers' get_resize_output_image_size, torchvision's
    # resize and OpenAI CLIP compute it: int(size * long / short), never rounded.
    width, height = img.size
    short, long = min(width, height), max(width, height)
    new_long = max(size, int(size * long / short))
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class ImageTransform:
    """Square-ify, resize and normalise one image for the vision encoder."""

    size: int
    """Output side in pixels."""

    aspect: str = "pad"
    """pad, resize or crop (see the module docstring)."""

    norm: str = "clip"
    """Key of `NORMALIZATIONS`."""

    def __post_init__(self):
        if self.aspect not in ("pad", "resize", "crop"):
            raise ValueError(f"image aspect {self.aspect!r}; choose pad, resize or crop")
        if self.norm not in NORMALIZATIONS:
            raise ValueError(f"image norm {self.norm!r}; choose one of {sorted(NORMALIZATIONS)}")

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel mean (0..1)."""
        return NORMALIZATIONS[self.norm][0]

    @property
    def std(self) -> tuple[float, float, float]:
        """Per-channel std (0..1)."""
        return NORMALIZATIONS[self.norm][1]

    @property
    def background(self) -> tuple[int, int, int]:
        """Padding colour for `pad`: the mean colour, as LLaVA computes it (int(x * 255))."""
        return tuple(int(x * 255) for x in self.mean)

    def square(self, img: Image.Image) -> Image.Image:
        """The RGB image made square and resized to `size` x `size` (no normalisation)."""
        if self.aspect == "crop":
            return _resize_short_side_and_crop(img, self.size)
        if self.aspect == "pad":
            img = expand_to_square(img, self.background)
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return img

    def pixels(self, data: bytes) -> np.ndarray:
        """Decode, square and resize encoded image bytes -> uint8 [size, size, 3] (not normalised).

        The loader's workers stop here: uint8 is 4x less to send to the training process than
        float32, and `normalize_pixels` then writes straight into the batch.
        """
        return np.asarray(self.square(decode_image(data)))

    def normalize_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [..., H, W, 3] -> float32 [..., 3, H, W], (x / 255 - mean) / std.

        numpy in place and single-threaded: ~10x faster than a naive float pipeline, and immune
        to torch intra-op thread contention in the training process.
        """
        out = np.empty((*pixels.shape[:-3], 3, *pixels.shape[-3:-1]), dtype=np.float32)
        np.copyto(out, np.moveaxis(pixels, -1, -3))
        out *= np.array([1.0 / (255.0 * s) for s in self.std], dtype=np.float32)[:, None, None]
        out += np.array([-m / s for m, s in zip(self.mean, self.std)], dtype=np.float32)[
            :, None, None
        ]
        return out

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Square, resize and normalise an RGB image -> float32 [3, size, size]."""
        return torch.from_numpy(self.normalize_pixels(np.asarray(self.square(img))))

    def from_bytes(self, data: bytes) -> torch.Tensor:
        """Decode and transform encoded image bytes -> float32 [3, size, size]."""
        return torch.from_numpy(self.normalize_pixels(self.pixels(data)))
