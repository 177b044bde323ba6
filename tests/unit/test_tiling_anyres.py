"""Anyres tiling against transformers' PIL image processors (the behavioural reference).

LLaVA-NeXT's ``LlavaNextImageProcessorPil`` and LLaVA-OneVision's
``LlavaOnevisionImageProcessorPil`` (transformers also ships torchvision "fast" processors; the
PIL ones are the reference here): same tile count, normalised pixels within 1e-5, for images of
several aspect ratios, at a tiny tile size and at LLaVA-NeXT's real 336 px settings. Samples of
two and three images through ``SampleProcessor``: OneVision's processor (``batch_num_images``)
gives each image one padded square tile and ``LlavaOnevisionProcessor`` counts its tokens as we
do; a single-image sample keeps its grid; LLaVA-NeXT tiles every image.
"""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from mm_megatron.config.model_config import TilingConfig
from mm_megatron.config.presets_llava_next import LLAVA_NEXT_PINPOINTS
from mm_megatron.convert.hf_config import llava_config_from_hf
from mm_megatron.convert.llava_next import NEXT, ONEVISION, tiny_anyres_config
from mm_megatron.data.batch import ImageGeometry
from mm_megatron.data.config import DataConfig
from mm_megatron.data.image import ImageTransform
from mm_megatron.data.samples import SampleProcessor
from mm_megatron.data.tiling import build_tiler
from mm_megatron.data.tokenizer import load_tokenizer, prepare_tokenizer, train_tiny_tokenizer
from mm_megatron.model.image_tokens import ImageTokenCounter

PINS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
SIZES = [(50, 90), (120, 40), (70, 70), (33, 101), (20, 30), (200, 64)]  # (height, width)


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _ours(img, pins, size, norm):
    transform = ImageTransform(size, "pad", norm)
    tiled = build_tiler(TilingConfig(type="anyres", grid_pinpoints=pins), transform)(img)
    return transform.normalize_pixels(tiled.tiles), tiled.geometry


def test_llava_next_processor_agreement():
    proc = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINS
    )
    worst = 0.0
    for i, (h, w) in enumerate(SIZES):
        img = _image(h, w, i)
        ref = proc(img, return_tensors="np")["pixel_values"][0]  # [t, 3, 32, 32]
        got, geometry = _ours(img, PINS, 32, "clip")
        assert got.shape == ref.shape, (h, w)
        assert geometry == ImageGeometry(num_tiles=ref.shape[0], image_size=(h, w))
        worst = max(worst, float(np.abs(got - ref).max()))
    assert worst <= 1e-5, worst


def test_llava_next_processor_agreement_at_336():
    proc = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
    )
    img = _image(600, 800, 7)  # best fit 672x672: base + 2x2
    ref = proc(img, return_tensors="np")["pixel_values"][0]
    got, _ = _ours(img, LLAVA_NEXT_PINPOINTS, 336, "clip")
    assert got.shape == ref.shape == (5, 3, 336, 336)
    assert float(np.abs(got - ref).max()) <= 1e-5


def test_onevision_processor_agreement():
    proc = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32},
        image_grid_pinpoints=PINS,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    for i, (h, w) in enumerate(SIZES):
        img = _image(h, w, 10 + i)
        ref = proc([[img]], return_tensors="np")["pixel_values"][0]
        got, _ = _ours(img, PINS, 32, "siglip")
        assert got.shape == ref.shape, (h, w)
        assert float(np.abs(got - ref).max()) <= 1e-5, (h, w)


def test_bad_pinpoints_name_the_key():
    transform = ImageTransform(32, "pad", "clip")
    with pytest.raises(ValueError, match=r"model.tiling.grid_pinpoints entry \[32, 50\]"):
        build_tiler(TilingConfig(type="anyres", grid_pinpoints=[[32, 50]]), transform)
    with pytest.raises(ValueError, match="model.tiling.grid_pinpoints is empty"):
        build_tiler(TilingConfig(type="anyres"), transform)


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tokenizer"))
    train_tiny_tokenizer(["look at these images and describe them"], out, vocab_size=300)
    return prepare_tokenizer(load_tokenizer(out))


