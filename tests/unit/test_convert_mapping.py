"""Converter building blocks, no model: QKV/SwiGLU layouts, key spellings, config mapping, I/O."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from mm_megatron.checkpoint.errors import CorruptFileError, MissingFileError, UnsupportedModelError
from mm_megatron.checkpoint.safetensors_io import SafetensorsWriter, read_header, read_tensor
from mm_megatron.convert.hf_config import llava_config_from_hf
from mm_megatron.convert.keys import KeySpelling, detect_spelling
from mm_megatron.convert.mapping import build_rules, interleave_qkv, split_qkv
from mm_megatron.convert.tiny_models import tiny_hf_config
from mm_megatron.model.image_tokens import image_token_count

# --- QKV ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("nh,ng", [(4, 4), (4, 2), (8, 1)])
def test_qkv_interleave_matches_megatron_grouping(nh, ng):
    """Row blocks of the fused weight, group by group: p query heads, then k, then v."""
    d, h = 3, 5
    q = torch.randn(nh * d, h)
    k = torch.randn(ng * d, h)
    v = torch.randn(ng * d, h)
    fused = interleave_qkv(q, k, v, ng)
    p = nh // ng
    assert fused.shape == ((nh + 2 * ng) * d, h)
    # megatron SelfAttention: view [ng, (p + 2) * d, h], split [p*d, d, d] within a group
    groups = fused.view(ng, (p + 2) * d, h)
    for g in range(ng):
        torch.testing.assert_close(groups[g, : p * d], q[g * p * d : (g + 1) * p * d])
        torch.testing.assert_close(groups[g, p * d : (p + 1) * d], k[g * d : (g + 1) * d])
        torch.testing.assert_close(groups[g, (p + 1) * d :], v[g * d : (g + 1) * d])
    back = split_qkv(fused, nh, ng)
    for a, b in zip(back, (q, k, v)):
        assert torch.equal(a, b)
    # biases: same layout with h = 1
    qb, kb, vb = torch.randn(nh * d), torch.randn(ng * d), torch.randn(ng * d)
    assert all(
        torch.equal(a, b)
        for a, b in zip(split_qkv(interleave_qkv(qb, kb, vb, ng), nh, ng), (qb, kb, vb))
    )


def test_qkv_tp_chunks_hold_whole_groups():
    """TP takes contiguous dim-0 chunks; with the grouped layout each holds ng/TP whole groups."""
    nh, ng, d, h, tp = 4, 2, 2, 3, 2
    q, k, v = torch.randn(nh * d, h), torch.randn(ng * d, h), torch.randn(ng * d, h)
    shards = torch.chunk(interleave_qkv(q, k, v, ng), tp, dim=0)
    for r, shard in enumerate(shards):
        heads = slice(r * (nh // tp) * d, (r + 1) * (nh // tp) * d)
        kv = slice(r * (ng // tp) * d, (r + 1) * (ng // tp) * d)
        qr, kr, vr = split_qkv(shard, nh // tp, ng // tp)
        assert torch.equal(qr, q[heads]) and torch.equal(kr, k[kv]) and torch.equal(vr, v[kv])


def test_rules_cover_every_hf_tensor_once():
    cfg, _ = llava_config_from_hf(tiny_hf_config("llama"))
    rules = build_rules(cfg)
    keys = [k for r in rules for k in r.hf]
    assert len(keys) == len(set(keys))
    fc1 = next(r for r in rules if r.param.endswith("layers.0.mlp.linear_fc1.weight"))
    gate, up = torch.randn(96, 64), torch.randn(96, 64)
    fused = fc1.to_mcore([gate, up])
    assert torch.equal(fused[:96], gate) and torch.equal(fused[96:], up)  # cat(gate, up)
    emb = next(r for r in rules if r.param.endswith("word_embeddings.weight"))
    padded = emb.to_mcore([torch.randn(100, 64)])
    assert padded.shape == (cfg.lm.padded_vocab_size(1), 64) and not padded[100:].any()
    assert emb.to_hf(padded)[0].shape == (100, 64)


# --- key spellings -----------------------------------------------------------------------------

CANONICAL = [
    "model.language_model.layers.0.self_attn.q_proj.weight",
    "lm_head.weight",
    "model.vision_tower.embeddings.class_embedding",
    "model.multi_modal_projector.linear_1.weight",
]


@pytest.mark.parametrize("prefix", ["legacy", "model"])
@pytest.mark.parametrize("level", [False, True])
def test_key_spellings_round_trip_and_detect(prefix, level):
    sp = KeySpelling(prefix=prefix, vision_model_level=level)
    stored = [sp.to_file(k) for k in CANONICAL]
    assert [sp.to_canonical(k) for k in stored] == CANONICAL
    assert detect_spelling(stored) == sp
    if prefix == "legacy":
        assert stored[0] == "language_model.model.layers.0.self_attn.q_proj.weight"
        assert stored[1] == "language_model.lm_head.weight"
    if level:
        assert ".vision_tower.vision_model.embeddings." in "." + stored[2]


def test_mixed_spellings_rejected():
    with pytest.raises(ValueError, match="mixes key spellings"):
        detect_spelling(["lm_head.weight", "language_model.model.norm.weight"])
    with pytest.raises(ValueError, match="does not look like"):
        detect_spelling(["transformer.h.0.attn.weight"])


# --- HF config mapping -------------------------------------------------------------------------


def test_config_mapping_llama_and_qwen2():
    cfg, notes = llava_config_from_hf(tiny_hf_config("llama"))
    assert notes == []
    assert (cfg.lm.num_query_groups, cfg.lm.qkv_bias, cfg.lm.tie_embeddings) == (2, False, False)
    assert cfg.vision.num_layers_built == 2 and cfg.vision.drop_class_token
    assert cfg.vision.apply_post_layernorm is False and image_token_count(cfg) == 16
    q, _ = llava_config_from_hf(tiny_hf_config("qwen2"))
    assert q.lm.qkv_bias and q.lm.tie_embeddings and q.lm.rope_theta == 1e6
    s, _ = llava_config_from_hf(tiny_hf_config("siglip"))
    assert s.vision.style == "siglip" and s.vision.num_layers_built == 3
    r, _ = llava_config_from_hf(tiny_hf_config("llama3rope"))
    assert r.lm.rope_scaling["rope_type"] == "llama3" and r.lm.rope_theta == 5e5


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: setattr(c, "vision_feature_layer", []), "non-empty list of integers"),
        (lambda c: setattr(c, "vision_feature_layer", [-2, -9]), r"\[-2, -9\] selects no"),
        (lambda c: setattr(c, "projector_hidden_act", "hardswish"), "projector_hidden_act"),
        (lambda c: setattr(c.text_config, "attention_bias", True), "attention_bias"),
        (lambda c: setattr(c.text_config, "hidden_act", "gelu"), "hidden_act"),
        (
            lambda c: setattr(
                c.text_config, "rope_parameters", {"rope_type": "yarn", "factor": 4.0}
            ),
            "rope_type='yarn'",
        ),
        (
            lambda c: setattr(
                c.text_config,
                "rope_parameters",
                {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 2.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
            ),
            "low_freq_factor",
        ),
        (lambda c: setattr(c, "vision_feature_layer", -9), "selects no encoder layer"),
    ],
)
def test_config_mapping_rejects_unsupported(edit, match):
    hf = tiny_hf_config("llama")
    edit(hf)
    with pytest.raises(UnsupportedModelError, match=match):
        llava_config_from_hf(hf)


def test_siglip_default_strategy_rejected():
    hf = tiny_hf_config("siglip")
    hf.vision_feature_select_strategy = "default"
    with pytest.raises(UnsupportedModelError, match="SigLIP"):
        llava_config_from_hf(hf)


def test_unsupported_architecture_in_config_json(tmp_path):
    from mm_megatron.convert.hf_config import read_config_json

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llava_next_video",
                "architectures": ["LlavaNextVideoForConditionalGeneration"],
            }
        )
    )
    with pytest.raises(UnsupportedModelError, match="LlavaNextVideoForConditionalGeneration"):
        read_config_json(tmp_path)
    with pytest.raises(MissingFileError, match="config.json"):
        read_config_json(tmp_path / "nope")


# --- safetensors I/O ---------------------------------------------------------------------------


def test_writer_output_reads_with_safetensors_library(tmp_path):
    from safetensors.torch import load_file

    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(4, dtype=torch.int64),
        "empty": torch.zeros(0, 2),
    }
    path = tmp_path / "x.safetensors"
    decl = [(k, v.dtype, v.shape) for k, v in tensors.items()]
    with SafetensorsWriter({path: decl}) as w:
        for k in reversed(list(tensors)):  # any order
            w.write(k, tensors[k])
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    infos, meta = read_header(path)
    assert meta == {"format": "pt"}
    assert torch.equal(read_tensor(infos["b"]), tensors["b"])


def test_writer_refuses_undeclared_and_unwritten(tmp_path):
    path = tmp_path / "x.safetensors"
    decl = {path: [("a", torch.float32, (2,))]}
    with pytest.raises(RuntimeError, match="never written"), SafetensorsWriter(decl):
        pass
    with pytest.raises(KeyError), SafetensorsWriter(decl) as w:
        w.write("b", torch.zeros(2))


def test_reader_names_truncated_file_and_tensor(tmp_path):
    path = tmp_path / "m.safetensors"
    with SafetensorsWriter(
        {path: [("w1", torch.float32, (4, 4)), ("w2", torch.float32, (8,))]}
    ) as w:
        w.write("w1", torch.ones(4, 4))
        w.write("w2", torch.ones(8))
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(
        CorruptFileError, match=r"truncated safetensors file .*m\.safetensors.*'w2'"
    ):
        read_header(path)
    path.write_bytes(data[:5])
    with pytest.raises(CorruptFileError, match="truncated"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(CorruptFileError, match="corrupt safetensors header"):
        read_header(path)
