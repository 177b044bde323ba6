"""HF export of a tiled run gets its own family's processor (issue 19, item 3).

Before: `convert mcore-to-hf` of a run trained from scratch always wrote a LlavaProcessor, also
for anyres runs whose config.json is LLaVA-NeXT / OneVision (AutoProcessor then cut no tiles and
counted 16 tokens an image), and for InternVL runs. Now the processor comes from the config.json's
HF family: an anyres run's export loads as LlavaNextProcessor (LlavaOnevisionProcessor with
`tiling.max_grid_patches`), whose pixels and token ids equal our SampleProcessor's for images of
three aspect ratios, and transformers' model on them gives our model's logits; an InternVL run
trained with `<img> </img>` markers and a tokenizer holding them exports as InternVLProcessor,
checked the same way. Runs whose processor cannot reproduce the training input refuse with one
line, before any weight is written. The OneVision and InternVL processors need torchvision (their
video processors): without it those two checks skip and the refusal is tested instead.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mm_megatron.checkpoint.errors import UnsupportedModelError
from mm_megatron.config.presets import get_preset
from mm_megatron.convert.hf_config import hf_config_from_llava
from mm_megatron.convert.mcore_to_hf import mcore_to_hf
from mm_megatron.convert.processor_files import ExportFilesError, build_processor
from mm_megatron.train import trainer as trainer_mod
from mm_megatron.train.config import load_job_config

SIZES = [(70, 150), (150, 50), (90, 100)]
"""(height, width) of the test images at 64 px tiles: wide, tall, near-square (three grids)."""

PROMPT = "\nWhat is in the picture?"

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def _one_step(root) -> dict:
    """Train settings of a 1-step run saving to `root/ck`."""
    return {
        "run_dir": str(root / "run"),
        "save": str(root / "ck"),
        "micro_batch_size": 2,
        "global_batch_size": 2,
        "train_iters": 1,
        "lr_warmup_iters": 0,
        "eval_iters": 0,
        "caption_eval": False,
        "num_threads": 1,
    }


def _train_from_scratch(root, preset: str, **model):
    """A 1-step run of `preset` on the generated synthetic data (no HF original)."""
    train = {**_one_step(root), "synthetic_samples": 8}
    data = {"template": "vicuna_v1", "num_workers": 0}
    job = load_job_config(preset, overrides={"data": data, "train": train, "model": model})
    assert trainer_mod.train(job).exit_reason == "done"
    return job


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _ours(job, root, img: Image.Image, tokenizer=None):
    """Our training pipeline on one sample: (ids expanded, batch for our model)."""
    from mm_megatron.data.samples import SampleProcessor
    from mm_megatron.data.tokenizer import prepare_tokenizer
    from mm_megatron.model.image_tokens import ImageTokenCounter

    info = prepare_tokenizer(str(tokenizer or root / "run" / "synthetic-data" / "tokenizer"))
    sp = SampleProcessor.from_config(
        job.data, info, ImageTokenCounter.from_config(job.model), tiling=job.model.tiling
    )
    record = {
        "image": "x.png",
        "conversations": [
            {"from": "human", "value": "<image>" + PROMPT},
            {"from": "gpt", "value": "a red circle"},
        ],
    }
    members = {"json": json.dumps(record).encode(), "0.png": _png(img)}
    ids, _, tiles, num_tiles, image_tokens, _, sizes = sp(set(members), members.__getitem__)
    expanded = []
    for t in ids.tolist():
        expanded += [t] * int(image_tokens[0]) if t == info.image_token_id else [t]
    batch = dict(
        images=torch.from_numpy(sp.image_transform.normalize_pixels(tiles)),
        input_ids=torch.from_numpy(ids)[None],
        num_images=torch.tensor([1]),
        num_tiles=torch.from_numpy(num_tiles),
        image_tokens=torch.from_numpy(image_tokens),
        image_sizes=torch.from_numpy(sizes),
    )
    return torch.tensor(expanded), batch


def _our_model(ckpt):
    from mm_megatron.checkpoint import model_io
    from mm_megatron.model.build import build_llava_model

    cfg = copy.deepcopy(model_io.read_run_config(ckpt).model)
    cfg.set_spec("local")
    model = build_llava_model(cfg)
    model_io.load_checkpoint(model, ckpt)
    return model


def _check_export(
    root, job, processor_class: str, model_class: str, flat: bool = False, tokenizer=None
) -> dict:
    """Export, load with AutoProcessor + the family class, compare with our pipeline and model.

    `flat`: the processor returns every tile of the batch in one ``[tiles, 3, S, S]`` (InternVL)
    rather than ``[images, tiles, 3, S, S]``. `tokenizer`: the run's, if not the generated one.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor

    from mm_megatron.convert.common import single_rank
    from mm_megatron.convert.verify import forward_logits

    notes: list[str] = []
    out = mcore_to_hf(root / "ck", root / "hf", progress=False, log=notes.append)
    assert any(processor_class in n for n in notes), notes  # the log names the class written
    processor = AutoProcessor.from_pretrained(str(out))
    assert type(processor).__name__ == processor_class
    default_backend = processor.image_processor
    # transformers picks its torchvision backend when installed, whose resizes differ (measured
    # and returned, not asserted); the PIL backend is the training pipeline's, bit for bit
    processor.image_processor = AutoImageProcessor.from_pretrained(str(out), backend="pil")
    model, loading = getattr(transformers, model_class).from_pretrained(
        str(out), dtype=torch.float32, output_loading_info=True
    )
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched weights
    model.eval()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
    ]
    text = processor.apply_chat_template(messages)
    pixel_diff, default_diff, logit_diff = 0.0, 0.0, 0.0
    with single_rank():
        ours_model = _our_model(root / "ck")
        for i, (h, w) in enumerate(SIZES):
            img = _image(h, w, seed=i)
            inputs = processor(text=text, images=img, return_tensors="pt")
            want_ids, batch = _ours(job, root, img, tokenizer)
            # same tiles (count and pixels) and the same token ids, image tokens included
            theirs = inputs["pixel_values"] if flat else inputs["pixel_values"][0]
            assert theirs.shape == batch["images"].shape, (h, w)
            pixel_diff = max(pixel_diff, (theirs - batch["images"]).abs().max().item())
            default = default_backend(images=img, return_tensors="pt")["pixel_values"]
            default = default if flat else default[0]
            default_diff = max(default_diff, (default - batch["images"]).abs().max().item())
            assert inputs["input_ids"][0].tolist() == want_ids.tolist(), (h, w)
            n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
            assert n_image == int(batch["image_tokens"][0]), (h, w)
            with torch.no_grad():
                ref = model(**inputs).logits[0]
                ours = forward_logits(ours_model, batch)[0, :, : ref.shape[-1]]
            assert ours.shape == ref.shape
            logit_diff = max(logit_diff, (ours - ref).abs().max().item())
    assert pixel_diff <= 1e-5, pixel_diff
    assert logit_diff <= 1e-4, logit_diff
    return {"pixel": pixel_diff, "default backend": default_diff, "logits": logit_diff}


