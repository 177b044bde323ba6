"""The reference benchmark's CPU dry run: every CPU-capable row runs, TE/CUDA rows are skipped
with the reason, and every row's TFLOP/s is the same FLOPs count over its own step time."""

from __future__ import annotations

import pytest

from mm_megatron.bench.reference import ROWS, format_reference, run_reference
from mm_megatron.config import get_preset
from mm_megatron.model.flops import train_step_flops


@pytest.fixture(scope="module")
def result():
    return run_reference(
        dry_run=True, seq=None, mbs=None, steps=2, warmup=1, profile="mm_megatron local"
    )


def test_rows_and_reasons(result):
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == list(ROWS)
    for name in ("mm_megatron te", "megatron LLaVAModel (te)"):
        assert rows[name]["status"] == "skipped" and "Transformer Engine" in rows[name]["reason"]
    assert rows["hf sdpa + compile"]["status"] == "skipped"
    for name in ("mm_megatron local", "hf sdpa"):
        assert rows[name]["status"] == "ok", rows[name]
    assert rows["hf sdpa"]["ratio_to_hf"] == 1.0
    assert rows["mm_megatron local"]["profile"]["top"]


def test_same_flops_for_every_row(result):
    s = result["settings"]
    cfg = get_preset("debug-tiny")
    cfg.freeze_vision = True
    flops = train_step_flops(cfg, [s["seq"]] * s["mbs"], s["mbs"]).total
    assert s["model_flops_per_step"] == flops and s["dry_run"]
    for r in result["rows"]:
        if r["status"] == "ok":
            med = r["step_time_median_s"]
            assert r["tflops"] == pytest.approx(flops / med / 1e12)
            assert r["tokens_per_sec"] == pytest.approx(s["seq"] * s["mbs"] / med)
    text = format_reference(result)
    assert "DRY RUN" in text and "vs HF" in text
