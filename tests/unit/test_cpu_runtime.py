"""Each accommodation of the CPU runtime (mm_megatron/runtime/cpu_runtime.py)."""

from __future__ import annotations

import pytest
import torch

from mm_megatron.runtime import cpu_runtime


@pytest.fixture(autouse=True)
def runtime():
    cpu_runtime.activate()
    yield


def test_device_redirect_factories_and_moves():
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"
    x = torch.arange(3.0)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert x.to(device="cuda:0", dtype=torch.float64).dtype == torch.float64
    assert x.to(torch.float16).dtype == torch.float16  # non-device .to untouched
    pinned = torch.tensor([1, 2], device="cpu", pin_memory=True).cuda(non_blocking=True)
    assert pinned.tolist() == [1, 2] and x.pin_memory() is x
    # megatron's optimizer/clip_grads check param.type() for CUDA names
    assert x.type() == "torch.cuda.FloatTensor"
    assert x.type(torch.float64).dtype == torch.float64


def test_cuda_standins():
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
    torch.cuda.synchronize()
    torch.cuda.set_device(0)
    torch.cuda.manual_seed(5)
    a = torch.rand(3)
    torch.cuda.manual_seed(5)
    assert torch.equal(a, torch.rand(3))
    state = torch.cuda.get_rng_state()
    b = torch.rand(2)
    torch.cuda.set_rng_state(state)
    assert torch.equal(b, torch.rand(2))
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ev0.record()
    ev1.record()
    assert ev0.elapsed_time(ev1) >= 0


def test_rng_tracker_fork_isolates_and_restores(single_rank):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork():
        inside1 = torch.rand(4)
    # default stream untouched by the fork
    assert torch.equal(torch.get_rng_state(), before)
    with tracker.fork():
        inside2 = torch.rand(4)
    assert not torch.equal(inside1, inside2)  # the forked stream advanced


def test_causal_mask_and_memory_buffer():
    from megatron.core.transformer.utils import get_default_causal_mask
    from megatron.core.utils import GlobalMemoryBuffer

    m = get_default_causal_mask(3)
    assert m.device.type == "cpu" and m.tolist()[0] == [False, True, True]
    buf = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x")
    assert buf.device.type == "cpu"


def test_rotary_embedding_on_cpu():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0)
    emb = rope(6)
    assert emb.device.type == "cpu" and emb.shape == (6, 1, 1, 8)


def test_broadcast_data(single_rank):
    from megatron.core.tensor_parallel import broadcast_data

    data = {"x": torch.arange(4)}
    out = broadcast_data(["x"], data, torch.int64)
    assert torch.equal(out["x"], data["x"])


def test_version_check(monkeypatch):
    from importlib import metadata

    assert cpu_runtime.check_megatron_version() == cpu_runtime.PINNED_MEGATRON_CORE
    monkeypatch.setattr(metadata, "version", lambda name: "0.0.1")
    with pytest.raises(cpu_runtime.MegatronVersionError, match="0.0.1 is installed"):
        cpu_runtime.check_megatron_version()


def test_not_activated_when_cuda_in_use(monkeypatch):
    cpu_runtime.deactivate()
    try:
        assert not cpu_runtime.is_active()
        orig = torch.cuda.current_device
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert cpu_runtime.activate() is False
        assert not cpu_runtime.is_active()
        assert torch.cuda.current_device is orig  # nothing patched
    finally:
        monkeypatch.undo()
        cpu_runtime.activate()


def test_deactivate_restores():
    cpu_runtime.deactivate()
    try:
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")
    finally:
        cpu_runtime.activate()
    assert torch.zeros(1, device="cuda").device.type == "cpu"


def test_backward_allocations_outside_the_mode():
    """Custom autograd backward runs without the torch-function mode; current_device covers it."""

    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            out = torch.empty(g.shape, dtype=g.dtype, device=torch.cuda.current_device())
            out.copy_(g * 2)
            return out

    x = torch.ones(3, requires_grad=True)
    F.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))


@pytest.mark.parametrize("force", [False, True])
def test_force_cpu_switch_picks_gloo_and_the_cpu_runtime(monkeypatch, force):
    """With CUDA present, MM_MEGATRON_FORCE_CPU=1 selects gloo, the runtime and CPU configs."""
    from mm_megatron.runtime import distributed
    from mm_megatron.train.components import resolve_dtype

    cpu_runtime.deactivate()
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        if force:
            monkeypatch.setenv(cpu_runtime.FORCE_CPU_ENV, "1")
        else:
            monkeypatch.delenv(cpu_runtime.FORCE_CPU_ENV, raising=False)
        assert cpu_runtime.on_cpu() is force
        assert distributed.default_backend() == ("gloo" if force else "nccl")
        assert cpu_runtime.transformer_config_accommodations() == dict(
            use_cpu_initialization=force, batch_p2p_comm=not force
        )
        assert resolve_dtype("auto") == (torch.float32 if force else torch.bfloat16)
        assert cpu_runtime.activate() is force
        assert cpu_runtime.is_active() is force
        assert torch.cuda.is_available() is not force  # forced: everyone sees the CPU world
        assert cpu_runtime.on_cpu() is force  # still true once the runtime is active
    finally:
        cpu_runtime.deactivate()  # NOTE: before undo, so the runtime restores the fake first
        monkeypatch.undo()
        cpu_runtime.activate()


def test_lm_config_takes_the_switch(monkeypatch):
    from mm_megatron.config import ParallelConfig, get_preset
    from mm_megatron.model.transformer_configs import lm_transformer_config

    cfg, par = get_preset("debug-tiny"), ParallelConfig(pp=2)
    monkeypatch.setenv(cpu_runtime.FORCE_CPU_ENV, "1")
    c = lm_transformer_config(cfg, par)
    assert c.use_cpu_initialization and not c.batch_p2p_comm
