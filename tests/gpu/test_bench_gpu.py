"""GPU tier for the benchmark side: fused SDPA backends, TE per component, TE vs local in bf16,
and one sweep layout on CUDA. Skipped without CUDA (and TE where named).

    PYTHONPATH=/tmp/site:$PWD python3 -m pytest -q tests/gpu      # via tools/gpu_check.sh
"""

from __future__ import annotations

import pytest
import torch

from mm_megatron.config import get_preset
from mm_megatron.model.specs import have_te

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
needs_te = pytest.mark.skipif(not have_te(), reason="needs Transformer Engine")


@pytest.fixture
def gpu_rank():
    from mm_megatron.config import ParallelConfig
    from mm_megatron.runtime import distributed

    pg = distributed.initialize(ParallelConfig(), seed=1)
    yield pg
    distributed.destroy()


def _model(spec: str, dtype=torch.bfloat16):
    from mm_megatron.model.build import build_llava_model

    cfg = get_preset("debug-tiny")
    cfg.set_spec(spec)
    return cfg, build_llava_model(cfg, dtype=dtype).cuda()


def _batch(cfg, seq=48, rows=2):
    from mm_megatron.bench.batches import synthetic_batch

    return synthetic_batch(
        cfg, seq, rows, generator=torch.Generator().manual_seed(0), device="cuda"
    )


def _loss(model, batch):
    loss, mask = model(**batch)
    return (loss.float() * mask).sum() / mask.sum()


def test_sdpa_uses_a_fused_backend(gpu_rank):
    """Our local attention must hit flash or memory-efficient SDPA, never the math fallback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    cfg, model = _model("local")
    batch = _batch(cfg)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(fused), profile(activities=[ProfilerActivity.CUDA]) as prof:
        _loss(model, batch).backward()
        torch.cuda.synchronize()
    names = " ".join(e.key.lower() for e in prof.key_averages())
    assert any(k in names for k in ("flash", "efficient", "fmha", "mem_eff")), names[:2000]


@needs_te
def test_te_components_forward_backward(gpu_rank):
    cfg, model = _model("te")
    _loss(model, _batch(cfg)).backward()
    for part in (model.vision_model, model.vision_projection, model.language_model):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@needs_te
def test_te_and_local_agree_in_bf16(gpu_rank):
    from tests.gpu.test_te_spec import local_to_te

    cfg, te_model = _model("te")
    _, local = _model("local")
    te_params = dict(te_model.named_parameters())
    with torch.no_grad():
        for name, p in local.named_parameters():
            p.copy_(te_params[local_to_te(name)])
    batch = _batch(cfg)
    te_model.eval()
    local.eval()
    with torch.no_grad():
        a, b = _loss(te_model, batch), _loss(local, batch)
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_one_sweep_layout_on_cuda(tmp_path):
    from mm_megatron.bench.sweep import SweepSettings, run_sweep

    rows = run_sweep(
        SweepSettings(preset="debug-tiny", steps=3, warmup=1, seq=48, mbs=2, timeout=300),
        ["tp1pp1cp1"],
        tmp_path,
    )
    assert rows[0]["status"] == "ok", rows[0]
    assert rows[0]["device"] == "cuda" and rows[0]["mfu"] is not None
