"""tools/gpu_check.sh's CPU-side parts: the script parses, and its comparison helpers pass good
runs and fail bad ones. (The whole script's CPU path: ``bash tools/gpu_check.sh --dry-run``.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(Path(args[1]).read_text())


def _metrics(run: Path, losses: dict[int, float]) -> str:
    run.mkdir(parents=True)
    lines = [json.dumps({"kind": "train", "iteration": i, "loss": v}) for i, v in losses.items()]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return str(run)


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "tools" / "gpu_check.sh")]).returncode == 0


def test_curves(tmp_path):
    ref = _metrics(tmp_path / "cpu", {i: 6.0 - 0.05 * i for i in range(1, 101)})
    close = _metrics(tmp_path / "bf16", {i: 6.0 - 0.05 * i + 0.01 for i in range(1, 101)})
    off = _metrics(tmp_path / "bad", {i: 6.0 for i in range(1, 101)})
    out = _run("curves", str(tmp_path / "c.json"), ref, close)
    assert out["pass"] and out["runs"][close]["mean_abs_diff"] == pytest.approx(0.01)
    assert not _run("curves", str(tmp_path / "d.json"), ref, close, off)["pass"]


def test_resume(tmp_path):
    first = {1: 6.0, 2: 5.5, 3: 5.1, 4: 4.8}
    later = {5: 4.5, 6: 4.3}
    c4, g4 = _metrics(tmp_path / "c4", first), _metrics(tmp_path / "g4", first)
    c6, g6 = _metrics(tmp_path / "c6", later), _metrics(tmp_path / "g6", later)
    assert _run("resume", str(tmp_path / "r.json"), c4, g4, c6, g6)["pass"]
    # a resume that restarted from scratch (steps 1..6, loss back at 6.0) fails
    bad = _metrics(tmp_path / "bad", {**first, 5: 6.0, 6: 5.5})
    assert not _run("resume", str(tmp_path / "s.json"), c4, g4, c6, bad)["pass"]
