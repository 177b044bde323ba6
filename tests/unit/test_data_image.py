"""Image preprocessing: pad-to-square geometry, resize/crop, normalisation, decode errors."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from mm_megatron.data.image import (
    CLIP_MEAN,
    CLIP_STD,
    ImageDecodeError,
    ImageTransform,
    decode_image,
    expand_to_square,
)

RED = (255, 0, 0)


def _red(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), RED)


def test_expand_to_square_centres_the_image():
    wide = expand_to_square(_red(40, 20), (1, 2, 3))
    assert wide.size == (40, 40)
    assert wide.getpixel((20, 9)) == (1, 2, 3) and wide.getpixel((20, 30)) == (1, 2, 3)
    assert wide.getpixel((0, 10)) == RED and wide.getpixel((39, 29)) == RED
    tall = expand_to_square(_red(10, 30), (1, 2, 3))
    assert tall.size == (30, 30)
    assert tall.getpixel((9, 15)) == (1, 2, 3) and tall.getpixel((10, 15)) == RED
    assert tall.getpixel((19, 15)) == RED and tall.getpixel((20, 15)) == (1, 2, 3)


def test_pad_mode_geometry_and_clip_normalisation():
    transform = ImageTransform(size=32, aspect="pad", norm="clip")
    assert transform.background == tuple(int(m * 255) for m in CLIP_MEAN)
    square = transform.square(_red(40, 20))  # 40x40 canvas, image rows 10..29 -> 8..23 at 32
    assert square.size == (32, 32)
    assert square.getpixel((16, 2)) == transform.background
    assert square.getpixel((16, 16)) == RED
    pixels = transform(_red(40, 20))
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    expected_red = torch.tensor([(c / 255 - m) / s for c, m, s in zip(RED, CLIP_MEAN, CLIP_STD)])
    torch.testing.assert_close(pixels[:, 16, 16], expected_red, atol=1e-5, rtol=0)
    # The mean-colour padding normalises to (almost) zero: it only differs by int() rounding.
    assert pixels[:, 2, 16].abs().max() < 0.02
    assert pixels[:, 30, 16].abs().max() < 0.02


def test_resize_and_crop_fill_the_square():
    for aspect in ("resize", "crop"):
        pixels = ImageTransform(size=24, aspect=aspect, norm="clip")(_red(40, 20))
        assert pixels.shape == (3, 24, 24)
        torch.testing.assert_close(pixels[:, 0, 0], pixels[:, 23, 23])
    cropped = ImageTransform(size=20, aspect="crop").square(Image.new("RGB", (60, 20), (0, 0, 0)))
    assert cropped.size == (20, 20)


def test_siglip_normalisation_maps_to_minus_one_one():
    transform = ImageTransform(size=8, aspect="resize", norm="siglip")
    assert transform(Image.new("RGB", (8, 8), (255, 255, 255))).eq(1.0).all()
    assert transform(Image.new("RGB", (8, 8), (0, 0, 0))).eq(-1.0).all()


def test_decode_errors():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), RED).save(buf, format="JPEG")
    good = buf.getvalue()
    assert decode_image(good).size == (64, 64)
    with pytest.raises(ImageDecodeError):
        decode_image(b"definitely not an image")
    with pytest.raises(ImageDecodeError):
        decode_image(good[: len(good) // 2])
    gray = io.BytesIO()
    Image.new("L", (5, 7), 128).save(gray, format="PNG")
    assert decode_image(gray.getvalue()).mode == "RGB"


def test_bad_options_raise():
    with pytest.raises(ValueError):
        ImageTransform(size=8, aspect="stretch")
    with pytest.raises(ValueError):
        ImageTransform(size=8, norm="inception")
