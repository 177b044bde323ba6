"""``convert assemble`` on tiny parts built with transformers' own classes (random weights).

Three pairs cover the inputs: CLIPVisionModel + Llama (sharded, no pad token: ``<image>`` and
``<pad>`` added, vocab 100 -> 102, rows mean-initialised), SiglipModel (text half dropped) +
Qwen2 (tied embeddings, qkv bias, added tokens land in spare rows: no resize) and CLIPModel +
Mistral in bf16. Each assembled checkpoint must export back to its parts bit-exactly (the LM's
added rows aside), export as a LLaVA that transformers loads and that gives our logits, and pass
``verify-parts`` at TP1 (TP2xPP2: ``tests/distributed/test_convert_parts.py``).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from mm_megatron.checkpoint import model_io
from mm_megatron.checkpoint.safetensors_io import index_files, read_tensor
from mm_megatron.cli import main
from mm_megatron.convert.tiny_models import hf_logits, make_inputs, save_tiny_lm, save_tiny_vision
from mm_megatron.model.image_tokens import image_token_count

PAIRS = {
    "clip+llama": ("clip", "llama", dict(max_shard_size="60KB")),
    "siglip+qwen2": ("siglip-model", "qwen2", {}),
    "clip+mistral": ("clip-model", "mistral", dict(dtype=torch.bfloat16)),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """{pair: (vision dir, lm dir, checkpoint, llava export, parts export)}."""
    from mm_megatron.convert.assemble import assemble
    from mm_megatron.convert.export_parts import mcore_to_hf_parts
    from mm_megatron.convert.mcore_to_hf import mcore_to_hf

    base = tmp_path_factory.mktemp("assemble")
    out = {}
    for name, (vision, lm, kw) in PAIRS.items():
        d = base / name
        dtype = kw.get("dtype", torch.float32)
        save_tiny_vision(d / "vision", vision, seed=1, dtype=dtype)
        save_tiny_lm(d / "lm", lm, seed=2, **kw)
        ckpt = assemble(
            d / "vision", d / "lm", d / "ckpt", progress=False, make_vocab_size_divisible_by=8
        )
        llava = mcore_to_hf(ckpt, d / "llava", progress=False)
        parts = mcore_to_hf_parts(ckpt, d / "parts", progress=False)
        out[name] = (d / "vision", d / "lm", ckpt, llava, parts)
    return out


def _tensors(d):
    return {k: read_tensor(v) for k, v in index_files(sorted(d.glob("*.safetensors"))).items()}


def test_llama_checkpoint_vocab_and_files(pairs):
    from transformers import AutoProcessor, AutoTokenizer

    _, lm, ckpt, _, _ = pairs["clip+llama"]
    run = model_io.read_run_config(ckpt)
    cfg, src = run.model, run.source
    assert (cfg.lm.vocab_size, cfg.image_token_id) == (102, 100)
    assert src["added_tokens"] == {"<image>": 100, "<pad>": 101}
    assert src["original_vocab_size"] == 100 and src["kind"] == "hf-parts"
    assert (cfg.freeze_vision, cfg.freeze_projector, cfg.freeze_lm) == (True, False, True)
    stored = model_io.stored_tensors(ckpt / "release")
    assert stored["model.language_model.embedding.word_embeddings.weight"][0] == (104, 64)
    assert cfg.vision.feature_layer == -2 and cfg.vision.drop_class_token
    # the unused last CLIP layer and post_layernorm ride along for the vision export
    assert any("layers.2." in k for k in src["passthrough"])
    tok = AutoTokenizer.from_pretrained(ckpt / "hf_files")
    assert len(tok) == 102 and tok.pad_token_id == 101
    assert tok("w7 <image> w9", add_special_tokens=False)["input_ids"].count(100) == 1
    proc = AutoProcessor.from_pretrained(ckpt / "hf_files")
    ids = proc(text=["w7 <image>"], images=[torch.zeros(3, 40, 40)], return_tensors="pt")
    assert (ids["input_ids"] == 100).sum() == image_token_count(cfg) == 16


@pytest.mark.parametrize("pair", list(PAIRS))
def test_parts_export_is_bit_exact(pairs, pair):
    """Vision tower and LM come back as their own HF classes, weights unchanged."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    vision, lm, ckpt, _, parts = pairs[pair]
    src = model_io.read_run_config(ckpt).source
    a, b = _tensors(vision), _tensors(parts / "vision")
    vision_keys = {k for k in a if not k.startswith(("text_", "logit_", "visual_projection"))}
    assert vision_keys == set(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    a, b = _tensors(lm), _tensors(parts / "lm")
    assert set(a) == set(b)
    old, new = src["original_vocab_size"], model_io.read_run_config(ckpt).model.lm.vocab_size
    for k in a:
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert b[k].shape[0] == new and torch.equal(a[k], b[k][:old]), k
            mean = a[k].float().mean(0).to(a[k].dtype)
            assert all(torch.equal(row, mean) for row in b[k][old:]), k  # mean-initialised
        else:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    model = AutoModelForCausalLM.from_pretrained(parts / "lm")
    tok = AutoTokenizer.from_pretrained(parts / "lm")
    assert model.config.vocab_size == len(tok) or model.config.vocab_size == 120
    assert (
        tok.convert_tokens_to_ids("<image>") == model_io.read_run_config(ckpt).model.image_token_id
    )
    assert type(AutoModel.from_pretrained(parts / "vision")).__name__ in (
        "CLIPVisionModel",
        "SiglipVisionModel",
    )


def test_qwen2_tokens_land_in_spare_rows(pairs):
    _, lm, ckpt, _, _ = pairs["siglip+qwen2"]
    run = model_io.read_run_config(ckpt)
    assert run.model.lm.vocab_size == 120 and run.model.lm.tie_embeddings
    assert run.model.lm.qkv_bias and run.source["added_tokens"] == {"<image>": 110}
    assert not run.model.vision.drop_class_token and run.model.vision.feature_layer == -1
    assert run.source["dropped"] > 0  # SiglipModel's text half


@pytest.mark.parametrize("pair", list(PAIRS))
def test_llava_export_matches_our_logits(pairs, pair):
    """The LLaVA export (fresh projector included) computes what our model computes."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mm_megatron.convert.common import single_rank
    from mm_megatron.convert.verify import forward_logits
    from mm_megatron.model.build import build_llava_model

    _, _, ckpt, llava, _ = pairs[pair]
    hf = LlavaForConditionalGeneration.from_pretrained(
        llava, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    AutoProcessor.from_pretrained(llava)
    batch = make_inputs(hf.config, text_len=12)
    ref = hf_logits(hf, batch["hf"])
    with single_rank():
        model = build_llava_model(model_io.read_run_config(ckpt).model)
        model_io.load_checkpoint(model, ckpt)
        model = model.float()
        ours = forward_logits(model, {**batch["ours"], "images": batch["ours"]["images"]})
    assert ours.shape == ref.shape
    tol = 1e-4 if pair != "clip+mistral" else 2e-2  # bf16 weights run in bf16 on our side
    assert (ours.float() - ref).abs().max().item() <= tol


def test_several_feature_layers_concatenate_as_transformers_does(pairs, tmp_path):
    """`--vision-feature-layer=-2,1`: the projector reads both layers' features concatenated,
    and the LLaVA export (`vision_feature_layer: [-2, 1]`) computes what our model computes."""
    from transformers import LlavaForConditionalGeneration

    from mm_megatron.convert.common import single_rank
    from mm_megatron.convert.verify import forward_logits
    from mm_megatron.model.build import build_llava_model

    vision, lm, _, _, _ = pairs["clip+llama"]
    ckpt, llava = tmp_path / "ckpt", tmp_path / "llava"
    assert main(_asm(vision, lm, ckpt, "--vision-feature-layer=-2,1")) == 0
    cfg = model_io.read_run_config(ckpt).model
    assert cfg.vision.feature_layer == [-2, 1]
    assert (
        main(["convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(llava), "--quiet"]) == 0
    )
    hf = LlavaForConditionalGeneration.from_pretrained(
        llava, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert hf.config.vision_feature_layer == [-2, 1]
    assert hf.model.multi_modal_projector.linear_1.in_features == 2 * cfg.vision.hidden_size
    batch = make_inputs(hf.config, text_len=12)
    with single_rank():
        model = build_llava_model(cfg)
        model_io.load_checkpoint(model, ckpt)
        ours = forward_logits(model.float(), batch["ours"])
    assert (ours.float() - hf_logits(hf, batch["hf"])).abs().max().item() <= 1e-4


@pytest.mark.parametrize("pair", list(PAIRS))
def test_verify_parts_tp1(pairs, pair, capsys):
    vision, lm, ckpt, _, _ = pairs[pair]
    args = ["convert", "verify-parts", "--vision", str(vision), "--lm", str(lm)]
    assert main([*args, "--ckpt", str(ckpt)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["vision features TP1xPP1"] == rows["LM logits TP1xPP1"] == "PASS", rows
    assert rows["overall:"] == "PASS"


def _rows(out: str) -> dict[str, str]:
    """``{check name: PASS|FAIL}`` of a printed verify table."""
    rows = {}
    for line in out.splitlines():
        for verdict in ("PASS", "FAIL"):
            if f" {verdict}" in line:
                rows[line.split(f" {verdict}")[0].strip()] = verdict
    return rows


def test_verify_parts_fails_on_other_weights(pairs, tmp_path, capsys):
    """A checkpoint assembled from another LM must fail against this one."""
    vision, lm, ckpt, _, _ = pairs["clip+llama"]
    save_tiny_lm(tmp_path / "lm", "llama", seed=5)
    other = ["convert", "assemble", "--vision", str(vision), "--lm", str(tmp_path / "lm")]
    assert main([*other, "--out", str(tmp_path / "ckpt"), "--quiet"]) == 0
    args = ["convert", "verify-parts", "--vision", str(vision), "--lm", str(lm)]
    assert main([*args, "--ckpt", str(tmp_path / "ckpt")]) == 1
    rows = _rows(capsys.readouterr().out)
    assert rows["LM logits TP1xPP1"] == "FAIL" and rows["vision features TP1xPP1"] == "PASS"


def _fails(args, capsys, *needles) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]
    assert line.startswith("mm-megatron convert: error: "), err
    assert not any("Traceback" in x for x in err)
    for n in needles:
        assert n in line, (n, line)
    return line


def _asm(vision, lm, out, *extra):
    args = ["convert", "assemble", "--vision", str(vision), "--lm", str(lm), "--out", str(out)]
    return [*args, "--quiet", *extra]


def test_bad_parts_give_one_line(pairs, tmp_path, capsys):
    vision, lm, _, llava, _ = pairs["clip+llama"]
    out = tmp_path / "out"
    _fails(_asm(lm, lm, out), capsys, "not a vision tower", "model_type 'llama'", "config.json")
    _fails(_asm(vision, vision, out), capsys, "not a supported causal LM", "CLIPVisionModel")
    _fails(_asm(vision, llava, out), capsys, "hf-to-mcore", "llava")
    _fails(_asm(vision, lm, out, "--projector", "nope"), capsys, "'nope'", "mlp2x_gelu")
    _fails(
        _asm(vision, lm, out, "--preset", "minimind-v"),
        capsys,
        f"{vision}/config.json image_size=32",
        "preset 'minimind-v' has vision.image_size=224",
    )
    _fails(_asm(vision, lm, out, "--vision-feature-layer", "7"), capsys, "num_hidden_layers=3")
    _fails(_asm(vision, lm, out, "--vision-feature-layer=-2,0"), capsys, "-2, 0", "-3..-1")
    bf16_lm = pairs["clip+mistral"][1]
    line = _fails(_asm(vision, bf16_lm, out), capsys, "dtype clash", "--dtype")
    assert str(vision) in line and str(bf16_lm) in line
    assert not out.exists() and os.listdir(tmp_path) == []
    assert main(_asm(vision, bf16_lm, out, "--dtype", "fp32")) == 0
    _fails(_asm(vision, bf16_lm, out, "--dtype", "fp32"), capsys, "exists", "--force")


def test_linear_projector(pairs, tmp_path, capsys):
    """Any registered projector: no HF LLaVA export for it, but the parts still export."""
    vision, lm, _, _, _ = pairs["clip+llama"]
    ckpt = tmp_path / "ckpt"
    assert main(_asm(vision, lm, ckpt, "--projector", "linear", "--seed", "3")) == 0
    cfg = model_io.read_run_config(ckpt).model
    assert cfg.projector.type == "linear"
    assert not (ckpt / "hf_files" / "config.json").exists()
    back = ["convert", "mcore-to-hf", "--ckpt", str(ckpt), "--quiet"]
    _fails([*back, "--out", str(tmp_path / "llava")], capsys, "projector.type='linear'")
    assert main([*back, "--out", str(tmp_path / "parts"), "--parts"]) == 0
    a, b = _tensors(vision), _tensors(tmp_path / "parts" / "vision")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    cfg_json = json.loads((tmp_path / "parts" / "vision" / "config.json").read_text())
    assert cfg_json["num_hidden_layers"] == 3 and cfg_json["architectures"] == ["CLIPVisionModel"]


def test_preset_fixes_the_model_a_job_builds():
    """With --preset the assembled config is the preset's (vocab padded up to its rows)."""
    from pathlib import Path

    from transformers import CLIPVisionConfig, LlamaConfig

    from mm_megatron.config import get_preset
    from mm_megatron.convert.assemble import parts_config
    from mm_megatron.convert.parts import Part

    base = get_preset("debug-tiny")
    v, lm = base.vision, base.lm
    vision = CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.ffn_hidden_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
    )
    text = LlamaConfig(
        vocab_size=500,
        hidden_size=lm.hidden_size,
        intermediate_size=lm.ffn_hidden_size,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_attention_heads,
        num_key_value_heads=lm.num_query_groups,
        max_position_embeddings=lm.max_position_embeddings,
        rms_norm_eps=lm.norm_eps,
    )
    parts = Part(Path("v"), {}, vision, "CLIPVisionModel"), Part(Path("l"), {}, text, "x")
    cfg, notes = parts_config(*parts, vocab_size=502, image_token_id=4, preset="debug-tiny")
    assert notes == [] and cfg.lm.vocab_size == 512 and cfg.projector == base.projector
    for part in ("vision", "lm"):
        for k, want in vars(getattr(base, part)).items():
            if k not in ("spec", "post_layernorm", "num_query_groups", "flavor"):
                assert getattr(getattr(cfg, part), k) == want, (part, k)
    text.rms_norm_eps = 1e-6
    with pytest.raises(ValueError, match=r"l/config.json rms_norm_eps=1e-06, but preset"):
        parts_config(*parts, vocab_size=502, image_token_id=4, preset="debug-tiny")


def test_converted_llava_exports_as_parts(tmp_path):
    """``--parts`` also splits a checkpoint converted from a whole HF LLaVA."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from mm_megatron.convert.export_parts import mcore_to_hf_parts
    from mm_megatron.convert.hf_to_mcore import hf_to_mcore
    from mm_megatron.convert.tiny_models import save_tiny_hf

    llava = save_tiny_hf(tmp_path / "hf", "llama")
    mc = hf_to_mcore(tmp_path / "hf", tmp_path / "mc", progress=False)
    parts = mcore_to_hf_parts(mc, tmp_path / "parts", progress=False)
    vision = CLIPVisionModel.from_pretrained(parts / "vision")
    lm = LlamaForCausalLM.from_pretrained(parts / "lm")
    ref = llava.model.vision_tower.state_dict()
    assert vision.state_dict().keys() == ref.keys()
    for name, t in vision.state_dict().items():
        assert torch.equal(t, ref[name]), name
    theirs = llava.model.language_model.state_dict()
    for name, t in lm.model.state_dict().items():
        assert torch.equal(t, theirs[name]), name
    assert torch.equal(lm.lm_head.weight, llava.lm_head.weight)
