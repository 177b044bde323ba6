"""The ``qformer`` connector on one rank: agreement with transformers' BLIP-2 / InstructBLIP
Q-Former (fp32, 1e-5), token count, FLOPs against a hand count and a FLOP counter, forward and
backward through the whole model, two-stage freezing, and the one-line errors."""

from __future__ import annotations

import re

import pytest
import torch

from mm_megatron.config import get_preset
from mm_megatron.config.parallel_config import ParallelConfig
from mm_megatron.convert.qformer import (
    QFormerNaming,
    hf_qformer_tensors,
    init_qformer,
    qformer_config_from_hf,
)
from mm_megatron.model.build import build_llava_model
from mm_megatron.model.flops import projector_forward_flops, train_step_flops
from mm_megatron.model.image_tokens import image_token_count
from mm_megatron.model.projector import build_projector, projector_class
from mm_megatron.model.transformer_configs import projector_transformer_config
from tests.unit.test_model import batch, mean_loss

QFORMER = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    encoder_hidden_size=24,
    cross_attention_frequency=2,
    vocab_size=100,
)
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
TEXT = dict(
    model_type="llama",
    hidden_size=40,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    vocab_size=100,
)


def hf_model(kind: str, encoder_width: int = 24, lm_width: int = 40):
    """A tiny random BLIP-2 / InstructBLIP (non-trivial norms and biases), fp32, eval mode."""
    import transformers as tf

    cfg_cls, model_cls = {
        "blip-2": (tf.Blip2Config, tf.Blip2ForConditionalGeneration),
        "instructblip": (tf.InstructBlipConfig, tf.InstructBlipForConditionalGeneration),
    }[kind]
    config = cfg_cls(
        vision_config=dict(VISION, hidden_size=encoder_width),
        qformer_config=dict(QFORMER, encoder_hidden_size=encoder_width),
        text_config=dict(TEXT, hidden_size=lm_width),
        num_query_tokens=6,
    )
    # two attention implementations: transformers' own matmuls (eager) and SDPA
    config._attn_implementation = "eager" if kind == "instructblip" else "sdpa"
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n or "layernorm" in n:
                p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif n == "query_tokens":
                p.copy_(torch.randn_like(p))
    return model


def our_projector(hf, lm_hidden: int):
    """Our ``qformer`` projector at TP1 with the HF model's tensors (needs parallel state)."""
    cfg = get_preset("debug-tiny-qformer")
    cfg.projector.qformer = qformer_config_from_hf(hf.config)
    cfg.lm.hidden_size = lm_hidden
    config = projector_transformer_config(cfg, ParallelConfig())
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    proj = build_projector(config, cfg.projector, QFORMER["encoder_hidden_size"], pgs)
    fresh = {n: p.detach() for n, p in proj.named_parameters()}
    tensors, notes = init_qformer(fresh, hf_qformer_tensors(hf.state_dict()))
    proj.load_state_dict(tensors, strict=True)
    return proj.eval(), notes


def hf_forward(hf, feats):
    q = hf.query_tokens.expand(feats.shape[0], -1, -1)
    text = {"input_ids": None} if hf.config.model_type == "instructblip" else {}  # no instruction
    out = hf.qformer(query_embeds=q, encoder_hidden_states=feats, **text).last_hidden_state
    return hf.language_projection(out[:, : q.shape[1]])


@pytest.mark.parametrize("kind", ["blip-2", "instructblip"])
def test_matches_transformers_qformer(single_rank, kind):
    hf = hf_model(kind)
    proj, notes = our_projector(hf, TEXT["hidden_size"])
    assert notes == []
    feats = torch.randn(3, 17, QFORMER["encoder_hidden_size"], requires_grad=True)
    ours = proj(feats)
    ref = hf_forward(hf, feats)
    assert ours.shape == (3, 6, TEXT["hidden_size"])
    err = (ours - ref).abs().max().item()
    print(f"{kind}: max |ours - transformers| = {err:.2e} (output scale {ref.abs().max():.2f})")
    assert err < 1e-5
    grad_ours = torch.autograd.grad(ours.square().sum(), feats)[0]
    grad_ref = torch.autograd.grad(ref.square().sum(), feats)[0]
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-5, rtol=1e-5)


def test_language_projection_kept_fresh_when_widths_differ(single_rank):
    hf = hf_model("blip-2")
    proj, notes = our_projector(hf, 64)  # BLIP-2's LM is 40 wide
    assert len(notes) == 2 and all("kept freshly initialised" in n for n in notes)
    torch.testing.assert_close(
        proj.layers[0].crossattention.key.weight,
        hf.qformer.state_dict()["encoder.layer.0.crossattention.attention.key.weight"],
    )


