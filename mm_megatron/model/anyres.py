"""Anyres feature arrangement (LLaVA-NeXT, LLaVA-OneVision): grid -> unpad -> newline -> base.

An anyres image reaches the encoder as ``1 + rows * cols`` tiles: the whole image resized to one
tile, then the best-fit grid's tiles row-major (``mm_megatron.data.tiling_anyres`` cuts them).
After the projector each tile is a ``side x side`` grid of embeddings. This module puts one
image's tile features back together the way transformers' ``pack_image_features`` does
(the LLaVA-NeXT blog post of 2024-01-30; LLaVA-OneVision, arXiv:2408.03326; transformers
``modeling_llava_next.py`` / ``modeling_llava_onevision.py``):

1. stitch the grid tiles into one ``[h, rows*side, cols*side]`` feature map;
2. unpad: drop the feature rows (or columns) that only saw the resize-and-pad padding, so the
   map keeps the original aspect ratio;
3. OneVision (``max_grid_patches = N`` of ``anyres_max_N``): when the map holds more than
   ``1.1^2 * N`` tiles' worth of features, shrink it bilinearly to fit;
4. append the learned ``image_newline`` after each feature row;
5. prepend the base tile's features.

A single-tile image (each image of a OneVision sample with several images,
``tiling.multi_image_single_tile``) is its features plus one newline.

:class:`AnyresArrangement` states the resulting count (``ImageTokenCounter`` asks it, so the data
pipeline and the model cannot disagree) and arranges the features. What it does not do: cut
images into tiles, encode or project them, or own the ``image_newline`` parameter (the model
does). Pure computation: no process groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.image_processing_utils import select_best_resolution

from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.data.batch import ImageGeometry
from mm_megatron.model.image_tokens import register_arrangement
from mm_megatron.model.projector import projector_class


@dataclass(frozen=True)
class AnyresArrangement:
    """How one anyres image's tile features become its LM embeddings (picklable)."""

    side: int
    """Embeddings per tile side after the projector (``image_size // patch_size``)."""

    tile_size: int
    """Tile side in pixels (the encoder's ``image_size``)."""

    pinpoints: tuple[tuple[int, int], ...]
    """Candidate ``(height, width)`` resolutions in pixels (``image_grid_pinpoints``)."""

    max_grid_patches: int = 0
    """OneVision's ``anyres_max_N``: the grid's feature budget in tiles; 0 = no limit."""

    def grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the tile grid chosen for an image of ``(height, width)`` pixels."""
        height, width = select_best_resolution(tuple(image_hw), [list(p) for p in self.pinpoints])
        return height // self.tile_size, width // self.tile_size

    def num_tiles(self, image_hw: tuple[int, int]) -> int:
        """Encoder tiles of an anyres image: the base tile plus the grid."""
        rows, cols = self.grid(image_hw)
        return 1 + rows * cols

    def unpadded_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Feature-map (height, width) after unpadding, before any down-scaling.

        transformers' ``unpad_image``: scale the original size onto the map's long-fitting side,
        round to 7 decimals, and cut the padding evenly (an odd pad keeps one extra row).
        """
        rows, cols = self.grid(image_hw)
        cur_h, cur_w = rows * self.side, cols * self.side
        orig_h, orig_w = image_hw
        if orig_w / orig_h > cur_w / cur_h:
            new_h = int(round(orig_h * (cur_w / orig_w), 7))
            pad = (cur_h - new_h) // 2
            return cur_h - 2 * pad, cur_w
        new_w = int(round(orig_w * (cur_h / orig_h), 7))
        pad = (cur_w - new_w) // 2
        return cur_h, cur_w - 2 * pad

    def feature_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Feature-map (height, width) that gets newlines: unpadded, then OneVision-shrunk."""
        h, w = self.unpadded_hw(image_hw)
        ratio = self._shrink_ratio(h, w)
        if ratio is None:
            return h, w
        return int(h // ratio), int(w // ratio)

    def _shrink_ratio(self, h: int, w: int) -> float | None:
        if not self.max_grid_patches:
            return None
        ratio = math.sqrt(h * w / (self.max_grid_patches * self.side**2))
        return ratio if ratio > 1.1 else None

    def num_tokens(self, geometry: ImageGeometry) -> int:
        """LM embeddings of one image: base + rows x (cols + newline), or one tile + newline."""
        if geometry.num_tiles == 1:
            return self.side * self.side + 1
        if geometry.image_size is None:
            raise ValueError(
                f"an anyres image of {geometry.num_tiles} tiles needs its original size "
                "(ImageGeometry.image_size) to be counted"
            )
        h, w = self.feature_hw(geometry.image_size)
        return self.side * self.side + h * (w + 1)

    def check_tiles(self, num_tiles: int, image_hw: tuple[int, int], index: int) -> None:
        """ValueError (one line) if image ``index`` has a tile count its size cannot give."""
        expected = self.num_tiles(image_hw)
        if num_tiles not in (1, expected):
            raise ValueError(
                f"image {index} of size {tuple(image_hw)} has {num_tiles} tiles; anyres with "
                f"pinpoints {list(self.pinpoints)} gives 1 or {expected}"
            )

    def arrange(
        self, feats: torch.Tensor, image_hw: tuple[int, int], newline: torch.Tensor
    ) -> torch.Tensor:
        """One image's tile features ``[t, side*side, h]`` -> its embeddings ``[n_tokens, h]``.

        Args:
            feats: projected features of the image's tiles, base tile first.
            image_hw: original (height, width) in pixels.
            newline: the learned ``image_newline`` embedding ``[h]``.
        """
        t, _, hidden = feats.shape
        if t == 1:
            return torch.cat([feats[0], newline[None].to(feats.dtype)])  # [side^2 + 1, h]
        rows, cols = self.grid(image_hw)
        s = self.side
        grid = feats[1:].reshape(rows, cols, s, s, hidden)  # [rows, cols, s, s, h]
        fmap = grid.permute(4, 0, 2, 1, 3).reshape(hidden, rows * s, cols * s)  # [h, H, W]
        h, w = self.unpadded_hw(image_hw)
        top, left = (rows * s - h) // 2, (cols * s - w) // 2
        fmap = fmap[:, top : top + h, left : left + w]  # [h, h_feat, w_feat]
        ratio = self._shrink_ratio(h, w)
        if ratio is not None:
            size = [int(h // ratio), int(w // ratio)]
            fmap = torch.nn.functional.interpolate(fmap[None], size, mode="bilinear")[0]
        nl = newline.to(fmap.dtype)[:, None, None].expand(hidden, fmap.shape[1], 1)
        fmap = torch.cat([fmap, nl], dim=2)  # [h, h_feat, w_feat + 1]
        return torch.cat([feats[0], fmap.flatten(1).transpose(0, 1)])  # [n_tokens, h]


@register_arrangement("anyres")
def anyres_arrangement(cfg: LlavaConfig) -> AnyresArrangement:
    """The arrangement of ``cfg`` (ValueError if its projector does not keep the patch grid)."""
    v = cfg.vision
    side = v.image_size // v.patch_size
    kept = projector_class(cfg.projector.type).num_output_tokens(cfg.projector, v.num_output_tokens)
    if kept != side * side:
        raise ValueError(
            f"tiling.type='anyres' needs a {side}x{side} feature grid per tile; vision + "
            f"projector.type={cfg.projector.type!r} give {kept} tokens (keep the class token out: "
            "vision.drop_class_token=true; use a projector that keeps the token count)"
        )
    pins = tuple((int(h), int(w)) for h, w in cfg.tiling.grid_pinpoints)
    return AnyresArrangement(side, v.image_size, pins, cfg.tiling.max_grid_patches)
