"""MiniCPM-V's ``slice_image``: a downscaled source image plus a grid of slices, with separator
tokens in the text (``model.tiling.type=minicpm_slice``).

The rule (MiniCPM-V 2.x, "adaptive visual encoding"; Yao et al. 2024, sec. 3.1):

* ``ratio = W * H / scale_resolution^2``; ``multiple = min(ceil(ratio), max_slice_nums)``.
  With ``multiple <= 1`` the image is not sliced: only the source image, resized (up or down)
  to about ``scale_resolution^2`` pixels at its aspect ratio.
* Otherwise the slice count is one of ``multiple - 1, multiple, multiple + 1`` (not 1, not over
  ``max_slice_nums``), and the grid (columns x rows) among all factorisations of those counts
  is the one whose ``log(cols / rows)`` is nearest ``log(W / H)`` (the first on ties, counts
  ascending, columns ascending).
* The source image is resized to about ``scale_resolution^2`` pixels (only down), each side a
  multiple of ``patch_size``. The image is resized to the refine size, ``grid x`` a slice size
  that is itself a multiple of the patch near ``scale_resolution^2`` pixels, and cut into the
  grid, row by row.
* Tiles go to the encoder source first, then the slices row-major. In the text, every tile is
  ``<im_start> placeholder <im_end>``; the slices follow the source inside ``<slice> ...
  </slice>``, their rows joined by ``\\n`` (MiniCPM-V 2.0's ``get_slice_image_placeholder``).
  The markers are ``model.tiling.slice_markers``; every tile has its own placeholder, so the
  connector's count (64 for the resampler) is per tile.

One deviation: this encoder takes square tiles of ``data.image_size``, so each tile (source and
slice, at its patch-multiple size) is then squared by the data transform (``data.image_aspect``),
where MiniCPM-V's SigLIP encodes each slice at its own aspect ratio.

What it does not do: decode, normalise or count tokens (``tiling.py``, ``image_tokens.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mm_megatron.config.model_config import TilingConfig
from mm_megatron.data.batch import ImageGeometry
from mm_megatron.data.image import ImageTransform
from mm_megatron.data.tiling import TiledImage, Tiler, register_tiler


def ensure_divide(length: float, patch: int) -> int:
    """``length`` rounded to the nearest multiple of ``patch`` (at least one patch)."""
    return max(round(length / patch) * patch, patch)


def best_resize(
    size: tuple[float, float], scale_resolution: int, patch: int, allow_upscale: bool = False
) -> tuple[int, int]:
    """(width, height) of about ``scale_resolution^2`` pixels at the aspect of ``size``, each a
    multiple of ``patch``; sizes already under that area stay unless ``allow_upscale``."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        aspect = width / height
        height = int(scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)
    return ensure_divide(width, patch), ensure_divide(height, patch)


def choose_grid(size: tuple[int, int], max_slices: int, scale_resolution: int) -> tuple[int, int]:
    """(columns, rows) of the slice grid; (1, 1) means: do not slice."""
    width, height = size
    multiple = min(math.ceil(width * height / scale_resolution**2), max_slices)
    if multiple <= 1:
        return 1, 1
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if 1 < n <= max_slices]
    grids = [(c, n // c) for n in counts for c in range(1, n + 1) if n % c == 0]
    log_ratio = math.log(width / height)
    return min(grids, key=lambda g: abs(log_ratio - math.log(g[0] / g[1])))


def refine_size(
    size: tuple[int, int], grid: tuple[int, int], scale_resolution: int, patch: int
) -> tuple[int, int]:
    """Size the image is resized to before cutting: ``grid`` x a patch-multiple slice size."""
    cols, rows = grid
    slice_w = ensure_divide(size[0], cols) / cols
    slice_h = ensure_divide(size[1], rows) / rows
    best_w, best_h = best_resize((slice_w, slice_h), scale_resolution, patch, allow_upscale=True)
    return best_w * cols, best_h * rows


def slice_image(
    img: Image.Image, max_slices: int, scale_resolution: int, patch: int
) -> tuple[Image.Image, list[Image.Image], tuple[int, int]]:
    """(source image, slices row-major, (columns, rows)); no slices when the grid is 1 x 1."""
    grid = choose_grid(img.size, max_slices, scale_resolution)
    if grid == (1, 1):
        size = best_resize(img.size, scale_resolution, patch, allow_upscale=True)
        return img.resize(size, Image.Resampling.BICUBIC), [], grid
    source = img.resize(best_resize(img.size, scale_resolution, patch), Image.Resampling.BICUBIC)
    refined = img.resize(
        refine_size(img.size, grid, scale_resolution, patch), Image.Resampling.BICUBIC
    )
    cols, rows = grid
    w, h = refined.width // cols, refined.height // rows
    slices = [
        refined.crop((c * w, r * h, (c + 1) * w, (r + 1) * h))
        for r in range(rows)
        for c in range(cols)
    ]
    return source, slices, grid


def slice_layout(
    grid: tuple[int, int], markers: tuple[str, str, str, str]
) -> tuple[str | None, ...]:
    """The text around the tiles (``TiledImage.layout``: None is one tile's placeholder)."""
    tile_start, tile_end, slices_start, slices_end = markers
    tile = (tile_start, None, tile_end)
    if grid == (1, 1):
        return tile
    cols, rows = grid
    body: list[str | None] = []
    for r in range(rows):
        body += ["\n"] if r else []
        body += tile * cols
    return (*tile, slices_start, *body, slices_end)


@dataclass(frozen=True)
class MiniCPMSlicer:
    """One image -> source + slices, squared to the encoder's size, with their text layout."""

    transform: ImageTransform
    """Squares each tile to the encoder's size."""

    max_slices: int
    """``tiling.max_slice_nums``."""

    scale_resolution: int
    """``tiling.scale_resolution``."""

    patch: int
    """``tiling.slice_patch_size``."""

    markers: tuple[str, str, str, str]
    """Tile start, tile end, slices start, slices end."""

    def __call__(self, img: Image.Image) -> TiledImage:
        source, slices, grid = slice_image(img, self.max_slices, self.scale_resolution, self.patch)
        tiles = np.stack([np.asarray(self.transform.square(t)) for t in (source, *slices)])
        return TiledImage(
            tiles=tiles,  # [1 + cols * rows, H, W, 3]
            geometry=ImageGeometry(num_tiles=tiles.shape[0]),
            layout=slice_layout(grid, self.markers),
        )


@register_tiler("minicpm_slice")
def minicpm_slice(tiling: TilingConfig, transform: ImageTransform) -> Tiler:
    """MiniCPM-V's ``slice_image`` (module docstring)."""
    markers = tuple(tiling.slice_markers.split())
    if len(markers) != 4:
        raise ValueError(
            f"model.tiling.slice_markers={tiling.slice_markers!r} must be 4 space-separated "
            "tokens: tile start, tile end, slices start, slices end"
        )
    for name in ("max_slice_nums", "scale_resolution", "slice_patch_size"):
        if getattr(tiling, name) < 1:
            raise ValueError(f"model.tiling.{name}={getattr(tiling, name)} must be >= 1")
    return MiniCPMSlicer(
        transform,
        tiling.max_slice_nums,
        tiling.scale_resolution,
        tiling.slice_patch_size,
        markers,  # type: ignore[arg-type]
    )