def _sample_processor(family: str, info, aspect: str, norm: str):
    """(our config of the tiny HF model of ``family``, a SampleProcessor for it)."""
    cfg, _ = llava_config_from_hf(tiny_anyres_config(family))
    data = DataConfig(
        image_size=32, image_aspect=aspect, image_norm=norm, max_seq_len=4096, template="vicuna_v1"
    )
    return cfg, SampleProcessor.from_config(
        data, info, ImageTokenCounter.from_config(cfg), cfg.tiling
    )


def _through_pipeline(processor: SampleProcessor, images: list[Image.Image]):
    """(normalised pixels [T, 3, S, S], num_tiles, image_tokens) of one sample of ``images``."""
    members = {}
    for i, img in enumerate(images):
        buf = io.BytesIO()
        img.save(buf, "PNG")
        members[f"{i}.png"] = buf.getvalue()
    question = " look ".join(["<image>"] * len(images)) + " describe"
    record = {
        "images": [f"img{i}.png" for i in range(len(images))],
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "them"}],
    }
    members["json"] = json.dumps(record).encode()
    _, _, pixels, num_tiles, image_tokens, _, _ = processor(set(members), members.__getitem__)
    return processor.image_transform.normalize_pixels(pixels), num_tiles.tolist(), image_tokens


def test_onevision_multi_image_samples_match_the_processor(info):
    # data.image_aspect=resize: the multi-image tile is padded whatever the data config says
    cfg, processor = _sample_processor(ONEVISION, info, "resize", "siglip")
    assert cfg.tiling.multi_image_single_tile
    assert pickle.loads(pickle.dumps(processor.tiler)) == processor.tiler  # DataLoader workers
    samples = [
        [_image(50, 90, 20), _image(120, 40, 21)],
        [_image(33, 101, 22), _image(70, 70, 23), _image(200, 64, 24)],
        [_image(50, 90, 25)],
    ]
    pins = cfg.tiling.grid_pinpoints
    hf_images = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32},
        image_grid_pinpoints=pins,
        image_mean=[0.5] * 3,  # also the padding colour (int(0.5 * 255) = 127)
        image_std=[0.5] * 3,
    )
    ref = hf_images(samples, return_tensors="np")  # pixel_values [n_images, max tiles, 3, S, S]
    assert ref["batch_num_images"].tolist() == [2, 3, 1]
    # The processor's own count, without building its tokenizer and video processor.
    hf_text = object.__new__(LlavaOnevisionProcessor)
    side = cfg.vision.image_size // cfg.vision.patch_size
    hf_text.image_processor, hf_text.image_token = hf_images, "<image>"
    hf_text.num_image_tokens, hf_text.vision_feature_select_strategy = side * side, "full"
    hf_text.vision_aspect_ratio = f"anyres_max_{cfg.tiling.max_grid_patches}"
    k, worst = 0, 0.0
    for images in samples:
        got, num_tiles, image_tokens = _through_pipeline(processor, images)
        hf_tiles = [
            1 if len(images) > 1 else image_size_to_num_patches((img.height, img.width), pins, 32)
            for img in images
        ]
        assert num_tiles == hf_tiles, (k, num_tiles)
        hf_tokens = [
            hf_text.replace_image_token(ref, k + i).count("<image>") for i in range(len(images))
        ]
        assert image_tokens.tolist() == hf_tokens, k
        offsets = np.cumsum([0, *num_tiles])
        for i, t in enumerate(num_tiles):
            expected = ref["pixel_values"][k + i, :t]  # [t, 3, S, S]
            worst = max(worst, float(np.abs(got[offsets[i] : offsets[i + 1]] - expected).max()))
        k += len(images)
    assert worst <= 1e-5, worst
    assert hf_tiles[0] > 1  # the single-image sample kept its grid


def test_llava_next_tiles_every_image_of_a_multi_image_sample(info):
    cfg, processor = _sample_processor(NEXT, info, "pad", "clip")
    assert not cfg.tiling.multi_image_single_tile
    images = [_image(50, 90, 30), _image(120, 40, 31)]
    got, num_tiles, _ = _through_pipeline(processor, images)
    tiler = build_tiler(cfg.tiling, processor.image_transform)
    alone = [tiler(img).tiles for img in images]
    assert num_tiles == [a.shape[0] for a in alone] and min(num_tiles) > 1
    assert np.array_equal(got, processor.image_transform.normalize_pixels(np.concatenate(alone)))
