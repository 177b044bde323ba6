"""The README's conversion walkthrough, end to end: HF -> mcore -> train 2 steps -> HF.

A tiny `LlavaForConditionalGeneration` (transformers' own classes, random weights) is converted,
trained for two steps with ``--load`` on the generated synthetic data tokenized by the HF
checkpoint's own tokenizer, exported back and loaded with ``from_pretrained``. The export must
have the original's key set and dtypes; the frozen vision tower and the tensors the model never
uses (layers past ``vision_feature_layer``) must come back bit-exact; the trained projector and
LM must have moved.
"""

from __future__ import annotations

import json

import torch

from mm_megatron.checkpoint import model_io
from mm_megatron.cli import main
from mm_megatron.convert.tiny_models import save_tiny_hf


def test_hf_to_mcore_train_two_steps_then_back_to_hf(tmp_path, capsys):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    hf, mc, run, out = (tmp_path / n for n in ("hf", "mc", "train", "hf2"))
    save_tiny_hf(hf, "llama")
    assert main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(mc), "--quiet"]) == 0
    args = [
        "train", "--load", str(mc), "--save", str(run / "ckpt"), "--run-dir", str(run),
        "--train-iters", "2", "--micro-batch-size", "4", "--global-batch-size", "4",
        "--lr", "1e-2", "--lr-warmup-iters", "0", "--log-interval", "1",
        f"--data.tokenizer_path={hf}", "--data.num_workers=0",
        "--train.synthetic_samples=32", "--train.eval_iters=0",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"initial weights from {mc} iteration release" in printed
    assert "iteration 2/2" in printed and "bad samples: 0 " in printed

    saved = run / "ckpt"
    assert model_io.read_tracker(saved) == 2
    # provenance of the HF original rides along, so the export can reproduce its layout
    assert model_io.read_run_config(saved).source == model_io.read_run_config(mc).source
    assert (saved / model_io.PASSTHROUGH).is_file() and (saved / model_io.HF_FILES).is_dir()

    assert main(["convert", "mcore-to-hf", "--ckpt", str(saved), "--out", str(out), "--quiet"]) == 0
    before = LlavaForConditionalGeneration.from_pretrained(hf).state_dict()
    after = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    AutoProcessor.from_pretrained(out)
    assert before.keys() == after.keys()
    assert {k: v.dtype for k, v in before.items()} == {k: v.dtype for k, v in after.items()}
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert all("vision_tower" not in k for k in moved), sorted(moved)  # frozen, and passthrough
    assert any("multi_modal_projector" in k for k in moved)
    assert any("language_model.layers" in k for k in moved)
    cfg_in = json.loads((hf / "config.json").read_text())
    cfg_out = json.loads((out / "config.json").read_text())
    assert cfg_in["text_config"]["vocab_size"] == cfg_out["text_config"]["vocab_size"]
