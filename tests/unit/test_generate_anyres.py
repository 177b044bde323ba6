"""Generation with tiled models: the image is tiled and laid out as in training, and the KV-cache
decode equals the no-cache decode (anyres: unpadded, newline-separated embeddings; OneVision's
multi-image prompts: one padded tile per image; MiniCPM-V slices: separator text spliced into
the prompt, one placeholder per slice)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from mm_megatron.config.presets import get_preset
from mm_megatron.data.batch import ImageGeometry
from mm_megatron.data.image import ImageTransform
from mm_megatron.data.synthetic import write_synthetic_dataset
from mm_megatron.data.tokenizer import load_tokenizer, prepare_tokenizer
from mm_megatron.infer.generate import Generator, build_prompt, model_image_inputs
from mm_megatron.model.build import build_llava_model


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    write_synthetic_dataset(out, n_train=40, n_val=0, image_size=16, shard_size=40, vocab_size=512)
    return prepare_tokenizer(load_tokenizer(os.path.join(out, "tokenizer")))


def _decode_both(model, info, pixels, extras, question: str, images: int, n: int):
    """Decode `n` tokens with and without the KV cache (no stop, no EOS) and check they agree.

    Returns (prompt ids, the cached result, the generator).
    """
    gen = Generator(model, info, "plain")
    gen.stop = None
    gen.info = type(info)(**{**info.__dict__, "eos_token_id": None})
    prompt = build_prompt(info, "plain", question, images)
    cached = gen.generate(pixels, prompt, max_new_tokens=n, image_inputs=extras)
    plain = gen.generate(pixels, prompt, max_new_tokens=n, use_cache=False, image_inputs=extras)
    assert cached.token_ids == plain.token_ids and len(cached.token_ids) == n
    return prompt, cached, gen


def test_anyres_generation_tiles_the_image_and_caches_exactly(single_rank, info):
    cfg = get_preset("debug-tiny-anyres")
    torch.manual_seed(0)
    model = build_llava_model(cfg)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8))  # wide
    transform = ImageTransform(cfg.vision.image_size, "pad", "clip")
    pixels, extras = model_image_inputs(model, transform, [img])
    arr = model.arrangement
    assert pixels.shape == (arr.num_tiles((90, 150)), 3, 64, 64) and pixels.shape[0] > 1
    geometry = ImageGeometry(num_tiles=pixels.shape[0], image_size=(90, 150))
    assert extras["image_tokens"].tolist() == [model.count_image_tokens(geometry)]
    prompt, cached, gen = _decode_both(model, info, pixels, extras, "describe", 1, 6)
    expanded = len(prompt) - 1 + int(extras["image_tokens"][0])
    assert cached.positions_computed == expanded + 5  # the prompt once, then one per token
    with pytest.raises(ValueError, match="must carry image_tokens"):
        gen.generate(pixels, prompt, max_new_tokens=1)


def test_onevision_multi_image_prompt_gets_one_padded_tile_per_image(single_rank, info):
    cfg = get_preset("debug-tiny-anyres")
    cfg.tiling.max_grid_patches, cfg.tiling.multi_image_single_tile = 2, True  # OneVision
    torch.manual_seed(0)
    model = build_llava_model(cfg)
    rng = np.random.default_rng(2)
    wide, tall = (
        Image.fromarray(rng.integers(0, 256, hw + (3,), dtype=np.uint8))
        for hw in [(90, 150), (130, 60)]
    )
    transform = ImageTransform(cfg.vision.image_size, "resize", "clip")  # the tile still pads
    pixels, extras = model_image_inputs(model, transform, [wide, tall])
    one = model.count_image_tokens(ImageGeometry(num_tiles=1))
    assert pixels.shape == (2, 3, 64, 64)
    assert extras["num_tiles"].tolist() == [1, 1] and extras["image_tokens"].tolist() == [one] * 2
    assert extras["image_sizes"].tolist() == [[90, 150], [130, 60]]
    padded = ImageTransform(cfg.vision.image_size, "pad", "clip")
    assert torch.equal(pixels, torch.stack([padded(wide), padded(tall)]))
    alone, _ = model_image_inputs(model, transform, [wide])  # a single image keeps its grid
    assert alone.shape[0] == model.arrangement.num_tiles((90, 150)) > 1
    prompt, cached, _ = _decode_both(model, info, pixels, extras, "compare", 2, 3)
    assert cached.positions_computed == len(prompt) - 2 + 2 * one + 2


def test_sliced_generation_splices_the_separators_into_the_prompt(single_rank, info):
    cfg = get_preset("debug-tiny-resampler")
    assert cfg.tiling.type == "minicpm_slice"
    torch.manual_seed(0)
    model = build_llava_model(cfg)
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8))  # 1:2, sliced
    transform = ImageTransform(cfg.vision.image_size, "resize", "siglip")
    with pytest.raises(ValueError, match="needs the tokenizer"):
        model_image_inputs(model, transform, [img])
    pixels, extras = model_image_inputs(model, transform, [img], info)
    tiles = pixels.shape[0]
    assert tiles > 1 and extras["num_tiles"].tolist() == [1] * tiles
    per_tile = model.count_image_tokens(ImageGeometry(num_tiles=1))
    assert extras["image_tokens"].tolist() == [per_tile] * tiles
    (layout,) = extras["layouts"]
    assert layout.count(info.image_token_id) == tiles and len(layout) > tiles
    prompt, cached, _ = _decode_both(model, info, pixels, extras, "describe", 1, 4)
    spliced = len(prompt) - 1 + len(layout)  # the image's placeholder became its layout
    assert cached.positions_computed == spliced - tiles + tiles * per_tile + 3


def test_internvl_generation_wraps_each_image_in_its_markers(single_rank, info):
    """An InternVL prompt is laid out as in training: `<img>` + the image's one placeholder (all
    its tiles) + `</img>`; the KV-cache decode equals the recompute one."""
    from mm_megatron.data.tiling import layout_token_ids

    cfg = get_preset("debug-tiny-internvl")
    torch.manual_seed(0)
    model = build_llava_model(cfg)
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8))  # a 2 x 1 grid
    transform = ImageTransform(cfg.vision.image_size, "resize", "imagenet")
    pixels, extras = model_image_inputs(model, transform, [img], info)
    assert pixels.shape[0] == 3 and extras["num_tiles"].tolist() == [3]  # grid + thumbnail
    (layout,) = extras["layouts"]
    p = info.image_token_id
    assert layout == layout_token_ids(("<img>", None, "</img>"), info) and layout.count(p) == 1
    prompt, cached, _ = _decode_both(model, info, pixels, extras, "describe", 1, 4)
    tokens = int(extras["image_tokens"][0])
    assert cached.positions_computed == len(prompt) - 1 + len(layout) - 1 + tokens + 3