def test_naming_round_trips_every_used_key():
    hf = hf_model("instructblip")
    naming = QFormerNaming.detect(hf.state_dict())
    used = {k: naming.to_canonical(k) for k in hf.state_dict()}
    used = {k: v for k, v in used.items() if v is not None}
    # query tokens, query LN, 3 layers x (self-attention 10 + MLP 6), 2 cross x 10, projection
    assert len(used) == 1 + 2 + 3 * 16 + 2 * 10 + 2
    assert all(naming.to_file(v) == k for k, v in used.items())
    text_path = re.compile(
        r"embeddings\.(word|position)_embeddings|layer\.\d+\.(intermediate|output)\."
    )
    assert not any(text_path.search(k) for k in used)
    assert sum(bool(text_path.search(k)) for k in hf.state_dict()) == 2 + 3 * 6


def test_missing_or_misshaped_tensor_is_one_line(single_rank):
    hf = hf_model("blip-2")
    state = hf_qformer_tensors(hf.state_dict())
    del state["layers.1.output.weight"]
    with pytest.raises(ValueError, match=r"'qformer\.encoder\.layer\.1\.output_query\.dense"):
        init_qformer({"layers.1.output.weight": torch.zeros(32, 48)}, state, where="x")
    with pytest.raises(ValueError, match=r"has shape \(32, 24\), the connector needs \(32, 8\)"):
        init_qformer({"layers.0.crossattention.key.weight": torch.zeros(32, 8)}, state)


def test_token_count_is_the_query_count():
    cfg = get_preset("debug-tiny-qformer")
    assert image_token_count(cfg) == 8
    cfg.vision.image_size = 128  # 64 patches instead of 16: still 8 embeddings
    assert image_token_count(cfg) == 8
    assert image_token_count(get_preset("minigpt4")) == 32


def test_minigpt4_flops_hand_count():
    # Q=32 queries, h=768, f=3072, 12 layers (6 cross), h_v=1408, T=257 (class token kept), 4096
    per_query = 12 * (4 * 768**2 + 2 * 768 * 3072) + 6 * 2 * 768**2 + 768 * 4096  # 95_158_272
    kv = 6 * 2 * 257 * 2 * 1408 * 768  # image keys/values of the cross layers
    attn = 12 * 4 * 32 * 32 * 768 + 6 * 4 * 32 * 257 * 768
    assert (
        projector_forward_flops(get_preset("minigpt4"), 2)
        == 2 * (2 * 32 * per_query + kv + attn)
        == 2 * 12_949_192_704
    )


def test_flops_match_a_flop_counter(single_rank):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = get_preset("debug-tiny-qformer")
    cfg.projector.qformer.num_layers = 3  # layers 0 and 2 cross-attend
    v = cfg.vision
    config = projector_transformer_config(cfg, ParallelConfig())
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    proj = build_projector(config, cfg.projector, v.feature_width, pgs)
    tokens = v.num_output_tokens
    # the math backend runs attention as matmuls, which the counter sees (the CPU kernel not)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        proj(torch.randn(5, tokens, v.feature_width))
    stated = projector_class("qformer").forward_flops(
        cfg.projector, v.feature_width, cfg.lm.hidden_size, tokens
    )
    assert counter.get_total_flops() == 5 * stated


@pytest.fixture
def tiny(single_rank):
    cfg = get_preset("debug-tiny-qformer")
    torch.manual_seed(0)
    return cfg, build_llava_model(cfg)


def test_forward_backward(tiny):
    cfg, model = tiny
    b = batch(cfg)
    loss, mask = model(**b)
    n_img = int(b["num_images"].sum())
    assert loss.shape[1] == b["input_ids"].shape[1] + b["num_images"].max() * 7  # 8 per image
    assert n_img == 3
    ((loss * mask).sum() / mask.sum()).backward()
    proj = model.vision_projection
    for n, p in proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert model.vision_model.conv1.weight.grad.abs().sum() > 0


