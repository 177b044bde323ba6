"""TE-spec checks (GPU tier): skipped without CUDA and Transformer Engine.

Run on a GPU machine with megatron-core + TE installed (see ../shared/gpu/README.md):

    PYTHONPATH=/tmp/site:$PWD python3 -m pytest -q tests/gpu

* the TE spec builds and trains (forward/backward) the debug-tiny model in bf16;
* TE and local specs agree on the same weights (norms mapped between the fused TE names and the
  local ones) within bf16 tolerance;
* TE's sequence-parallel and context-parallel code paths run at world size 1 (SP needs TP > 1 to
  shard anything, so at one GPU we exercise the padded/packed THD path TE's CP uses).
"""

from __future__ import annotations

import pytest
import torch

from mm_megatron.config import get_preset
from mm_megatron.model.specs import have_te

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and have_te()), reason="needs CUDA and Transformer Engine"
    ),
]

_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}


def local_to_te(name: str) -> str:
    for old, new in _TE_NAMES.items():
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


def _batch(cfg, device):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, cfg.lm.vocab_size, (2, 24), generator=gen)
    ids[0, 3] = cfg.image_token_id
    labels = ids.clone()
    v = cfg.vision
    imgs = torch.randn(1, 3, v.image_size, v.image_size, generator=gen)
    return dict(
        images=imgs.to(device),
        input_ids=ids.to(device),
        labels=labels.to(device),
        num_images=torch.tensor([1, 0], device=device),
    )


@pytest.fixture
def gpu_rank():
    from mm_megatron.config import ParallelConfig
    from mm_megatron.runtime import distributed

    pg = distributed.initialize(ParallelConfig(), seed=1)
    yield pg
    distributed.destroy()


def _build(spec: str, dtype=torch.bfloat16):
    from mm_megatron.model.build import build_llava_model

    cfg = get_preset("debug-tiny")
    cfg.set_spec(spec)
    return cfg, build_llava_model(cfg, dtype=dtype).cuda()


def test_te_forward_backward(gpu_rank):
    cfg, model = _build("te")
    loss, mask = model(**_batch(cfg, "cuda"))
    total = (loss * mask).sum() / mask.sum()
    total.backward()
    assert torch.isfinite(total)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_te_matches_local(gpu_rank):
    cfg, te_model = _build("te", torch.float32)
    _, local = _build("local", torch.float32)
    te_params = dict(te_model.named_parameters())
    with torch.no_grad():
        for name, p in local.named_parameters():
            p.copy_(te_params[local_to_te(name)])
    b = _batch(cfg, "cuda")
    te_model.eval()
    local.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        lt, mt = te_model(**b)
        ll, ml = local(**b)
    assert torch.equal(mt, ml)
    torch.testing.assert_close(lt.float(), ll.float(), rtol=2e-2, atol=2e-2)


def test_te_packed_thd_path(gpu_rank):
    cfg, model = _build("te")
    b = _batch(cfg, "cuda")
    b["seq_lens"] = torch.tensor([[10, 14], [24, 0]], device="cuda")
    loss, mask = model(**b)
    assert torch.isfinite((loss * mask).sum())