def test_llava_next_export_loads_as_llava_next_and_reproduces_training(tmp_path):
    job = _train_from_scratch(tmp_path, "debug-tiny-anyres")
    got = _check_export(tmp_path, job, "LlavaNextProcessor", "LlavaNextForConditionalGeneration")
    print(f"llava_next max|diff|: {got}")


@pytest.mark.skipif(not HAS_TORCHVISION, reason="LlavaOnevisionProcessor needs torchvision")
def test_onevision_export_loads_as_onevision_and_reproduces_training(tmp_path):
    # a 2x2 grid (8x8 features) is over 1.1^2 x 1 tile's worth: the features shrink
    tiling = {"max_grid_patches": 1, "multi_image_single_tile": True}  # OneVision's two rules
    job = _train_from_scratch(tmp_path, "debug-tiny-anyres", tiling=tiling)
    got = _check_export(
        tmp_path, job, "LlavaOnevisionProcessor", "LlavaOnevisionForConditionalGeneration"
    )
    print(f"onevision max|diff|: {got}")


@pytest.mark.skipif(HAS_TORCHVISION, reason="the refusal is for installs without torchvision")
def test_onevision_export_without_torchvision_refuses(tmp_path):
    from mm_megatron.convert.processor_families import onevision_processor

    cfg = get_preset("debug-tiny-anyres")
    cfg.tiling.max_grid_patches = 4
    with pytest.raises(ExportFilesError, match="torchvision") as e:
        onevision_processor(cfg, {}, tmp_path)
    assert "\n" not in str(e.value)


def test_internvl_export_without_markers_refuses_before_writing_weights(tmp_path, monkeypatch):
    from mm_megatron.convert import mcore_to_hf as mcore_to_hf_mod

    _train_from_scratch(tmp_path, "debug-tiny-internvl", tiling={"image_markers": ""})

    def no_weights(*args, **kwargs):
        raise AssertionError("weights written before the refusal")

    monkeypatch.setattr(mcore_to_hf_mod, "export_tensors", no_weights)
    with pytest.raises(ExportFilesError, match=r"image_markers=''.*<img>") as e:
        mcore_to_hf(tmp_path / "ck", tmp_path / "hf", progress=False, log=lambda *a: None)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists()
    assert not list(tmp_path.glob(".hf.tmp-*"))  # nothing left behind


