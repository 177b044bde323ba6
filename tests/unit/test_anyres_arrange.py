"""Anyres feature arrangement against transformers' ``pack_image_features``, and the count.

The model's reassembly (``model/anyres.py``: unpad, OneVision down-scaling, newline per row,
base first) must give the same embeddings as transformers' LLaVA-NeXT and LLaVA-OneVision for
the same tile features, and ``ImageTokenCounter`` must state exactly their length.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

from mm_megatron.config import get_preset
from mm_megatron.data.batch import ImageGeometry
from mm_megatron.model.image_tokens import ImageTokenCounter

SIZES = [(50, 90), (120, 40), (70, 70), (33, 101), (200, 64), (64, 250), (128, 128), (200, 190)]


def _hf_self(cfg):
    vision = SimpleNamespace(image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size)
    return SimpleNamespace(
        config=SimpleNamespace(vision_config=vision, image_grid_pinpoints=cfg.tiling.grid_pinpoints)
    )


def _check(cfg, pack):
    counter = ImageTokenCounter.from_config(cfg)
    arr = counter.arrangement
    gen = torch.Generator().manual_seed(0)
    h = 8
    newline = torch.randn(h, generator=gen)
    for size in SIZES:
        t = arr.num_tiles(size)
        feats = torch.randn(t, arr.side * arr.side, h, generator=gen)
        ref = pack([feats], torch.tensor([size]), newline)[0]
        got = arr.arrange(feats, size, newline)
        assert got.shape == ref.shape, size
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        assert counter(ImageGeometry(num_tiles=t, image_size=size)) == ref.shape[0]
    single = torch.randn(1, arr.side * arr.side, h, generator=gen)  # one-tile image
    ref = pack([single], torch.tensor([[40, 40]]), newline)[0]
    torch.testing.assert_close(arr.arrange(single, (40, 40), newline), ref, rtol=0, atol=0)
    assert counter(ImageGeometry(num_tiles=1)) == ref.shape[0]


def test_llava_next_arrangement_matches_transformers():
    cfg = get_preset("debug-tiny-anyres")
    hf = _hf_self(cfg)

    def pack(feats, sizes, newline):
        return LlavaNextModel.pack_image_features(hf, feats, sizes, "default", newline)[0]

    _check(cfg, pack)


def test_onevision_arrangement_and_downscale_match_transformers():
    cfg = get_preset("debug-tiny-anyres")
    # grids up to 3x3 tiles with a budget of 2 tiles: the larger grids shrink bilinearly
    cfg.tiling.grid_pinpoints = [[64 * r, 64 * c] for r in (1, 2, 3) for c in (1, 2, 3)]
    cfg.tiling.max_grid_patches = 2
    hf = _hf_self(cfg)
    arr = ImageTokenCounter.from_config(cfg).arrangement
    assert arr.feature_hw((200, 190)) != arr.unpadded_hw((200, 190))  # the shrink is exercised

    def pack(feats, sizes, newline):
        return LlavaOnevisionModel.pack_image_features(
            hf, feats, sizes, newline, vision_aspect_ratio="anyres_max_2"
        )[0]

    _check(cfg, pack)


def test_anyres_needs_a_kept_patch_grid():
    cfg = get_preset("debug-tiny-anyres")
    cfg.projector.type = "mlp2x_gelu_pool2"
    with pytest.raises(ValueError, match="tiling.type='anyres' needs a 4x4 feature grid"):
        ImageTokenCounter.from_config(cfg)
    arr = ImageTokenCounter.from_config(get_preset("debug-tiny-anyres")).arrangement
    with pytest.raises(ValueError, match=r"image 3 of size \(50, 90\) has 2 tiles"):
        arr.check_tiles(2, (50, 90), 3)
    with pytest.raises(ValueError, match="needs its original size"):
        ImageTokenCounter.from_config(get_preset("debug-tiny-anyres"))(ImageGeometry(num_tiles=3))
