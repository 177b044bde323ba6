"""InternVLForConditionalGeneration <-> mcore: import, verify, bit-exact export, from_pretrained,
clear errors, and logits parity with transformers on tiled images at TP1 and TP2xPP2 (gloo).

The HF model is a tiny random InternVL (InternViT with layer scale and QK norm, 3 layers of which
the feature layer -2 reads 2, so one layer is passthrough; pixel shuffle 0.5; Qwen2 text). The
logits batch has three images of different aspect ratios cut by ``internvl_dynamic`` (5, 3 and
1 tiles), two of them in one sample, and a text-only sample; HF gets the same tiles with its
placeholders expanded by ``num_tiles x 4``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mm_megatron.checkpoint.errors import ConversionError, UnsupportedModelError
from mm_megatron.config import get_preset
from mm_megatron.convert.internvl import hf_internvl_config
from mm_megatron.data.image import ImageTransform
from mm_megatron.data.tiling import build_tiler
from mm_megatron.model.image_tokens import ImageTokenCounter
from tests.distributed.launcher import run_distributed

pytestmark = pytest.mark.distributed

ATOL = 1e-4


def _hf_dir(path):
    from transformers import InternVLForConditionalGeneration

    cfg = get_preset("debug-tiny-internvl")
    torch.manual_seed(3)
    model = InternVLForConditionalGeneration(hf_internvl_config(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return cfg


def _batch(cfg):
    """Our batch (one placeholder per image, tiles, counts) and HF's (expanded)."""
    transform = ImageTransform(cfg.vision.image_size, norm="imagenet")
    tiler = build_tiler(cfg.tiling, transform)
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (30, 40), (30, 20)]  # (w, h): 2x2 + thumbnail, 1x2 + thumbnail, 1 tile
    tiled = [
        tiler(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))) for w, h in sizes
    ]
    tiles = np.concatenate([t.tiles for t in tiled])
    images = torch.from_numpy(transform.normalize_pixels(tiles))  # [9, 3, 32, 32]
    counter = ImageTokenCounter.from_config(cfg)
    counts = [counter(t.geometry) for t in tiled]
    gen = torch.Generator().manual_seed(1)
    img = cfg.image_token_id
    rows = [torch.randint(10, cfg.lm.vocab_size, (n,), generator=gen) for n in (30, 24)]
    rows[0][[3, 17]] = img  # two images in one sample
    rows[1][5] = img
    text_only = torch.randint(10, cfg.lm.vocab_size, (30,), generator=gen)
    ids = torch.stack([rows[0], torch.cat([rows[1], torch.zeros(6, dtype=torch.long)]), text_only])
    ours = dict(
        images=images,
        input_ids=ids,
        num_images=torch.tensor([2, 1, 0]),
        num_tiles=torch.tensor([t.geometry.num_tiles for t in tiled]),
        image_tokens=torch.tensor(counts),
    )
    hf_rows, k = [], 0
    for row in (rows[0], rows[1], text_only):
        out = []
        for t in row.tolist():
            out += [t] * counts[k] if t == img else [t]
            k += t == img
        hf_rows.append(out)
    lengths = [len(r) for r in hf_rows]
    hf_ids = torch.zeros(3, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(hf_ids)
    for i, r in enumerate(hf_rows):
        hf_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ours, dict(input_ids=hf_ids, pixel_values=images, attention_mask=mask), lengths


def _world(rank, world_size, ckpt, batch):
    """Both layouts in one 4-rank world (TP1 runs as DP4): [TP1 logits, TP2xPP2 logits]."""
    from mm_megatron.convert.verify import layout_logits

    return [layout_logits(ckpt, batch, 1, 1), layout_logits(ckpt, batch, 2, 2)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from mm_megatron.convert.hf_to_mcore import hf_to_mcore

    base = tmp_path_factory.mktemp("internvl-convert")
    cfg = _hf_dir(base / "hf")
    hf_to_mcore(base / "hf", base / "ckpt", progress=False, log=lambda *_: None)
    return cfg, base


def test_import_verify_and_bit_exact_export(converted):
    from safetensors.torch import load_file
    from transformers import InternVLForConditionalGeneration

    from mm_megatron.convert.mcore_to_hf import mcore_to_hf
    from mm_megatron.convert.verify import format_table, verify

    cfg, base = converted
    checks = verify(base / "hf", base / "ckpt", logits=True)
    assert all(c.ok for c in checks), format_table(checks)
    mcore_to_hf(base / "ckpt", base / "out", progress=False, log=lambda *_: None)
    a, b = (
        load_file(base / "hf" / "model.safetensors"),
        load_file(base / "out" / "model.safetensors"),
    )
    assert sorted(a) == sorted(b)
    assert any(".encoder.layer.2." in k for k in a)  # the unread layer went through as-is
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    model = InternVLForConditionalGeneration.from_pretrained(str(base / "out"))
    assert model.config.vision_config.use_qk_norm


def test_clear_errors(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    from mm_megatron.convert.hf_to_mcore import hf_to_mcore

    _, base = converted
    bad = tmp_path / "hf"
    bad.mkdir()
    sd = load_file(base / "hf" / "model.safetensors")
    del sd["vision_tower.encoder.layer.0.lambda_1"]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text((base / "hf" / "config.json").read_text())
    with pytest.raises(ConversionError) as e:
        hf_to_mcore(bad, tmp_path / "out", progress=False, log=lambda *_: None)
    assert "lambda_1" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # atomic: nothing half-written
    doc = json.loads((base / "hf" / "config.json").read_text())
    doc["vision_feature_layer"] = [-1, -2]
    (bad / "config.json").write_text(json.dumps(doc))
    with pytest.raises(UnsupportedModelError, match=r"vision_feature_layer=\[-1, -2\]"):
        hf_to_mcore(bad, tmp_path / "out", progress=False, log=lambda *_: None)


@pytest.mark.timeout(900)
def test_logits_parity_tiled_tp1_and_tp2pp2(converted):
    from transformers import InternVLForConditionalGeneration

    cfg, base = converted
    ours, hf_inputs, lengths = _batch(cfg)
    assert ours["num_tiles"].tolist() == [5, 3, 1]
    model = InternVLForConditionalGeneration.from_pretrained(
        str(base / "hf"), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        ref = model(**hf_inputs).logits
    results = run_distributed(_world, 4, str(base / "ckpt"), ours, timeout=800)
    tp1 = results[0][0]
    tp2pp2 = next(r[1] for r in results if r[1] is not None)
    for name, got in (("TP1", tp1), ("TP2xPP2", tp2pp2)):
        for i, n in enumerate(lengths):
            diff = (got[i, :n] - ref[i, :n]).abs().max().item()
            assert diff <= ATOL, (name, i, diff)
            assert torch.equal(got[i, :n].argmax(-1), ref[i, :n].argmax(-1)), (name, i)
