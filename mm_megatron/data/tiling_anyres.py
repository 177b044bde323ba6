"""Anyres tiling (LLaVA-NeXT, LLaVA-OneVision): an image -> base tile + best-fit grid of tiles.

What this file does, as transformers' PIL image processors ``LlavaNextImageProcessorPil`` and
``LlavaOnevisionImageProcessorPil`` do (the behavioural reference; ``tests/unit/
test_tiling_anyres.py`` compares pixels):

1. pick the best-fit resolution among ``image_grid_pinpoints`` (transformers'
   ``select_best_resolution``: the most effective pixels, then the least waste);
2. resize the image (bicubic) to fit it keeping the aspect ratio (the scaled side rounded up),
   and pad it centred with black to exactly that resolution;
3. cut it into ``tile_size`` tiles, row-major;
4. put the whole image resized (stretched) to one tile in front.

Registered as tiling scheme ``anyres`` (``model.tiling.grid_pinpoints``; the tile size is the
encoder's ``image_size``). Output is uint8 ``[t, S, S, 3]``; normalisation happens at collation.
The geometry carries the original size, from which ``ImageTokenCounter`` counts.

Not done here: OneVision's rule for samples with more than one image (each image one square tile,
padded with the mean colour and resized, as its processor does with ``batch_num_images``). A
tiler sees one image at a time, so ``model.tiling.multi_image_single_tile`` makes
``data.tiling.build_tiler`` add that one-tile tiler and ``sample_tiler`` pick it per sample;
LLaVA-NeXT (the flag off) tiles every image.

What it does not do: decide the token count (``mm_megatron.model.anyres`` and
``ImageTokenCounter`` do, from the original size), or arrange features (the model does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from transformers.image_processing_utils import select_best_resolution

from mm_megatron.config.model_config import TilingConfig
from mm_megatron.data.batch import ImageGeometry
from mm_megatron.data.image import ImageTransform
from mm_megatron.data.tiling import TiledImage, Tiler, register_tiler


def fit_size(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image resized to fit ``target_hw`` keeping its aspect ratio.

    transformers' ``get_patch_output_size``: the side with the smaller scale fills the target,
    the other is scaled and rounded up (capped at the target).
    """
    (h, w), (th, tw) = image_hw, target_hw
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), th), tw
    return th, min(math.ceil(w * scale_h), tw)


def anyres_tiles(
    img: Image.Image, pinpoints: Sequence[Sequence[int]], tile_size: int
) -> np.ndarray:
    """uint8 ``[1 + rows*cols, S, S, 3]``: the base tile, then the grid's tiles row-major.

    Args:
        img: RGB image.
        pinpoints: Candidate (height, width) resolutions, multiples of ``tile_size``.
        tile_size: Tile side S in pixels (the encoder's input size).
    """
    w, h = img.size
    best_h, best_w = select_best_resolution((h, w), [list(p) for p in pinpoints])
    new_h, new_w = fit_size((h, w), (best_h, best_w))
    resized = np.asarray(img.resize((new_w, new_h), Image.Resampling.BICUBIC))
    canvas = np.zeros((best_h, best_w, 3), dtype=np.uint8)  # black, as np.pad(constant 0)
    top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    rows, cols = best_h // tile_size, best_w // tile_size
    grid = canvas.reshape(rows, tile_size, cols, tile_size, 3).transpose(0, 2, 1, 3, 4)
    base = np.asarray(img.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return np.concatenate([base[None], grid.reshape(rows * cols, tile_size, tile_size, 3)])


def check_pinpoints(pinpoints: Sequence[Sequence[int]], tile_size: int, key: str) -> None:
    """ValueError (one line, naming ``key``) unless every pinpoint is a multiple of the tile."""
    if not pinpoints:
        raise ValueError(f"{key} is empty; anyres needs at least one (height, width)")
    for p in pinpoints:
        if len(p) != 2 or any(int(x) <= 0 or int(x) % tile_size for x in p):
            raise ValueError(
                f"{key} entry {list(p)} must be two positive multiples of the tile size {tile_size}"
            )


@dataclass(frozen=True)
class AnyresTiler:
    """Picklable tiler: one RGB image -> base tile + grid tiles, with its original size."""

    pinpoints: tuple[tuple[int, int], ...]
    """Candidate (height, width) resolutions."""

    tile_size: int
    """Tile side in pixels."""

    def __call__(self, img: Image.Image) -> TiledImage:
        tiles = anyres_tiles(img, self.pinpoints, self.tile_size)
        geometry = ImageGeometry(num_tiles=tiles.shape[0], image_size=(img.height, img.width))
        return TiledImage(tiles=tiles, geometry=geometry)


@register_tiler("anyres")
def anyres_tiler(tiling: TilingConfig, transform: ImageTransform) -> Tiler:
    """LLaVA-NeXT / OneVision anyres over ``tiling.grid_pinpoints``."""
    check_pinpoints(tiling.grid_pinpoints, transform.size, "model.tiling.grid_pinpoints")
    pins = tuple((int(h), int(w)) for h, w in tiling.grid_pinpoints)
    return AnyresTiler(pins, transform.size)
