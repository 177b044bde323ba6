"""``convert assemble --qformer-from``: MiniGPT-4's init (BLIP-2's Q-Former into a fresh model)
through the CLI, then loaded from the dist checkpoint at TP1 and TP2 (2 gloo ranks; the heads
and MLP are split on load) and compared with transformers' Q-Former on the same features.

Tiny parts built with transformers' own classes: CLIPVisionModel (width 32) + Llama (width 64)
+ a BLIP-2 whose Q-Former cross-attends to width 32 and projects to width 64 (so its
``language_projection`` is taken too); an InstructBLIP projecting to width 40 (kept fresh).
"""

from __future__ import annotations

import json

import pytest
import torch

from mm_megatron.cli import main
from mm_megatron.convert.tiny_models import save_tiny_lm, save_tiny_vision
from tests.distributed.launcher import run_distributed
from tests.unit.test_qformer import hf_forward, hf_model

pytestmark = pytest.mark.distributed


def _projector_out(rank, world_size, ckpt, feats):
    from mm_megatron.checkpoint import model_io
    from mm_megatron.config import ParallelConfig
    from mm_megatron.model.build import build_llava_model
    from mm_megatron.runtime import distributed

    distributed.initialize(ParallelConfig(tp=world_size), seed=5)
    try:
        cfg = model_io.read_run_config(ckpt).model
        model = build_llava_model(cfg, ParallelConfig(tp=world_size)).eval()
        model_io.load_checkpoint(model, ckpt)
        with torch.no_grad():
            return model.vision_projection(feats)  # gathered over TP: the same on every rank
    finally:
        distributed.destroy()


def _asm(d, *extra):
    args = ["convert", "assemble", "--vision", str(d / "vision"), "--lm", str(d / "lm")]
    return [*args, "--quiet", "--make-vocab-size-divisible-by", "8", *extra]


@pytest.mark.timeout(900)
def test_assembled_qformer_matches_transformers_at_tp1_and_tp2(tmp_path, capsys):
    save_tiny_vision(tmp_path / "vision", "clip", seed=1)
    save_tiny_lm(tmp_path / "lm", "llama", seed=2)
    blip2 = hf_model("blip-2", encoder_width=32, lm_width=64)
    blip2.save_pretrained(tmp_path / "blip2")
    ckpt = tmp_path / "ckpt"
    assert main(_asm(tmp_path, "--out", str(ckpt), "--qformer-from", str(tmp_path / "blip2"))) == 0
    cfg = json.loads((ckpt / "mm_megatron.json").read_text())
    assert cfg["model"]["projector"]["type"] == "qformer"
    assert cfg["model"]["projector"]["qformer"]["num_query_tokens"] == 6

    feats = torch.randn(2, 16, 32)
    with torch.no_grad():
        ref = hf_forward(blip2, feats)
    tp1 = run_distributed(_projector_out, 1, ckpt, feats)[0]
    tp2 = run_distributed(_projector_out, 2, ckpt, feats)
    for name, got in (("TP1", tp1), ("TP2 rank 0", tp2[0]), ("TP2 rank 1", tp2[1])):
        err = (got - ref).abs().max().item()
        with capsys.disabled():
            print(f"{name}: max |ours - transformers| = {err:.2e}")
        assert err < 1e-5, name

    # InstructBLIP projecting to width 40: the Q-Former is taken, the projection kept fresh
    instruct = hf_model("instructblip", encoder_width=32, lm_width=40)
    instruct.save_pretrained(tmp_path / "instruct")
    out2 = tmp_path / "ckpt2"
    assert (
        main(_asm(tmp_path, "--out", str(out2), "--qformer-from", str(tmp_path / "instruct"))) == 0
    )
    assert "language_projection.weight kept freshly initialised" in capsys.readouterr().out

    # a Q-Former made for another vision width: one line naming the file and both widths
    hf_model("blip-2", encoder_width=24).save_pretrained(tmp_path / "blip2-24")
    bad = _asm(tmp_path, "--out", str(tmp_path / "x"), "--qformer-from", str(tmp_path / "blip2-24"))
    assert main(bad) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "encoder_hidden_size=24" in line and "features of width 32" in line, line
    assert not (tmp_path / "x").exists()
