"""`mm-megatron bench` end to end on CPU gloo: debug-tiny at TP1, TP2, PP2 and CP2 (+ one
impossible layout), each its own torchrun job; checks the CSV, JSON and PNG and that the numbers
are the shared throughput arithmetic over the FLOPs module (this proves the harness, not speed).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed

LAYOUTS = ["tp1pp1cp1", "tp2pp1cp1", "tp1pp2cp1", "tp1pp1cp2", "tp3pp1cp1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [
        sys.executable, "-m", "mm_megatron", "bench", "--preset", "debug-tiny",
        "--layouts", ",".join(LAYOUTS), "--steps", "2", "--warmup", "1", "--seq", "48",
        "--mbs", "2", "--timeout", "240", "--out", str(out),
    ]  # fmt: skip
    env = dict(os.environ, MM_MEGATRON_FORCE_CPU="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_progress_lines_and_table(sweep):
    _, stdout = sweep
    for i, name in enumerate(LAYOUTS, 1):
        assert f"[bench {i}/{len(LAYOUTS)}] {name}: " in stdout
    assert "INVALID: lm.num_attention_heads=4 is not divisible by TP=3" in stdout
    assert "tok/s/GPU" in stdout and "bench.png" in stdout


def test_outputs_and_numbers(sweep):
    out, _ = sweep
    assert (out / "bench.png").stat().st_size > 10_000
    with open(out / "bench.csv", newline="") as fh:
        rows = {r["layout"]: r for r in csv.DictReader(fh)}
    assert list(rows) == LAYOUTS
    data = json.loads((out / "bench.json").read_text())
    assert data["settings"]["preset"] == "debug-tiny"
    from mm_megatron.config import get_preset
    from mm_megatron.model.flops import train_step_flops

    flops = train_step_flops(get_preset("debug-tiny"), [48] * 2, 2).total
    for row in data["rows"]:
        if row["layout"] == "tp3pp1cp1":
            assert row["status"] == "invalid" and "TP=3" in row["reason"]
            assert rows["tp3pp1cp1"]["status"] == "invalid"
            continue
        assert row["status"] == "ok", row
        world = {"tp1pp1cp1": 1}.get(row["layout"], 2)
        assert row["world_size"] == world and len(row["peak_memory_mib"]) == world
        assert row["model_flops_per_step"] == flops
        med = row["step_time_median_s"]
        assert 0 < med < 60 and row["step_time_spread_s"] >= 0
        assert row["tflops_per_gpu"] == pytest.approx(flops / med / world / 1e12)
        assert row["tokens_per_sec_per_gpu"] == pytest.approx(2 * 48 / med / world)
        assert row["samples_per_sec"] == pytest.approx(2 / med)
        assert 0 <= row["data_wait_share"] < 1
        assert all(100 < m < 20_000 for m in row["peak_memory_mib"])
        assert float(rows[row["layout"]]["peak_memory_mib"]) == max(row["peak_memory_mib"])
