"""``convert verify-parts`` at TP2xPP2 on 4 CPU gloo ranks: assembled checkpoints vs their parts.

Two assemblies run in one spawned world (process start-up dominates the cost): CLIPVisionModel +
Llama (vocab grown 100 -> 102, padded to 112 at TP2) and SiglipModel + Qwen2 (tied embeddings
across the two pipeline stages, qkv bias). The vision features (first stage) and the text-only LM
logits (last stage, on the LM's own vocabulary) must match transformers' to 1e-4 with identical
argmax; ``test_convert_assemble.py`` checks TP1 through the CLI.
"""

from __future__ import annotations

import pytest
import torch

from mm_megatron.convert.tiny_models import save_tiny_lm, save_tiny_vision
from tests.distributed.launcher import run_distributed

pytestmark = pytest.mark.distributed

PAIRS = {"clip+llama": ("clip", "llama"), "siglip+qwen2": ("siglip-model", "qwen2")}
ATOL = 1e-4


def _world(rank, world_size, jobs):
    from mm_megatron.convert.verify_parts import _layout_worker

    return [_layout_worker(rank, world_size, ckpt, inputs, 2, 2) for ckpt, inputs in jobs]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{pair: (checks)} from one 4-rank world."""
    from mm_megatron.checkpoint import model_io
    from mm_megatron.convert.assemble import assemble
    from mm_megatron.convert.verify_parts import hf_references

    base = tmp_path_factory.mktemp("parts")
    jobs, refs = [], {}
    for name, (vision, lm) in PAIRS.items():
        d = base / name
        save_tiny_vision(d / "vision", vision, seed=3)
        save_tiny_lm(d / "lm", lm, seed=4)
        ckpt = assemble(d / "vision", d / "lm", d / "ckpt", progress=False)
        cfg = model_io.read_run_config(ckpt).model
        inputs, refs[name] = hf_references(d / "vision", d / "lm", cfg, seed=1)
        jobs.append((str(ckpt), inputs))
    per_rank = run_distributed(_world, 4, jobs, timeout=600)
    out = {}
    for j, name in enumerate(PAIRS):
        feats = [r[j][0] for r in per_rank if r[j][0] is not None]
        logits = [r[j][1] for r in per_rank if r[j][1] is not None]
        assert len(feats) == 1 and len(logits) == 1, (name, len(feats), len(logits))
        out[name] = (feats[0], logits[0], refs[name])
    return out


@pytest.mark.parametrize("pair", list(PAIRS))
def test_vision_features_match_at_tp2_pp2(results, pair):
    feats, _, ref = results[pair]
    assert feats.shape == ref["features"].shape
    assert (feats - ref["features"]).abs().max().item() <= ATOL


@pytest.mark.parametrize("pair", list(PAIRS))
def test_lm_logits_match_at_tp2_pp2(results, pair):
    _, logits, ref = results[pair]
    vocab = ref["logits"].shape[-1]
    assert logits.shape[-1] == {"clip+llama": 102, "siglip+qwen2": 120}[pair]  # padding stripped
    ours = logits[..., :vocab]
    assert (ours - ref["logits"]).abs().max().item() <= ATOL
    assert torch.equal(ours.argmax(-1), ref["logits"].argmax(-1))