def _internvl_run_with_marker_tokens(root):
    """A 1-step debug-tiny-internvl run whose tokenizer has <img> and </img> as single tokens,
    as InternVL's tokenizers do (added to the generated tokenizer before training)."""
    from transformers import AutoTokenizer

    from mm_megatron.data.synthetic import write_synthetic_dataset

    cfg = get_preset("debug-tiny-internvl")
    data = root / "data"
    write_synthetic_dataset(
        str(data), n_train=8, n_val=4, image_size=cfg.vision.image_size, vocab_size=400
    )
    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    tok.add_special_tokens({"additional_special_tokens": ["<img>", "</img>"]})
    tok.save_pretrained(str(data / "tokenizer"))
    overrides = {
        "data": {"train_shards": str(data), "template": "vicuna_v1", "num_workers": 0},
        "train": _one_step(root),
    }
    job = load_job_config("debug-tiny-internvl", overrides=overrides)
    assert trainer_mod.train(job).exit_reason == "done"
    return job, data / "tokenizer"


@pytest.mark.skipif(not HAS_TORCHVISION, reason="InternVLProcessor needs torchvision")
def test_internvl_export_loads_as_internvl_and_reproduces_training(tmp_path):
    job, tokenizer = _internvl_run_with_marker_tokens(tmp_path)
    got = _check_export(
        tmp_path,
        job,
        "InternVLProcessor",
        "InternVLForConditionalGeneration",
        flat=True,
        tokenizer=tokenizer,
    )
    print(f"internvl max|diff|: {got}")


def test_internvl_export_refuses_a_tokenizer_that_splits_the_markers(tmp_path):
    from mm_megatron.convert.processor_families import internvl_processor
    from mm_megatron.data.tokenizer import train_tiny_tokenizer

    if not HAS_TORCHVISION:  # the torchvision refusal comes first: that one line instead
        with pytest.raises(ExportFilesError, match="InternVLProcessor.*torchvision"):
            internvl_processor(get_preset("debug-tiny-internvl"), {}, tmp_path)
        return
    train_tiny_tokenizer(["a picture of <image> here"] * 4, str(tmp_path), vocab_size=300)
    with pytest.raises(ExportFilesError, match=r"splits '<img>' into \d+ tokens"):
        internvl_processor(get_preset("debug-tiny-internvl"), {}, tmp_path)


@pytest.mark.parametrize("preset", ["debug-tiny-resampler", "debug-tiny-qformer"])
def test_connectors_without_an_hf_class_refuse(preset):
    # mcore_to_hf asks for config.json first (before any output): it names the projector type
    cfg = get_preset(preset)
    with pytest.raises(UnsupportedModelError, match=f"projector.type='{cfg.projector.type}'") as e:
        hf_config_from_llava(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tiling", ["minicpm_slice", "internvl_dynamic"])
def test_llava_processor_refuses_a_tiling_it_cannot_cut(tmp_path, tiling):
    cfg = get_preset("debug-tiny")
    cfg.tiling.type = tiling
    with pytest.raises(ExportFilesError, match=f"model.tiling.type='{tiling}'"):
        build_processor(cfg, {}, tmp_path)


@pytest.mark.parametrize(
    ("preset", "norm"), [("llava-next-7b", "clip"), ("llava-onevision-0.5b", "siglip")]
)
def test_real_presets_processors_count_as_the_model(tmp_path, preset, norm):
    # the builders check 12 image sizes (6 aspect ratios + every pinpoint) against the model's
    # ImageTokenCounter and raise on any difference
    from mm_megatron.convert import processor_families as pf
    from mm_megatron.data.tokenizer import train_tiny_tokenizer

    cfg = get_preset(preset)
    if cfg.tiling.max_grid_patches and not HAS_TORCHVISION:
        pytest.skip("LlavaOnevisionProcessor needs torchvision")
    train_tiny_tokenizer(["a picture of <image> here"] * 4, str(tmp_path), vocab_size=300)
    build = pf.onevision_processor if cfg.tiling.max_grid_patches else pf.llava_next_processor
    processor = build(cfg, {"data": {"template": "chatml", "image_norm": norm}}, tmp_path)
    assert processor.image_processor.image_grid_pinpoints == cfg.tiling.grid_pinpoints
    # and the check bites: one token off per image (no class token to drop) is refused
    processor.vision_feature_select_strategy = "default"
    processor.num_additional_image_tokens = 0
    if hasattr(processor, "num_image_tokens"):
        processor.num_image_tokens = cfg.vision.num_output_tokens
    with pytest.raises(ExportFilesError, match="image tokens for a"):
        pf.check_anyres_counts(processor, cfg)
