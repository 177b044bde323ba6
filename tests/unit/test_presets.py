"""The preset registry, model summary counts and the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mm_megatron.config import LlavaConfig, get_preset, list_presets
from mm_megatron.config.presets import register_preset


def test_expected_presets_registered():
    names = set(list_presets())
    assert {"debug-tiny", "minimind-v", "llava-1.5-7b", "llava-1.5-13b", "ref-1.4b"} <= names


@pytest.mark.parametrize("name", sorted(list_presets()))
def test_every_preset_builds_and_round_trips(name):
    cfg = get_preset(name)
    assert LlavaConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_preset_and_keys():
    with pytest.raises(KeyError, match="known presets: debug-tiny"):
        get_preset("llava-99b")
    with pytest.raises(ValueError, match=r"unknown key model\.lm\.hiden_size; valid: \["):
        LlavaConfig.from_dict({"lm": {"hiden_size": 3}})
    with pytest.raises(ValueError, match="registered twice"):
        register_preset("debug-tiny")(lambda: None)


def test_debug_tiny_is_tiny(single_rank):
    from mm_megatron.model.build import build_llava_model

    n = sum(p.numel() for p in build_llava_model(get_preset("debug-tiny")).parameters())
    assert 100_000 < n < 1_000_000


def hand_count_ref_1_4b():
    """Independent arithmetic for ref-1.4b (CLIP-L/336 x23, MLP2x, Llama L16 h2048 GQA 32/8)."""
    h, f, p, pos = 1024, 4096, 14, 577
    vit_layer = 2 * (2 * h) + (h * 3 * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
    vit = 3 * p * p * h + h + pos * h + 2 * h + 23 * vit_layer
    lh, lf, v = 2048, 8192, 32064
    proj = (h * lh + lh) + (lh * lh + lh)
    qkv = (32 + 2 * 8) * 64 * lh
    lm_layer = 2 * lh + qkv + lh * lh + 2 * lf * lh + lf * lh
    lm = 2 * v * lh + 16 * lm_layer + lh
    return vit, proj, lm


def test_summary_ref_1_4b_matches_hand_count():
    from mm_megatron.config import ParallelConfig
    from mm_megatron.model.summary import collect_params, per_stage
    from mm_megatron.runtime import distributed

    cfg = get_preset("ref-1.4b")
    with distributed.process_groups():  # model code starts no process groups itself
        params = collect_params(cfg)
    vit, proj, lm = hand_count_ref_1_4b()
    got = {"vision_model.": 0, "vision_projection.": 0, "language_model.": 0}
    for prm in params:
        got[next(k for k in got if prm.name.startswith(k))] += prm.numel
    assert (got["vision_model."], got["vision_projection."], got["language_model."]) == (
        vit,
        proj,
        lm,
    )
    assert vit + proj + lm == 1_401_684_992
    # TP=1: one stage holds everything
    assert per_stage(cfg, params, ParallelConfig()) == [vit + proj + lm]
    # TP=2 PP=2: totals over TP ranks/stages account for the re-padded vocab (32128)
    stages = per_stage(cfg, params, ParallelConfig(tp=2, pp=2))
    assert len(stages) == 2 and stages[0] > stages[1]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mm_megatron", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_summary_and_bad_preset():
    r = run_cli("model", "summary", "--preset", "ref-1.4b", "--tp", "2", "--pp", "2")
    assert r.returncode == 0, r.stderr
    assert "1,401,684,992" in r.stdout and "stage 1:" in r.stdout
    bad = run_cli("model", "summary", "--preset", "nope")
    assert bad.returncode == 2
    assert "unknown preset 'nope'" in bad.stderr and "Traceback" not in bad.stderr
    tp = run_cli("model", "summary", "--preset", "ref-1.4b", "--tp", "3")
    assert tp.returncode == 2 and "lm.num_attention_heads=32 is not divisible by TP=3" in tp.stderr
