"""``vision.style="blip2"``: BLIP-2's own vision tower (EVA ViT-g as transformers ships it).

Tiny random BLIP-2 / InstructBLIP models built with transformers' own classes and saved with
``save_pretrained``; ``convert assemble --vision BLIP2 --qformer-from BLIP2 --lm LM`` (the
MiniGPT-4 init) must give, at TP1 and fp32, transformers' ``last_hidden_state`` as our image
features and transformers' Q-Former (+ ``language_projection``) output on them (1e-5), pass
``verify-parts``, export back to a ``Blip2VisionModel`` bit-exactly, and refuse bad input in one
line. The style table drives the encoder and the activation; the key bias is held at zero.
TP2 and the layout parity: ``tests/distributed/test_blip2_vision_layouts.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mm_megatron.checkpoint import model_io
from mm_megatron.checkpoint.safetensors_io import index_files, read_tensor
from mm_megatron.cli import main
from mm_megatron.config import get_preset
from mm_megatron.convert.tiny_models import TINY_VISION, save_tiny_lm

VISION = TINY_VISION
QFORMER = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    encoder_hidden_size=32,
    cross_attention_frequency=2,
    vocab_size=100,
)
TEXT = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=1,
    num_attention_heads=4,
    vocab_size=100,
)


def blip2_model(kind: str = "blip-2", seed: int = 0):
    """A tiny random BLIP-2 / InstructBLIP (non-trivial norms and biases), fp32, eval mode.

    The stored key third of every ``qkv.bias`` stays zero, as in BLIP-2's checkpoints.
    """
    import transformers as tf

    cfg_cls, model_cls = {
        "blip-2": (tf.Blip2Config, tf.Blip2ForConditionalGeneration),
        "instructblip": (tf.InstructBlipConfig, tf.InstructBlipForConditionalGeneration),
    }[kind]
    config = cfg_cls(
        vision_config=VISION, qformer_config=QFORMER, text_config=TEXT, num_query_tokens=6
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n.lower() and n.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
                if n.endswith("self_attn.qkv.bias"):
                    p.view(3, -1)[1] = 0
            elif n in ("query_tokens",) or n.endswith(("class_embedding", "position_embedding")):
                p.copy_(torch.randn_like(p))
            else:  # BLIP-2's vision init is std 1e-10: attention would be uniform
                p.copy_(0.2 * torch.randn_like(p))
    return model


def hf_qformer(hf, feats: torch.Tensor) -> torch.Tensor:
    """language_projection(Q-Former(queries, feats)) [N, Q, h_lm], as BLIP-2's forward."""
    with torch.no_grad():
        q = hf.query_tokens.expand(len(feats), -1, -1)
        text = {"input_ids": None} if hf.config.model_type == "instructblip" else {}
        out = hf.qformer(query_embeds=q, encoder_hidden_states=feats, **text).last_hidden_state
        return hf.language_projection(out[:, : q.shape[1]])


def hf_outputs(hf, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``last_hidden_state`` [N, 1+P, h], language_projection(Q-Former) [N, Q, h_lm])."""
    with torch.no_grad():
        feats = hf.vision_model(pixel_values=images).last_hidden_state
    return feats, hf_qformer(hf, feats)


def our_outputs(ckpt, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(our vision features, our projector output) at TP1 from the dist checkpoint."""
    from mm_megatron.convert.common import single_rank
    from mm_megatron.model.build import build_llava_model

    with single_rank():
        model = build_llava_model(model_io.read_run_config(ckpt).model).eval()
        model_io.load_checkpoint(model, ckpt)
        with torch.no_grad():
            feats = model.vision_model(images)
            return feats, model.vision_projection(feats)


def _asm(vision, lm, out, *extra) -> list[str]:
    args = ["convert", "assemble", "--vision", str(vision), "--lm", str(lm), "--out", str(out)]
    return [*args, "--quiet", "--make-vocab-size-divisible-by", "8", *extra]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """{name: dir}: a BLIP-2, an InstructBLIP, a stand-alone Blip2VisionModel, a Llama (w64)
    and the checkpoint assembled from the BLIP-2 (vision and Q-Former) and the Llama."""
    d = tmp_path_factory.mktemp("blip2")
    blip2, instruct = blip2_model("blip-2"), blip2_model("instructblip", seed=1)
    blip2.save_pretrained(d / "blip2")
    instruct.save_pretrained(d / "instruct")
    blip2.vision_model.save_pretrained(d / "vision")
    save_tiny_lm(d / "lm", "llama", seed=2)
    ckpt = d / "ckpt"
    assert main(_asm(d / "blip2", d / "lm", ckpt, "--qformer-from", str(d / "blip2"))) == 0
    return dict(blip2=d / "blip2", instruct=d / "instruct", vision=d / "vision", lm=d / "lm"), {
        "blip-2": blip2,
        "instructblip": instruct,
        "ckpt": ckpt,
    }


