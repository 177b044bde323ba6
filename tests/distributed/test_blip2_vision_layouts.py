"""``vision.style="blip2"`` (BLIP-2's EVA tower) at TP2, and through every layout.

1. The MiniGPT-4 init (``convert assemble --vision BLIP2 --qformer-from BLIP2``, tiny random
   BLIP-2 from transformers' own classes) loaded at TP2 and TP2+SP (heads split; under SP the
   17 positions are padded to 18 and scattered): our features equal transformers'
   ``last_hidden_state`` and our projector output its Q-Former + ``language_projection``, fp32,
   1e-5, on both ranks.
2. Layout parity: one training step of a model with a trained ``blip2`` tower (the class token
   kept, post-LayerNorm on) gives the single-rank loss, gradients and Adam-updated parameters at
   TP2, TP2+SP, PP2 and CP2; the key thirds of every ViT QKV bias get exactly zero gradient and
   keep their (random, non-zero here) loaded values in every layout.
"""

from __future__ import annotations

import pytest
import torch

from mm_megatron.cli import main
from mm_megatron.config.presets_blip2 import as_blip2_tower
from mm_megatron.convert.tiny_models import save_tiny_lm
from tests.distributed.launcher import run_distributed
from tests.distributed.parity import (
    assert_parity,
    full_weights,
    make_batches,
    run_layouts,
    tiny_config,
)
from tests.unit.test_blip2_vision import _asm, blip2_model, hf_outputs

pytestmark = pytest.mark.distributed

CASES = [dict(tp=2), dict(tp=2, sequence_parallel=True), dict(pp=2), dict(cp=2)]


def blip2_config():
    """The parity harness's tiny model with BLIP-2's tower style (two layers, all read)."""
    cfg = tiny_config()
    cfg.vision = as_blip2_tower(cfg.vision)
    return cfg


def _reference(cfg, batches):
    """(full weights, the one-rank step), in this process (no world to spawn)."""
    from mm_megatron.runtime import distributed

    weights = full_weights(cfg)
    try:
        return weights, run_layouts(0, 1, [({}, False, False)], cfg, weights, batches)[0]
    finally:
        distributed.destroy()


def _assembled_outputs(ckpt, images, layouts):
    """Our (features, projector output) of the assembled checkpoint, one pair per layout."""
    from mm_megatron.checkpoint import model_io
    from mm_megatron.config import ParallelConfig
    from mm_megatron.model.build import build_llava_model
    from mm_megatron.runtime import distributed

    out = []
    for layout in layouts:
        par = ParallelConfig(**layout)
        distributed.initialize(par, seed=5)  # re-initialises megatron's groups, keeps the world
        model = build_llava_model(model_io.read_run_config(ckpt).model, par).eval()
        model_io.load_checkpoint(model, ckpt)
        with torch.no_grad():
            feats = model.vision_model(images)
            out.append((feats, model.vision_projection(feats)))
    return out


def _worker(rank, world_size, ckpt, images, cfg, weights, batches):
    tp = [dict(tp=2), dict(tp=2, sequence_parallel=True)]
    converted = _assembled_outputs(ckpt, images, tp)
    jobs = [(layout, False, False) for layout in CASES]
    return converted, run_layouts(rank, world_size, jobs, cfg, weights, {False: batches})


@pytest.mark.timeout(1200)
def test_blip2_tower_at_tp2_and_in_every_layout(tmp_path, capsys):
    hf = blip2_model("blip-2")
    hf.save_pretrained(tmp_path / "blip2")
    save_tiny_lm(tmp_path / "lm", "llama", seed=2)
    ckpt = tmp_path / "ckpt"
    blip2 = str(tmp_path / "blip2")
    assert main(_asm(blip2, tmp_path / "lm", ckpt, "--qformer-from", blip2)) == 0
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref_feats, ref_out = hf_outputs(hf, images)

    cfg = blip2_config()
    batches = make_batches(cfg)
    weights, ref = _reference(cfg, {False: batches})
    results = run_distributed(_worker, 2, ckpt, images, cfg, weights, batches, timeout=1000)

    for rank, (converted, _) in enumerate(results):
        for name, (feats, out) in zip(("TP2", "TP2+SP"), converted):
            ef = (feats - ref_feats).abs().max().item()
            eq = (out - ref_out).abs().max().item()
            with capsys.disabled():
                print(f"{name} rank {rank}: features max |diff| {ef:.2e}, Q-Former {eq:.2e}")
            assert ef <= 1e-5 and eq <= 1e-5, (name, rank)

    heads = cfg.vision.num_attention_heads
    for layout, got in zip(CASES, results[0][1]):
        assert_parity(ref, got, what=str(layout))
        worst = max(
            float((got[kind][k] - r).norm() / r.norm().clamp_min(1e-12))
            for kind in ("grads", "params")
            for k, r in ref[kind].items()
        )
        with capsys.disabled():
            print(
                f"{layout}: loss {got['loss']:.8f} (one rank {ref['loss']:.8f}), worst {worst:.1e}"
            )
        for i in range(cfg.vision.num_layers_built):
            name = f"vision_model.decoder.layers.{i}.self_attention.linear_qkv.bias"
            grad = got["grads"][name].view(heads, 3, -1)
            assert torch.count_nonzero(grad[:, 1]) == 0 and grad[:, 0].abs().sum() > 0, layout
            moved = (got["params"][name] - weights[name]).view(heads, 3, -1)
            assert torch.count_nonzero(moved[:, 1]) == 0 and moved[:, 2].abs().sum() > 0
        assert got["grads"]["vision_model.post_layernorm.weight"].abs().sum() > 0
