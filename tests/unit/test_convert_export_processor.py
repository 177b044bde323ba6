"""HF export of any run is complete (issue 19, item 3).

Before: `convert mcore-to-hf` of a run trained from scratch (the generated synthetic data and its
tokenizer) wrote only config.json + model.safetensors, and `AutoProcessor.from_pretrained` failed
("Can't load image processor ... preprocessor_config.json"). Now the export carries the run's
tokenizer and a LlavaProcessor; both `LlavaForConditionalGeneration` and `AutoProcessor` load it,
and the processor reproduces the training pre-processing (pixels, image-token count, chat text).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mm_megatron.convert.mcore_to_hf import mcore_to_hf
from mm_megatron.convert.processor_files import chat_template_jinja, image_processor_kwargs
from mm_megatron.data.batch import ImageGeometry
from mm_megatron.data.image import ImageTransform
from mm_megatron.data.templates import EOS, TEMPLATES
from mm_megatron.model.image_tokens import ImageTokenCounter
from mm_megatron.train import trainer as trainer_mod
from tests.train_helpers import tiny_job


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    job = tiny_job(root, root / "run", train_iters=1, save=str(root / "ck"))
    job.data.train_shards = job.data.val_shards = job.data.tokenizer_path = None  # from scratch
    job.train.synthetic_samples = 16
    result = trainer_mod.train(job)
    assert result.exit_reason == "done"
    out = mcore_to_hf(root / "ck", root / "hf", progress=False, log=lambda *a: None)
    return {"out": out, "job": job}


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_export_of_a_from_scratch_run_loads_with_model_and_processor(export):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out, job = export["out"], export["job"]
    assert (out / "processor_config.json").is_file() and (out / "tokenizer.json").is_file()
    processor = AutoProcessor.from_pretrained(str(out))
    model = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    image = _image(70, 40)
    inputs = processor(text="<image>\nWhat is in the picture?", images=image, return_tensors="pt")
    # the training pixels: the run's ImageTransform (pad to square with the mean colour, resize)
    want = ImageTransform(job.model.vision.image_size, job.data.image_aspect, job.data.image_norm)
    assert (inputs["pixel_values"][0] - want(image)).abs().max().item() < 1e-5
    count = ImageTokenCounter.from_config(job.model)
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    config = json.loads((out / "config.json").read_text())
    assert n_image_tokens == config["image_seq_length"] == count(ImageGeometry())
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


def test_verify_passes_on_the_export_of_a_run(export, capsys):
    """`convert verify --hf EXPORT --ckpt RUN`: the export keeps only the built vision layers (2
    of debug-tiny's 3, feature layer -2 -> -1); verify compares the towers as built, so config,
    weights and logits pass (it reported `vision.num_layers: HF 2 vs checkpoint 3` before)."""
    from mm_megatron.cli import main

    job = export["job"]
    assert job.model.vision.num_layers == 3 and job.model.vision.num_layers_built == 2
    args = ["convert", "verify", "--hf", str(export["out"]), "--ckpt", job.train.save]
    assert main(args) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "config.json matches" in out


@pytest.mark.parametrize(
    ("aspect", "norm"), [("pad", "clip"), ("resize", "siglip"), ("crop", "clip")]
)
def test_image_processor_reproduces_the_training_transform(aspect, norm):
    from transformers import LlavaImageProcessorPil

    processor = LlavaImageProcessorPil(**image_processor_kwargs(32, aspect, norm))
    ours = ImageTransform(32, aspect, norm)
    for w, h in ((60, 40), (40, 60), (32, 32)):  # crop: 40 -> 32 scales 60 to exactly 48
        image = _image(w, h, seed=w)
        got = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert (got - ours(image)).abs().max().item() < 1e-5, (aspect, w, h)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_template_renders_the_training_template(name):
    from jinja2 import Environment

    t = TEMPLATES[name]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
        {"role": "user", "content": "And where?"},
    ]
    text = (
        Environment()
        .from_string(chat_template_jinja(name))
        .render(messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
    )
    # plain reimplementation of the training format (templates.py) for this conversation
    end = "</s>" if t.assistant_end is EOS else t.assistant_end
    want = ("<s>" if t.bos_text is None else t.bos_text) if t.add_bos else ""
    if t.default_system:
        want += t.system_format.format(system=t.default_system)
    want += t.user_prefix + "<image>\nWhat?" + t.user_suffix
    want += t.assistant_prefix + t.answer_prefix + "a red circle" + end + t.assistant_suffix
    want += t.user_prefix + "And where?" + t.user_suffix + t.assistant_prefix
    assert text == want
    assert chat_template_jinja("plain") is None
