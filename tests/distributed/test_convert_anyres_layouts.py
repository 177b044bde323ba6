"""LLaVA-NeXT and LLaVA-OneVision checkpoints loaded at TP1 and TP2 x PP2 on 4 CPU gloo ranks.

Logits must match transformers' (fp32, max |diff| <= 1e-4, identical argmax) on ``convert
verify``'s anyres batch: images of three aspect ratios (three tile grids; OneVision's
``anyres_max`` down-scaling included), two images in one sample (OneVision: one tile each, the
HF model given ``batch_num_images``), a text-only sample and right padding. One spawned world runs
both checkpoints at both layouts.
"""

from __future__ import annotations

import pytest
import torch

from mm_megatron.convert.llava_next import NEXT, ONEVISION, anyres_verify_inputs, tiny_anyres_model
from tests.distributed.launcher import run_distributed

pytestmark = pytest.mark.distributed

FAMILIES = (NEXT, ONEVISION)
LAYOUTS = [(1, 1), (2, 2)]
ATOL = 1e-4


def _world(rank, world_size, jobs):
    from mm_megatron.convert.verify import layout_logits

    return [layout_logits(ckpt, batch, tp, pp) for ckpt, batch, tp, pp in jobs]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mm_megatron.checkpoint import model_io
    from mm_megatron.convert.hf_to_mcore import hf_to_mcore

    base = tmp_path_factory.mktemp("anyres-layouts")
    refs, jobs = {}, []
    for family in FAMILIES:
        model = tiny_anyres_model(family, seed=3)
        hf = base / f"hf_{family}"
        model.save_pretrained(hf)
        mc = hf_to_mcore(hf, base / f"mc_{family}", progress=False, make_vocab_size_divisible_by=8)
        batch = anyres_verify_inputs(model.config, model_io.read_run_config(mc).model, seed=5)
        model.config._attn_implementation = "eager"
        with torch.no_grad():
            refs[family] = model(**batch["hf"], use_cache=False).logits.float()
        jobs += [(str(mc), batch["ours"], tp, pp) for tp, pp in LAYOUTS]
        refs[family, "lengths"] = batch["lengths"]
        refs[family, "num_tiles"] = batch["ours"]["num_tiles"].tolist()
    per_rank = run_distributed(_world, 4, jobs, timeout=600)
    results = {}
    for j, (ckpt, _, tp, pp) in enumerate(jobs):
        got = [r[j] for r in per_rank if r[j] is not None]
        assert len(got) == 1, (ckpt, tp, pp, len(got))
        family = NEXT if ckpt.endswith(NEXT) else ONEVISION
        results[family, tp, pp] = got[0]
    return refs, results


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_anyres_logits_match_transformers(world, family, tp, pp):
    refs, results = world
    ref, ours = refs[family], results[family, tp, pp]
    multi = refs[family, "num_tiles"][:2]  # sample 0's two images: one tile each, or grids
    assert (multi == [1, 1]) == (family == ONEVISION) and min(multi) >= 1, multi
    lengths = refs[family, "lengths"]
    for i, n in enumerate(lengths):  # real positions of each sample
        a, b = ours[i, :n], ref[i, :n]
        assert (a - b).abs().max().item() <= ATOL, (family, tp, pp, i)
        assert torch.equal(a.argmax(-1), b.argmax(-1)), (family, tp, pp, i)
    worst = max((ours[i, :n] - ref[i, :n]).abs().max().item() for i, n in enumerate(lengths))
    print(f"{family} TP{tp}xPP{pp}: max |logit diff| {worst:.3g}")