def test_two_stage_freezing(single_rank):
    cfg = get_preset("debug-tiny-qformer")
    for stage, (fv, fp, fl) in enumerate([(True, False, True), (True, False, False)]):
        cfg.freeze_vision, cfg.freeze_projector, cfg.freeze_lm = fv, fp, fl
        torch.manual_seed(0)
        model = build_llava_model(cfg)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        prefixes = ("vision_projection.",) if stage == 0 else ("vision_projection.", "language")
        assert trained and all(n.startswith(prefixes) for n in trained)
        assert any(n.startswith("language_model.") for n in trained) == (stage == 1)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        mean_loss(model, batch(cfg)).backward()
        opt.step()
        for n, p in model.named_parameters():
            assert (not torch.equal(before[n], p)) == (n in trained), n
        mults = (1, 3, 1) if stage == 0 else (1, 3, 3)
        flops = train_step_flops(cfg, [20], 2)
        assert flops.projector == mults[1] * projector_forward_flops(cfg, 2)


def test_tp_divisibility_is_one_line(single_rank):
    cfg = get_preset("debug-tiny-qformer")
    cfg.projector.qformer.num_attention_heads = 3
    cfg.projector.qformer.hidden_size = 33
    config = projector_transformer_config(cfg, ParallelConfig(tp=2))
    with pytest.raises(
        ValueError, match=r"qformer\.num_attention_heads=3 is not divisible by TP=2"
    ):
        build_projector(config, cfg.projector, 64, None)
    cfg.projector.qformer.num_attention_heads = 4
    with pytest.raises(ValueError, match=r"hidden_size=33 not divisible by .*heads=4"):
        cfg.validate()


def test_layout_validation_names_connector_heads_before_any_build():
    """Preflight (`layout_problems`, no torch module built) reports the connector's own heads
    and widths with the LM's, all at once."""
    from mm_megatron.parallel.layout import layout_problems

    cfg = get_preset("debug-tiny-qformer")
    cfg.projector.qformer.num_attention_heads = 3
    cfg.projector.qformer.intermediate_size = 65
    problems = layout_problems(cfg, ParallelConfig(tp=2))
    assert "projector.qformer.num_attention_heads=3 is not divisible by TP=2" in problems
    assert "projector.qformer.intermediate_size=65 is not divisible by TP=2" in problems
    cfg = get_preset("debug-tiny-resampler")
    cfg.projector.resampler.num_heads = 3
    assert layout_problems(cfg, ParallelConfig(tp=2)) == [
        "projector.resampler.num_heads=3 is not divisible by TP=2"
    ]
    assert layout_problems(get_preset("debug-tiny-resampler"), ParallelConfig(tp=2)) == []


def test_planner_activation_estimate_is_close_to_what_autograd_saves(single_rank):
    """The class's ``activation_elements`` against the tensors autograd keeps (TP1, fp32):
    within 35% (the estimate ignores per-row LayerNorm statistics and views it cannot see)."""
    cfg = get_preset("minigpt4")
    q = cfg.projector.qformer
    q.num_layers, q.hidden_size, q.intermediate_size, q.num_attention_heads = 4, 64, 256, 4
    hv, h_lm, tokens = 48, 96, 50
    cfg.lm.hidden_size = h_lm
    config = projector_transformer_config(cfg, ParallelConfig())
    from megatron.core.process_groups_config import ProcessGroupCollection

    proj = build_projector(
        config, cfg.projector, hv, ProcessGroupCollection.use_mpu_process_groups()
    )
    seen: dict[tuple, int] = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        seen[key] = t.numel()
        return t

    x = torch.randn(3, tokens, hv, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in proj.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        proj(x)
    saved = sum(n for (ptr, _, _), n in seen.items() if ptr not in params)
    stated = 3 * projector_class("qformer").activation_elements(cfg.projector, hv, h_lm, tokens, 1)
    print(f"saved {saved}, stated {stated:.0f}")
    assert 0.65 * saved <= stated <= 1.35 * saved


def test_minigpt4_projector_parameters_hand_count(single_rank):
    from mm_megatron.model.summary import collect_params

    h, f, hv, lm = 768, 3072, 1408, 4096
    attn = lambda kv: (h * h + h) + 2 * (kv * h + h) + (h * h + h) + 2 * h  # noqa: E731
    mlp = (h * f + f) + (f * h + h) + 2 * h
    hand = 12 * (attn(h) + mlp) + 6 * attn(hv) + 32 * h + 2 * h + (h * lm + lm)
    params = collect_params(get_preset("minigpt4"))
    proj = [p for p in params if p.name.startswith("vision_projection.")]
    assert sum(p.numel for p in proj) == hand == 108_312_064
    split = {p.name.split(".", 1)[1] for p in proj if p.tp_split}
    assert "layers.0.crossattention.key.weight" in split and "language_projection.weight" in split
    assert not any("layernorm" in n or n == "query_tokens" for n in split)
