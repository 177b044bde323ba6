"""The README's assemble walkthrough, end to end, on tiny parts made with transformers' classes.

assemble (CLIPVisionModel + LlamaForCausalLM) -> verify-parts -> stage 1 (projector only, 2 steps)
-> stage 2 (LM unfrozen, 2 steps) -> export as LLaVA and as parts -> ``from_pretrained`` of each.
Stage 1 must change only the projector: its parts export is bit-exact with the assembled one's.
Stage 2 moves the LM, never the frozen vision tower.
"""

from __future__ import annotations

import torch

from mm_megatron.checkpoint.safetensors_io import index_files, read_tensor
from mm_megatron.cli import main
from mm_megatron.convert.tiny_models import save_tiny_lm, save_tiny_vision


def _tensors(d):
    return {k: read_tensor(v) for k, v in index_files(sorted(d.glob("*.safetensors"))).items()}


def _train(load, run, tokenizer, *extra):
    return [
        "train", "--load", str(load), "--save", str(run / "ckpt"), "--run-dir", str(run),
        "--train-iters", "2", "--micro-batch-size", "4", "--global-batch-size", "4",
        "--lr", "1e-2", "--lr-warmup-iters", "0", "--log-interval", "1",
        f"--data.tokenizer_path={tokenizer}",
        "--data.num_workers=0", "--train.synthetic_samples=32", "--train.eval_iters=0", *extra,
    ]  # fmt: skip


def test_assemble_verify_stage1_stage2_export(tmp_path, capsys):
    from transformers import (
        AutoProcessor,
        AutoTokenizer,
        CLIPVisionModel,
        LlamaForCausalLM,
        LlavaForConditionalGeneration,
    )

    vision, lm, ckpt = tmp_path / "clip", tmp_path / "llama", tmp_path / "init"
    save_tiny_vision(vision, "clip")
    save_tiny_lm(lm, "llama")
    asm = ["convert", "assemble", "--vision", str(vision), "--lm", str(lm), "--out", str(ckpt)]
    assert main([*asm, "--quiet"]) == 0
    verify = ["convert", "verify-parts", "--vision", str(vision), "--lm", str(lm)]
    assert main([*verify, "--ckpt", str(ckpt)]) == 0
    assert "overall: PASS" in capsys.readouterr().out

    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    tok = ckpt / "hf_files"  # the LM's tokenizer with <image> and <pad> added
    assert main(_train(ckpt, s1, tok)) == 0  # stage-1 freezing comes with the checkpoint
    assert "iteration 2/2" in capsys.readouterr().out
    assert main(_train(s1 / "ckpt", s2, tok, "--model.freeze_lm=false")) == 0
    assert "iteration 2/2" in capsys.readouterr().out

    exports = {}
    for name, src in (("init", ckpt), ("stage1", s1 / "ckpt"), ("stage2", s2 / "ckpt")):
        for kind in ("llava", "parts"):
            out = tmp_path / f"{name}-{kind}"
            extra = ["--parts"] if kind == "parts" else []
            back = ["convert", "mcore-to-hf", "--ckpt", str(src), "--out", str(out), "--quiet"]
            assert main(back + extra) == 0
            exports[name, kind] = out
    LlavaForConditionalGeneration.from_pretrained(exports["stage2", "llava"])
    AutoProcessor.from_pretrained(exports["stage2", "llava"])
    CLIPVisionModel.from_pretrained(exports["stage2", "parts"] / "vision")
    LlamaForCausalLM.from_pretrained(exports["stage2", "parts"] / "lm")
    assert len(AutoTokenizer.from_pretrained(exports["stage2", "parts"] / "lm")) == 102

    def same(a, b, part):
        x, y = _tensors(exports[a, "parts"] / part), _tensors(exports[b, "parts"] / part)
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    assert same("init", "stage1", "vision") and same("init", "stage1", "lm")  # stage 1
    assert same("init", "stage2", "vision") and not same("stage1", "stage2", "lm")  # stage 2
    x, y = _tensors(exports["init", "llava"]), _tensors(exports["stage1", "llava"])
    moved = {k for k in x if not torch.equal(x[k], y[k])}
    assert moved and all("multi_modal_projector" in k for k in moved), sorted(moved)