def test_assembled_minigpt4_init_matches_transformers(parts):
    dirs, built = parts
    ckpt, hf = built["ckpt"], built["blip-2"]
    cfg = model_io.read_run_config(ckpt).model
    v = cfg.vision
    assert (v.style, v.feature_layer, v.num_layers, v.drop_class_token) == ("blip2", -1, 3, False)
    assert v.apply_post_layernorm and cfg.projector.type == "qformer"
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref_feats, ref_out = hf_outputs(hf, images)
    feats, out = our_outputs(ckpt, images)
    assert feats.shape == ref_feats.shape == (3, 17, 32) and out.shape == (3, 6, 64)
    err_f = (feats - ref_feats).abs().max().item()
    err_q = (out - ref_out).abs().max().item()
    print(f"TP1 vision features max |diff| {err_f:.2e}, Q-Former output {err_q:.2e}")
    assert err_f <= 1e-5 and err_q <= 1e-5


@pytest.mark.parametrize("source", ["instruct", "vision"])
def test_instructblip_and_standalone_vision_models_load(parts, source, tmp_path):
    """The vision half of an InstructBLIP, and a stand-alone ``Blip2VisionModel``."""
    dirs, built = parts
    ckpt = tmp_path / "ckpt"
    assert main(_asm(dirs[source], dirs["lm"], ckpt, "--qformer-from", str(dirs["instruct"]))) == 0
    hf = built["instructblip"]
    tower = hf.vision_model if source == "instruct" else built["blip-2"].vision_model
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = tower(pixel_values=images).last_hidden_state
    feats, out = our_outputs(ckpt, images)
    assert (feats - ref).abs().max().item() <= 1e-5
    assert (out - hf_qformer(hf, ref)).abs().max().item() <= 1e-5
    src = model_io.read_run_config(ckpt).source
    cls = {"instruct": "InstructBlipForConditionalGeneration", "vision": "Blip2VisionModel"}
    assert src["vision_class"] == cls[source]


