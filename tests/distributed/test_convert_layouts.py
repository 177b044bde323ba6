"""One converted checkpoint, loaded at TP1, TP2, PP2 and TP2xPP2 on 4 CPU gloo ranks.

A single spawned world runs every layout in turn (process start-up dominates the cost): logits
must match transformers' for a GQA Llama (vocab 100, padded to 104 at TP1 and 112 at TP2) and a
tied-embedding, qkv-bias Qwen2 (vocab 120 -> 128 at TP2). The world also re-saves the Llama
checkpoint from TP2xPP2 with ``model_io.save_checkpoint`` (as training would); that checkpoint must
load back at TP1 and export to HF bit-exactly. Finally ``convert verify --pp 2`` spawns its own
(two-process) world.
"""

from __future__ import annotations

import pytest
import torch

from mm_megatron.convert.tiny_models import hf_logits, make_inputs, save_tiny_hf
from tests.distributed.launcher import run_distributed

pytestmark = pytest.mark.distributed

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
VARIANTS = ("llama", "qwen2", "mistral")  # mistral: a list of vision feature layers
ATOL = 1e-4


def _world(rank, world_size, jobs):
    """Run each job on every rank; returns this rank's results (None where not applicable)."""
    from mm_megatron.checkpoint import model_io
    from mm_megatron.config.parallel_config import ParallelConfig
    from mm_megatron.convert.verify import layout_logits
    from mm_megatron.model.build import build_llava_model
    from mm_megatron.runtime import distributed

    out = []
    for kind, ckpt, arg, tp, pp in jobs:
        if kind == "logits":
            out.append(layout_logits(ckpt, arg, tp, pp))
        else:  # "save": load at (tp, pp) and save again as iteration 7 into `arg`
            par = ParallelConfig(tp=tp, pp=pp)
            distributed.initialize(par)
            cfg = model_io.read_run_config(ckpt).model
            model = build_llava_model(cfg, par)
            model_io.load_checkpoint(model, ckpt)
            model_io.save_checkpoint(model, arg, cfg, iteration=7, provenance_from=ckpt)
            out.append(None)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Convert, run the world once; returns (refs, results, paths)."""
    from transformers import LlavaForConditionalGeneration

    from mm_megatron.convert.hf_to_mcore import hf_to_mcore

    base = tmp_path_factory.mktemp("layouts")
    refs, batches, paths = {}, {}, {}
    for variant in VARIANTS:
        hf = base / f"hf_{variant}"
        save_tiny_hf(hf, variant, seed=3)
        mc = hf_to_mcore(hf, base / f"mc_{variant}", progress=False, make_vocab_size_divisible_by=8)
        model = LlavaForConditionalGeneration.from_pretrained(
            hf, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        batch = make_inputs(model.config, batch=2, text_len=11, seed=5)
        refs[variant] = hf_logits(model, batch["hf"])
        batches[variant] = batch["ours"]
        paths[variant] = (hf, mc)
    resaved = base / "resaved"
    jobs = [
        ("logits", str(paths[v][1]), batches[v], tp, pp) for v in VARIANTS for tp, pp in LAYOUTS
    ]
    jobs.append(("save", str(paths["llama"][1]), str(resaved), 2, 2))
    jobs.append(("logits", str(resaved), batches["llama"], 1, 1))
    jobs.append(("logits", str(resaved), batches["llama"], 1, 2))
    per_rank = run_distributed(_world, 4, jobs, timeout=600)
    results = []
    for j, job in enumerate(jobs):
        got = [r[j] for r in per_rank if r[j] is not None]
        assert len(got) == (0 if job[0] == "save" else 1), (job[0], job[3:], len(got))
        results.append((job, got[0] if got else None))
    return refs, results, paths, resaved


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_logits_match_transformers_at_every_layout(world, variant, tp, pp):
    refs, results, paths, _ = world
    ckpt = str(paths[variant][1])
    logits = next(
        r
        for (kind, c, _, t, p), r in results
        if kind == "logits" and c == ckpt and (t, p) == (tp, pp)
    )
    ref = refs[variant]
    assert logits.shape == ref.shape  # TP-gathered, vocab padding stripped
    assert (logits - ref).abs().max().item() <= ATOL
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))


def test_checkpoint_saved_at_tp2_pp2_reloads_and_exports_exactly(world, tmp_path):
    from mm_megatron.checkpoint import model_io
    from mm_megatron.checkpoint.safetensors_io import read_header, read_tensor
    from mm_megatron.convert.mcore_to_hf import mcore_to_hf

    refs, results, paths, resaved = world
    assert model_io.read_tracker(resaved) == 7
    stored = model_io.stored_tensors(resaved / "iter_0000007")
    # saved by TP2 ranks: the embedding carries TP2's padding (100 -> 112), not TP1's (104)
    assert stored["model.language_model.embedding.word_embeddings.weight"][0] == (112, 64)
    for (kind, ckpt, _, tp, pp), logits in results:
        if kind == "logits" and ckpt == str(resaved):
            assert (logits - refs["llama"]).abs().max().item() <= ATOL, (tp, pp)
    hf = paths["llama"][0]
    out = mcore_to_hf(resaved, tmp_path / "hf", progress=False)
    a, _ = read_header(hf / "model.safetensors")
    b, _ = read_header(out / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(read_tensor(a[k]), read_tensor(b[k])), k


def test_verify_cli_spawns_its_own_world(world, capsys):
    from mm_megatron.cli import main

    _, _, paths, _ = world
    hf, mc = paths["qwen2"]
    args = ["convert", "verify", "--hf", str(hf), "--ckpt", str(mc), "--tp", "1", "--pp", "2"]
    assert main([*args, "--atol", str(ATOL)]) == 0
    out = capsys.readouterr().out
    assert "logits TP1xPP2  PASS" in out and "overall: PASS" in out
