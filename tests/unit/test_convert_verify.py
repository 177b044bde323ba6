"""`convert verify` checks what it claims (issue 19, item 8).

Before: verify expanded each image to config.json's `image_seq_length`; a checkpoint whose
`image_seq_length` disagrees with its vision tower converted correctly but verify crashed inside
transformers ("Image features and image tokens do not match"). Its logits check used one image at
a fixed position in a 2-sample batch of 10 text tokens, with an absolute tolerance.

Now placeholders expand by the tower's real token count, and the batch has a two-image sample, a
text-only sample, right padding and samples of at least 300 tokens; the tolerance is relative to
the logits' scale.
"""

from __future__ import annotations

import json

import pytest
import torch

from mm_megatron.cli import main
from mm_megatron.convert.tiny_models import save_tiny_hf, tiny_hf_model
from mm_megatron.convert.verify import verify
from mm_megatron.convert.verify_inputs import (
    MIN_TOKENS,
    compare_logits,
    make_verify_inputs,
    tower_tokens_per_image,
)


@pytest.fixture(scope="module")
def wrong_seq_length(tmp_path_factory):
    """A tiny HF LLaVA whose config.json says image_seq_length=7 (its tower gives 16)."""
    base = tmp_path_factory.mktemp("verify")
    hf = base / "hf"
    save_tiny_hf(hf, "llama")
    config = json.loads((hf / "config.json").read_text())
    assert config["image_seq_length"] != 7
    config["image_seq_length"] = 7
    (hf / "config.json").write_text(json.dumps(config, indent=2))
    argv = ["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(base / "mc"), "--quiet"]
    assert main(argv) == 0
    return hf, base / "mc"


def test_verify_uses_the_towers_token_count(wrong_seq_length, capsys):
    hf, mc = wrong_seq_length
    checks = verify(hf, mc)
    assert [c.ok for c in checks] == [True, True, True], [(c.name, c.detail) for c in checks]
    logits = checks[-1].detail
    assert "x max |logit|" in logits and "argmax agree 100.0%" in logits, logits
    assert main(["convert", "verify", "--hf", str(hf), "--ckpt", str(mc)]) == 0
    assert "overall: PASS" in capsys.readouterr().out


def test_batch_has_several_images_text_only_padding_and_length():
    model = tiny_hf_model("llama")
    cfg = model.config
    size = cfg.vision_config.image_size
    t = tower_tokens_per_image(model, torch.zeros(1, 3, size, size))
    assert t == (size // cfg.vision_config.patch_size) ** 2  # CLIP without its class token
    batch = make_verify_inputs(cfg, t, seed=3)
    ours, hf, lengths = batch["ours"], batch["hf"], batch["lengths"]
    assert ours["num_images"].tolist() == [2, 0, 1]
    assert ours["images"].shape[0] == 3
    image = cfg.image_token_index
    assert (ours["input_ids"] == image).sum(1).tolist() == [2, 0, 1]
    assert (hf["input_ids"] == image).sum(1).tolist() == [2 * t, 0, t]
    assert lengths[0] >= MIN_TOKENS and lengths[1] >= MIN_TOKENS and lengths[2] < lengths[0]
    assert hf["attention_mask"].sum(1).tolist() == lengths  # the short sample is padded
    first = (ours["input_ids"][0] == image).nonzero().flatten().tolist()
    assert first[0] == 3 and first[1] > first[0] + 1  # two images, apart
    with torch.no_grad():  # transformers accepts it: features and tokens match
        logits = model(**hf, use_cache=False).logits
    assert logits.shape[:2] == hf["input_ids"].shape


def test_tolerance_is_relative_to_the_logits_scale():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 5, 11, generator=gen) * 1000  # large logits
    lengths = [5, 3]
    ok, detail = compare_logits(ref + 1e-3, ref, lengths, rtol=1e-5)  # 1e-3 << 1e-5 x ~3000
    assert ok, detail
    ok, detail = compare_logits(ref * (1 + 1e-3), ref, lengths, rtol=1e-5)
    assert not ok and "> 1e-05 x max |logit|" in detail
    noisy = ref.clone()
    noisy[1, 4] += 1e6  # a padding position of sample 1: ignored
    assert compare_logits(noisy, ref, lengths, rtol=1e-5)[0]


def test_projector_activation_other_than_gelu_converts_exactly(tmp_path, capsys):
    """Before: "projector_hidden_act='silu': only 'gelu' (mlp2x_gelu) projectors are supported"."""
    hf = tmp_path / "hf"
    save_tiny_hf(hf, "llama")
    config = json.loads((hf / "config.json").read_text())
    config["projector_hidden_act"] = "silu"
    (hf / "config.json").write_text(json.dumps(config, indent=2))
    mc, back = tmp_path / "mc", tmp_path / "back"
    assert main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(mc), "--quiet"]) == 0
    checks = verify(hf, mc)  # the logits only agree when our projector applies silu too
    assert all(c.ok for c in checks), [(c.name, c.detail) for c in checks]
    assert main(["convert", "mcore-to-hf", "--ckpt", str(mc), "--out", str(back), "--quiet"]) == 0
    assert json.loads((back / "config.json").read_text())["projector_hidden_act"] == "silu"