def test_verify_parts_and_parts_export_round_trip(parts, tmp_path, capsys):
    """verify-parts passes; ``--parts`` writes a Blip2VisionModel whose tensors are the
    BLIP-2's ``vision_model.`` half, bit-exact, and that transformers loads and runs."""
    from transformers import Blip2VisionModel

    dirs, built = parts
    ckpt = built["ckpt"]
    args = ["convert", "verify-parts", "--vision", str(dirs["blip2"]), "--lm", str(dirs["lm"])]
    assert main([*args, "--ckpt", str(ckpt), "--atol", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert "vision features TP1xPP1" in out and "FAIL" not in out, out
    back = tmp_path / "parts"
    cmd = ["convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back), "--parts"]
    assert main([*cmd, "--quiet"]) == 0
    files = sorted(dirs["blip2"].glob("*.safetensors"))
    orig = {k: read_tensor(i) for k, i in index_files(files).items()}
    orig = {k.removeprefix("vision_model."): t for k, t in orig.items() if "vision_model." in k}
    got = index_files(sorted((back / "vision").glob("*.safetensors")))
    got = {k: read_tensor(i) for k, i in got.items()}
    assert set(got) == set(orig)
    for k, t in orig.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    model = Blip2VisionModel.from_pretrained(back / "vision", attn_implementation="eager").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model(pixel_values=images).last_hidden_state
        b = built["blip-2"].vision_model(pixel_values=images).last_hidden_state
    assert torch.equal(a, b)


def _fails(args, capsys, *needles) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]
    assert line.startswith("mm-megatron convert: error: ") and "Traceback" not in "".join(err)
    for n in needles:
        assert n in line, (n, line)
    return line


def test_bad_blip2_input_is_one_line(parts, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    dirs, _ = parts
    out = tmp_path / "out"
    # widths that are not the preset's: names the file and the HF field
    _fails(
        _asm(dirs["blip2"], dirs["lm"], out, "--preset", "minigpt4"),
        capsys,
        f"{dirs['blip2']}/config.json vision_config.image_size=32",
        "preset 'minigpt4' has vision.image_size=224",
    )
    # a tensor missing from the checkpoint: names the key and the directory
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in dirs["vision"].iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(dirs["vision"] / "model.safetensors")
    del state["encoder.layers.1.self_attn.qkv.bias"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    _fails(
        _asm(broken, dirs["lm"], out),
        capsys,
        "'encoder.layers.1.self_attn.qkv.bias' not found",
        str(broken),
    )
    assert not out.exists()
    # an mlp2x_gelu model on a BLIP-2 tower read before its last layer (no post-LN): HF LLaVA
    # has no such tower, so the LLaVA export refuses in one line (the parts export works)
    assert main(_asm(dirs["vision"], dirs["lm"], out, "--vision-feature-layer", "-2")) == 0
    back = ["convert", "mcore-to-hf", "--ckpt", str(out), "--quiet", "--out"]
    _fails([*back, str(tmp_path / "llava")], capsys, "vision.style='blip2' has no HF LLaVA")
    assert main([*back, str(tmp_path / "parts"), "--parts"]) == 0


def test_style_table_drives_encoder_and_activation(single_rank):
    from megatron.core.activations import quick_gelu

    from mm_megatron.config.parallel_config import ParallelConfig
    from mm_megatron.model.build import build_llava_model
    from mm_megatron.model.transformer_configs import gelu_tanh, vision_transformer_config

    cfg = get_preset("debug-tiny-qformer")
    want = {"clip": quick_gelu, "siglip": gelu_tanh, "internvit": F.gelu, "blip2": F.gelu}
    for style, act in want.items():
        cfg.vision.style, cfg.vision.activation = style, None
        assert vision_transformer_config(cfg, ParallelConfig()).activation_func is act, style
    cfg = get_preset("debug-tiny-qformer")
    vm = build_llava_model(cfg).vision_model
    assert vm.conv1.bias is not None and vm.pre_layernorm is None
    assert vm.post_layernorm is not None and vm.class_token.shape == (1, 1, 64)
    clip = build_llava_model(get_preset("debug-tiny")).vision_model
    assert clip.conv1.bias is None and clip.pre_layernorm is not None


def test_key_bias_has_no_effect_and_stays_zero_in_training(single_rank):
    """Softmax ignores a key bias (it adds ``q . b_k`` to a whole row of logits), so its true
    gradient is zero; what backward computes is rounding noise, which Adam would turn into a
    full step, so the encoder masks it: after an Adam step the key third is exactly unchanged
    while the query and value thirds move."""
    from mm_megatron.model.build import build_llava_model
    from tests.unit.test_model import batch, mean_loss

    cfg = get_preset("debug-tiny-qformer")
    torch.manual_seed(0)
    model = build_llava_model(cfg)
    vm = model.vision_model
    heads = cfg.vision.num_attention_heads
    biases = [layer.self_attention.linear_qkv.bias for layer in vm.decoder.layers]
    with torch.no_grad():
        for b in biases:
            b.copy_(0.1 * torch.randn_like(b))
            b.view(heads, 3, -1)[:, 1] = 0
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = vm(images)
        saved = [b.detach().clone() for b in biases]
        for b in biases:
            b.view(heads, 3, -1)[:, 1] = torch.randn(heads, b.shape[0] // (3 * heads))
        shifted = vm(images)
        for b, s in zip(biases, saved):
            b.copy_(s)
    assert (shifted - before).abs().max().item() <= 1e-5 * before.abs().max().item()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.zero_grad()
    mean_loss(model, batch(cfg)).backward()
    for b in biases:
        g = b.grad.view(heads, 3, -1)
        assert torch.count_nonzero(g[:, 1]) == 0 and g[:, 0].abs().sum() > 0
    opt.step()
    for b, s in zip(biases, saved):
        moved = (b.detach() - s).view(heads, 3, -1)
        assert torch.equal(moved[:, 1], torch.zeros_like(moved[:, 1]))
        assert moved[:, 0].abs().min() > 0 and moved[:, 2].abs().min() > 0


def test_minigpt4_preset_is_blip2s_vision_side():
    """The preset's tower is transformers' ``Blip2VisionConfig`` (what BLIP-2 checkpoints
    carry), so ``--preset minigpt4`` accepts a real BLIP-2's vision side."""
    from pathlib import Path

    from transformers import Blip2VisionConfig, LlamaConfig

    from mm_megatron.convert.assemble import parts_config
    from mm_megatron.convert.parts import Part

    base = get_preset("minigpt4")
    lm = base.lm
    text = LlamaConfig(
        vocab_size=32000,
        hidden_size=lm.hidden_size,
        intermediate_size=lm.ffn_hidden_size,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_attention_heads,
        max_position_embeddings=lm.max_position_embeddings,
        rms_norm_eps=lm.norm_eps,
    )
    vision = Part(Path("b"), {"model_type": "blip-2"}, Blip2VisionConfig(), "x", True)
    cfg, _ = parts_config(
        vision,
        Part(Path("l"), {}, text, "y"),
        vocab_size=32002,
        image_token_id=32000,
        preset="minigpt4",
    )
    assert cfg.vision == base.vision and cfg.vision.num_output_tokens == 257
    assert cfg.vision.num_layers_built == 39
