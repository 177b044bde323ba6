"""The tiling registry: a scheme's tiles and geometry reach the batch; its count sizes samples."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from mm_megatron.config.model_config import TilingConfig
from mm_megatron.data.batch import ImageGeometry, validate_batch
from mm_megatron.data.config import DataConfig
from mm_megatron.data.image import ImageTransform
from mm_megatron.data.loader import build_dataloader
from mm_megatron.data.synthetic import write_synthetic_dataset
from mm_megatron.data.tiling import TILERS, TiledImage, build_tiler, register_tiler
from mm_megatron.model.image_tokens import ImageTokenCounter

SIZE = 16


@dataclass(frozen=True)
class LeftRight:
    """Test scheme: the left and right halves of the squared image, one row separator."""

    transform: ImageTransform

    def __call__(self, img: Image.Image) -> TiledImage:
        wide = np.asarray(img.resize((2 * SIZE, SIZE)))  # [H, 2W, 3]
        tiles = np.stack([wide[:, :SIZE], wide[:, SIZE:]])  # [2, H, W, 3]
        return TiledImage(tiles, ImageGeometry(num_tiles=2, newline_rows=1))


if "test-left-right" not in TILERS:
    register_tiler("test-left-right")(lambda tiling, transform: LeftRight(transform))


def test_none_is_one_square_tile_and_unknown_names_list_the_schemes():
    transform = ImageTransform(SIZE, "pad", "clip")
    tiled = build_tiler(None, transform)(Image.new("RGB", (40, 20), (255, 0, 0)))
    assert tiled.tiles.shape == (1, SIZE, SIZE, 3) and tiled.tiles.dtype == np.uint8
    assert tiled.geometry == ImageGeometry(num_tiles=1)
    with pytest.raises(ValueError, match=r"model.tiling.type='nope'; choose one of .*'none'"):
        build_tiler(TilingConfig(type="nope"), transform)
    with pytest.raises(ValueError, match="registered twice"):
        register_tiler("none")(lambda tiling, transform: None)


def test_a_scheme_reaches_the_batch(tmp_path):
    out = str(tmp_path / "synth")
    write_synthetic_dataset(
        out,
        n_train=12,
        n_val=4,
        image_size=24,
        shard_size=12,
        seed=1,
        multi_image_fraction=0.3,
        text_only_fraction=0.2,
    )
    config = DataConfig(
        train_shards=out,
        tokenizer_path=os.path.join(out, "tokenizer"),
        image_size=SIZE,
        max_seq_len=512,
        num_workers=0,
    )

    def batches(tiling, tokens_per_tile):
        loader = build_dataloader(
            config,
            dp_rank=0,
            dp_size=1,
            micro_batch_size=4,
            image_tokens=ImageTokenCounter(tokens_per_tile=tokens_per_tile),
            seed=0,
            num_epochs=1,
            tiling=tiling,
        )
        out = list(loader)
        for batch in out:
            validate_batch(batch, loader.image_token_id, image_size=SIZE)
        return out

    tiled = batches(TilingConfig(type="test-left-right"), 3)
    plain = batches(None, 7)  # one tile of 7 tokens: the same expanded lengths as 2 x 3 + 1
    assert len(tiled) == len(plain) == 3
    seen_images = 0
    for t, p in zip(tiled, plain):
        n = int(t["num_images"].sum())
        seen_images += n
        assert t["num_tiles"].tolist() == [2] * n and p["num_tiles"].tolist() == [1] * n
        assert t["image_tokens"].tolist() == [2 * 3 + 1] * n
        assert tuple(t["images"].shape) == (2 * n, 3, SIZE, SIZE)
        assert t["expanded_lens"].tolist() == p["expanded_lens"].tolist()
        assert t["sample_keys"] == p["sample_keys"]
    assert seen_images >= 8
