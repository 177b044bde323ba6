"""MiniCPM-V's resampler on one rank: agreement with a plain-PyTorch reference, forward and
backward, the token count, FLOPs measured on the module, one-line errors and two-stage freezing.

No transformers class exists for MiniCPM-V's resampler, so ``ReferenceResampler`` below is
written from the published description (Qwen-VL, Bai et al. 2023, sec. 2.1, whose resampler
MiniCPM-V 2.x uses): ``nn.MultiheadAttention`` over ``ln_kv(kv_proj(x))`` with keys + bicubically
interpolated 2D sin-cos positions, queries ``ln_q(query)`` + the query grid's positions, then
``ln_post`` and ``x @ proj``. The positions are MAE's numpy ``get_2d_sincos_pos_embed``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mm_megatron.config import ParallelConfig, get_preset
from mm_megatron.config.model_config import ProjectorConfig
from mm_megatron.config.resampler_config import ResamplerConfig
from mm_megatron.data.batch import ImageGeometry
from mm_megatron.model.build import build_llava_model, freeze
from mm_megatron.model.flops import train_step_flops
from mm_megatron.model.image_tokens import ImageTokenCounter
from mm_megatron.model.projector import build_projector, projector_class
from mm_megatron.model.transformer_configs import projector_transformer_config

# --- the reference, from the paper's description ------------------------------------------


def mae_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def mae_2d(dim: int, grid_size: int) -> np.ndarray:
    grid = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size))  # w first
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([mae_1d(dim // 2, grid[0]), mae_1d(dim // 2, grid[1])], axis=1)


def abs_pos(table: torch.Tensor, tokens: int) -> torch.Tensor:
    src, tgt = math.isqrt(table.shape[0]), math.isqrt(tokens)
    if src == tgt:
        return table
    img = table.reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = F.interpolate(img, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2)


class ReferenceResampler(torch.nn.Module):
    def __init__(self, grid: int, dim: int, heads: int, kv_dim: int, out_dim: int):
        super().__init__()
        self.register_buffer("pos_embed", torch.from_numpy(mae_2d(dim, grid)).float())
        self.query = torch.nn.Parameter(torch.zeros(grid * grid, dim))
        self.kv_proj = torch.nn.Linear(kv_dim, dim, bias=False)
        self.attn = torch.nn.MultiheadAttention(dim, heads)
        self.ln_q, self.ln_kv, self.ln_post = (torch.nn.LayerNorm(dim, eps=1e-6) for _ in "qkp")
        self.proj = torch.nn.Parameter(torch.zeros(dim, out_dim))

    def forward(self, x):  # [N, T, kv_dim]
        pos = abs_pos(self.pos_embed, x.shape[1])
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # [T, N, D]
        n = x.shape[1]
        q = self.ln_q(self.query)[:, None].repeat(1, n, 1)  # [Q, N, D]
        out = self.attn(q + self.pos_embed[:, None], x + pos[:, None], x)[0]
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj  # [N, Q, out_dim]


def load_reference(ref: ReferenceResampler, ours) -> None:
    with torch.no_grad():
        ref.query.copy_(ours.query)
        ref.kv_proj.weight.copy_(ours.kv_proj.weight)
        lin = (ours.linear_q, ours.linear_k, ours.linear_v)
        ref.attn.in_proj_weight.copy_(torch.cat([m.weight for m in lin]))
        # any key bias: softmax ignores it (ours has none)
        k_bias = torch.randn_like(ours.linear_q.bias)
        ref.attn.in_proj_bias.copy_(torch.cat([ours.linear_q.bias, k_bias, ours.linear_v.bias]))
        ref.attn.out_proj.weight.copy_(ours.linear_out.weight)
        ref.attn.out_proj.bias.copy_(ours.linear_out.bias)
        for name in ("ln_q", "ln_kv", "ln_post"):
            getattr(ref, name).weight.copy_(getattr(ours, name).weight)
            getattr(ref, name).bias.copy_(getattr(ours, name).bias)
        ref.proj.copy_(ours.proj.weight.T)


# --- helpers --------------------------------------------------------------------------------

KV_DIM, WIDTH, LM = 24, 32, 40


def build(num_queries: int, heads: int = 4, seed: int = 0):
    """Our resampler (TP=1): h_v 24 -> width 32 -> h_lm 40, randomised norms and biases."""
    cfg = get_preset("debug-tiny-resampler")
    cfg.lm.hidden_size = LM
    cfg.projector = ProjectorConfig(
        type="resampler",
        hidden_size=WIDTH,
        resampler=ResamplerConfig(num_queries=num_queries, num_heads=heads),
    )
    torch.manual_seed(seed)
    config = projector_transformer_config(cfg, ParallelConfig())
    pg = ProcessGroupCollection.use_mpu_process_groups()
    mod = build_projector(config, cfg.projector, KV_DIM, pg)
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if name.startswith("ln_") and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return cfg, mod


@pytest.mark.parametrize(
    "num_queries,tokens_in",
    [(9, 9), (9, 16), (64, 25), (16, 49)],
    ids=["same-grid", "keys-upsampled", "keys-downsampled", "16q-7x7"],
)
def test_matches_plain_pytorch_reference(single_rank, num_queries, tokens_in):
    cfg, ours = build(num_queries)
    ref = ReferenceResampler(math.isqrt(num_queries), WIDTH, 4, KV_DIM, LM)
    load_reference(ref, ours)
    assert torch.equal(ours.query_pos, ref.pos_embed)  # the positions agree exactly
    x = torch.randn(3, tokens_in, KV_DIM, generator=torch.Generator().manual_seed(1))
    got, want = ours(x), ref(x)
    assert got.shape == (3, num_queries, LM)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, err
    # the same image alone gives the same output (no cross-talk between tiles)
    torch.testing.assert_close(ours(x[1:2]), got[1:2], rtol=1e-5, atol=1e-6)


def test_forward_backward_reaches_every_parameter(single_rank):
    _, ours = build(16)
    x = torch.randn(2, 25, KV_DIM, requires_grad=True)
    ours(x).square().mean().backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    assert bool(x.grad.abs().sum() > 0)


def test_token_count_is_the_query_count_per_tile():
    cfg = get_preset("debug-tiny-resampler")
    counter = ImageTokenCounter.from_config(cfg)
    assert counter.tokens_per_tile == cfg.projector.resampler.num_queries == 16
    for tiles in (1, 3, 10):  # a source image plus slices: one fixed count per slice
        assert counter(ImageGeometry(num_tiles=tiles)) == 16 * tiles
    big = get_preset("minicpm-v-2.6")
    assert ImageTokenCounter.from_config(big).tokens_per_tile == 64
    assert big.vision.num_output_tokens == 32 * 32  # 448 / 14 squared, no class token


def test_flops_match_the_module_count(single_rank):
    cfg, ours = build(16)
    cls = projector_class("resampler")
    per_tile = cls.forward_flops(cfg.projector, KV_DIM, LM, 25)
    d, q, t = WIDTH, 16, 25
    hand = (
        2 * t * KV_DIM * d + 2 * 2 * t * d * d + 2 * 2 * q * t * d + 2 * q * d * d + 2 * q * d * LM
    )
    assert per_tile == hand
    measured = []
    for n in (1, 4):
        # the math backend runs attention as matmuls, which the counter sees
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            ours(torch.randn(n, 25, KV_DIM))
        measured.append(counter.get_total_flops())
    # per tile, plus the query projection once per call
    assert measured[1] - measured[0] == 3 * per_tile
    assert measured[0] - per_tile == 2 * q * d * d
    full = get_preset("debug-tiny-resampler")
    f = train_step_flops(full, [50], 2, training=False)
    v = full.vision
    assert f.projector == 2 * cls.forward_flops(
        full.projector, v.hidden_size, full.lm.hidden_size, v.num_output_tokens
    )


def test_bad_geometry_is_one_line():
    cfg = get_preset("debug-tiny-resampler")
    cfg.vision.drop_class_token = False  # 16 patches + class token: not a square grid
    with pytest.raises(ValueError, match=r"vision tokens per tile.*=17 is not a square") as e:
        ImageTokenCounter.from_config(cfg)
    assert "\n" not in str(e.value)
    cfg = get_preset("debug-tiny-resampler")
    cfg.projector.resampler.num_queries = 10
    with pytest.raises(ValueError, match=r"projector.resampler.num_queries=10 is not a square"):
        ImageTokenCounter.from_config(cfg)


def test_heads_must_split_over_tp(single_rank):
    cfg = get_preset("debug-tiny-resampler")
    cfg.projector.resampler.num_heads = 3
    with pytest.raises(
        ValueError, match=r"projector.resampler.num_heads=3 must divide the resampler width"
    ):
        build_llava_model(cfg)


def _batch(cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, cfg.lm.vocab_size, (2, 12), generator=gen)
    ids[0, 1], ids[1, 3], ids[1, 6] = (cfg.image_token_id,) * 3
    labels = ids.clone()
    labels[:, :2] = -100
    labels[ids == cfg.image_token_id] = -100
    v = cfg.vision
    images = torch.randn(3, 3, v.image_size, v.image_size, generator=gen)
    return dict(images=images, input_ids=ids, labels=labels, num_images=torch.tensor([1, 2]))


def test_two_stage_freezing(single_rank):
    """Stage 1 trains only the resampler; stage 2 the resampler and the LM (ViT frozen)."""
    cfg = get_preset("debug-tiny-resampler")
    torch.manual_seed(0)
    model = build_llava_model(cfg)
    b = _batch(cfg)
    for stage, lm_frozen in ((1, True), (2, False)):
        freeze(model, vision=True, projector=False, lm=lm_frozen)
        model.zero_grad(set_to_none=True)
        loss, mask = model(**b)
        assert loss.shape[1] == 12 + 2 * (16 - 1)  # row 1: two images of 16 tokens each
        ((loss * mask).sum() / mask.sum()).backward()
        for name, p in model.named_parameters():
            trained = name.startswith("vision_projection.") or (
                stage == 2 and name.startswith("language_model.")
            )
            assert (p.grad is not None) == trained, (stage, name)
            if trained:
                assert bool(torch.isfinite(p.grad).all()), (stage, name)
        grads = [p.grad for n, p in model.named_parameters() if n.endswith("kv_proj.weight")]
        assert grads and bool(grads[0].abs().sum() > 0)
