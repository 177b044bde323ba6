"""InternVL's dynamic tiles: a grid of square tiles at the closest aspect ratio, plus a thumbnail.

Behavioural reference: transformers' ``GotOcr2ImageProcessorPil.crop_image_to_patches`` (the
image processor of ``InternVLProcessor`` with ``crop_to_patches=True``; transformers 5.24 also
ships a torchvision variant, ``GotOcr2ImageProcessor``, which resizes in float and so differs in
the last bits; the PIL one resizes the uint8 image as this pipeline does and is the reference):

* candidate grids: every ``cols x rows`` with ``min_patches <= cols * rows <= max_patches``,
  sorted by tile count (stable, so equal counts keep column-major enumeration order);
* the grid whose ``cols / rows`` is closest to the image's ``width / height`` wins; on an exact
  tie the later (larger) grid wins only while the image's area exceeds half the grid's pixel
  area (InternVL's rule against needless tiles);
* the image is resized (bicubic) to ``cols * S x rows * S`` and cut row-major into ``S x S``
  tiles (``S`` = the transform's size); when that gives more than one tile and
  ``use_thumbnail`` is on, the whole image resized to ``S x S`` is appended last.

The tile count travels in the sample's ``ImageGeometry(num_tiles=...)``; the model encodes every
tile alike and the token count is ``num_tiles x`` the projector's tokens per tile.

With ``model.tiling.image_markers`` (``<img> </img>`` in the InternVL presets and in checkpoints
converted from transformers), each image's placeholder is put between the two texts
(``TiledImage.wrap``), as InternVL's training data and ``InternVLProcessor`` have it:
``<img>`` + one placeholder expanding into all the image's tokens + ``</img>``.

What it does not do: normalise (``collate_rows`` does, with the data config's ``image_norm``;
InternVL checkpoints want ``imagenet``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from mm_megatron.config.model_config import TilingConfig
from mm_megatron.data.batch import ImageGeometry
from mm_megatron.data.image import ImageTransform
from mm_megatron.data.tiling import TiledImage, Tiler, register_tiler


@lru_cache(maxsize=16)
def candidate_grids(min_patches: int, max_patches: int) -> tuple[tuple[int, int], ...]:
    """``(cols, rows)`` grids with ``min_patches <= cols * rows <= max_patches``, fewest first."""
    grids = [
        (c, r)
        for c in range(1, max_patches + 1)
        for r in range(1, max_patches + 1)
        if min_patches <= c * r <= max_patches
    ]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(
    width: int, height: int, tile: int, min_patches: int, max_patches: int
) -> tuple[int, int]:
    """``(cols, rows)`` of the closest-aspect-ratio grid, with InternVL's tie-break.

    Args:
        width: image width in pixels.
        height: image height in pixels.
        tile: tile side in pixels.
        min_patches: fewest tiles of the grid (thumbnail not counted).
        max_patches: most tiles of the grid (thumbnail not counted).
    """
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_patches, max_patches):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


@dataclass(frozen=True)
class DynamicTiler:
    """One image -> its grid tiles (row-major) and, if more than one, a thumbnail."""

    size: int
    """Tile side in pixels (the encoder's image size)."""
    min_patches: int
    """Fewest grid tiles."""
    max_patches: int
    """Most grid tiles."""
    use_thumbnail: bool
    """Append the whole image as one more tile when the grid has several."""
    wrap: tuple[str, str] | None = None
    """Text before and after each image's placeholder (``model.tiling.image_markers``)."""

    def __call__(self, img: Image.Image) -> TiledImage:
        s = self.size
        if self.max_patches <= 1:  # HF: crop_to_patches needs max_patches > 1
            tile = np.asarray(img.resize((s, s), Image.Resampling.BICUBIC))  # [S, S, 3]
            return TiledImage(tiles=tile[None], geometry=ImageGeometry(1), wrap=self.wrap)
        cols, rows = choose_grid(img.width, img.height, s, self.min_patches, self.max_patches)
        canvas = np.asarray(img.resize((cols * s, rows * s), Image.Resampling.BICUBIC))
        grid = canvas.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4)  # [r, c, S, S, 3]
        tiles = grid.reshape(rows * cols, s, s, 3)  # row-major [t, S, S, 3]
        if self.use_thumbnail and rows * cols > 1:
            thumb = np.asarray(img.resize((s, s), Image.Resampling.BICUBIC))
            tiles = np.concatenate([tiles, thumb[None]])
        tiles = np.ascontiguousarray(tiles)
        geometry = ImageGeometry(num_tiles=tiles.shape[0])
        return TiledImage(tiles=tiles, geometry=geometry, wrap=self.wrap)


@register_tiler("internvl_dynamic")
def internvl_dynamic(tiling: TilingConfig, transform: ImageTransform) -> Tiler:
    """InternVL's dynamic tiling at the encoder's size (``transform.size``)."""
    if not 1 <= tiling.min_patches <= tiling.max_patches:
        raise ValueError(
            f"model.tiling: need 1 <= min_patches <= max_patches, got min_patches="
            f"{tiling.min_patches}, max_patches={tiling.max_patches}"
        )
    markers = tiling.image_markers.split()
    if len(markers) not in (0, 2):
        raise ValueError(
            f"model.tiling.image_markers={tiling.image_markers!r}: expected two space-separated "
            "texts (before and after each image, e.g. '<img> </img>') or nothing"
        )
    return DynamicTiler(
        size=transform.size,
        min_patches=tiling.min_patches,
        max_patches=tiling.max_patches,
        use_thumbnail=tiling.use_thumbnail,
        wrap=(markers[0], markers[1]) if markers else None,
    )
