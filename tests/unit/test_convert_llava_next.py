"""LLaVA-NeXT and LLaVA-OneVision <-> mcore on tiny random transformers models.

Bit-exact round trip (``image_newline`` included), ``from_pretrained`` of the export, the config
check, and logits parity with transformers at TP1 (fp32, max |diff| <= 1e-4, identical argmax)
on images of three aspect ratios, two images in one sample (OneVision: one tile each, HF given
``batch_num_images``) and a text-only sample; one-line errors for what the converter does not
support.
"""

from __future__ import annotations

import json

import pytest
import torch

from mm_megatron.checkpoint.errors import UnsupportedModelError
from mm_megatron.checkpoint.safetensors_io import read_header, read_tensor
from mm_megatron.convert.llava_next import NEXT, ONEVISION, tiny_anyres_model

FAMILIES = (NEXT, ONEVISION)
ATOL = 1e-4


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{family: (hf dir, mcore dir, exported dir)}."""
    from mm_megatron.convert.hf_to_mcore import hf_to_mcore
    from mm_megatron.convert.mcore_to_hf import mcore_to_hf

    base = tmp_path_factory.mktemp("anyres-convert")
    out = {}
    for family in FAMILIES:
        hf, mc, back = base / f"hf_{family}", base / f"mc_{family}", base / f"back_{family}"
        tiny_anyres_model(family, seed=1).save_pretrained(hf)
        hf_to_mcore(hf, mc, progress=False, make_vocab_size_divisible_by=8, log=lambda s: None)
        mcore_to_hf(mc, back, progress=False, log=lambda s: None)
        out[family] = (hf, mc, back)
    return out


def _tensors(d):
    infos, _ = read_header(d / "model.safetensors")
    return {k: read_tensor(v) for k, v in infos.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact_and_loads_in_transformers(ckpts, family):
    import transformers

    from mm_megatron.checkpoint import model_io

    hf, mc, back = ckpts[family]
    cfg = model_io.read_run_config(mc).model
    assert cfg.tiling.type == "anyres" and cfg.tiling.grid_pinpoints
    assert cfg.tiling.max_grid_patches == (2 if family == ONEVISION else 0)
    assert cfg.tiling.multi_image_single_tile == (family == ONEVISION)
    a, b = _tensors(hf), _tensors(back)
    newline = next(k for k in a if k.endswith("image_newline"))  # spelling as transformers saves
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    arch = json.loads((hf / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(back)
    assert torch.equal(model.model.image_newline.detach(), a[newline])


@pytest.mark.parametrize("family", FAMILIES)
def test_verify_logits_match_transformers_at_tp1(ckpts, family):
    from mm_megatron.convert.verify import format_table, verify

    hf, mc, _ = ckpts[family]
    checks = verify(hf, mc, atol=ATOL)
    table = format_table(checks)
    assert [c.name for c in checks] == ["config", "weights", "logits TP1xPP1"], table
    assert all(c.ok for c in checks), table
    assert "argmax agree 100.0%" in checks[-1].detail


def test_inputs_cover_three_aspect_ratios_a_text_only_sample_and_one_tile_images(ckpts):
    from mm_megatron.checkpoint import model_io
    from mm_megatron.convert.hf_config import load_hf_config
    from mm_megatron.convert.llava_next import anyres_verify_inputs
    from mm_megatron.data.batch import ImageGeometry

    hf, mc, _ = ckpts[ONEVISION]
    cfg = model_io.read_run_config(mc).model
    batch = anyres_verify_inputs(load_hf_config(hf), cfg)
    ours = batch["ours"]
    assert ours["num_images"].tolist() == [2, 0, 1, 1]  # the wide image again, alone
    assert batch["hf"]["batch_num_images"].tolist() == [2, 1, 1]
    ratios = {h / w for h, w in ours["image_sizes"].tolist()}
    assert len(ratios) == 3
    from mm_megatron.model.image_tokens import ImageTokenCounter

    counter = ImageTokenCounter.from_config(cfg)
    arr = counter.arrangement
    sizes = [tuple(hw) for hw in ours["image_sizes"].tolist()]
    grids = [arr.num_tiles(hw) for hw in sizes[2:]]
    assert ours["num_tiles"].tolist() == [1, 1, *grids] and min(grids) > 1
    assert ours["image_tokens"].tolist()[:2] == [counter(ImageGeometry(num_tiles=1))] * 2
    shrunk = [arr.feature_hw(hw) != arr.unpadded_hw(hw) for hw in sizes[2:]]
    assert any(shrunk), "OneVision's anyres_max down-scaling should be exercised"
    full = [tuple(n * arr.side for n in arr.grid(hw)) for hw in sizes[2:]]
    assert any(arr.unpadded_hw(hw) != f for hw, f in zip(sizes[2:], full)), "unpadding"
    next_hf, next_mc, _ = ckpts[NEXT]
    next_cfg = model_io.read_run_config(next_mc).model
    next_batch = anyres_verify_inputs(load_hf_config(next_hf), next_cfg)
    assert "batch_num_images" not in next_batch["hf"]  # LLaVA-NeXT tiles every image
    assert next_batch["ours"]["num_images"].tolist() == [2, 0, 1]
    assert min(next_batch["ours"]["num_tiles"].tolist()) > 1


def test_unsupported_settings_fail_in_one_line(tmp_path):
    from mm_megatron.convert.hf_to_mcore import hf_to_mcore

    model = tiny_anyres_model(ONEVISION)
    model.config.vision_aspect_ratio = "pad"
    model.save_pretrained(tmp_path / "bad")
    with pytest.raises(UnsupportedModelError, match="vision_aspect_ratio='pad' is unsupported"):
        hf_to_mcore(tmp_path / "bad", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # atomic: nothing half-written
    doc = json.loads((tmp_path / "bad" / "config.json").read_text())
    doc["model_type"], doc["architectures"] = "llava_next_video", ["LlavaNextVideoForX"]
    (tmp_path / "bad" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(UnsupportedModelError, match=r"unsupported architecture LlavaNextVideoForX"):
        hf_to_mcore(tmp_path / "bad", tmp_path / "out", progress=False)


def test_export_without_an_original_writes_the_family_config(tmp_path):
    from mm_megatron.config import get_preset
    from mm_megatron.convert.hf_config import hf_config_from_llava

    cfg = get_preset("debug-tiny-anyres")
    d = hf_config_from_llava(cfg)
    assert d["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert d["image_grid_pinpoints"] == cfg.tiling.grid_pinpoints
    cfg.tiling.max_grid_patches = 9
    with pytest.raises(UnsupportedModelError, match="max_grid_patches=9 with multi_image_single"):
        hf_config_from_llava(cfg)  # HF has no OneVision that tiles every image
    cfg.tiling.multi_image_single_tile = True
    d = hf_config_from_llava(cfg)
    assert d["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    assert d["vision_aspect_ratio"] == "anyres_max_9"
    cfg.tiling.max_grid_patches = 0
    with pytest.raises(UnsupportedModelError, match="multi_image_single_tile=True: HF LLaVA-One"):
        hf_config_from_llava(cfg)
