"""``mm-megatron convert``: bad input -> one line and exit 2; atomic outputs; verify pass/fail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm_megatron.checkpoint.safetensors_io import SafetensorsWriter, read_header, read_tensor
from mm_megatron.cli import main
from mm_megatron.convert.tiny_models import save_tiny_hf


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A sharded llama checkpoint and its conversion (made through the CLI)."""
    base = tmp_path_factory.mktemp("cli")
    hf = base / "hf"
    save_tiny_hf(hf, "llama", max_shard_size="150KB")
    assert (
        main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(base / "mc"), "--quiet"]) == 0
    )
    return hf, base / "mc"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _fails(args, capsys, *needles) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    line = err[-1]
    assert line.startswith("mm-megatron convert: error: "), line
    assert not any("Traceback" in x for x in err)
    for n in needles:
        assert n in line, (n, line)
    return line


def _h2m(src, out, *extra):
    return ["convert", "hf-to-mcore", "--hf", str(src), "--out", str(out), "--quiet", *extra]


def test_missing_shard(hf_dirs, tmp_path, capsys):
    hf = _copy(hf_dirs[0], tmp_path / "hf")
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    shard.unlink()
    _fails(_h2m(hf, tmp_path / "out"), capsys, "missing shard", shard.name)
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(hf_dirs, tmp_path, capsys):
    hf = _copy(hf_dirs[0], tmp_path / "hf")
    shard = sorted(hf.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    line = _fails(_h2m(hf, tmp_path / "out"), capsys, "truncated", shard.name)
    assert "'" in line  # names the tensor


def test_unsupported_architecture(hf_dirs, tmp_path, capsys):
    hf = _copy(hf_dirs[0], tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["Qwen2VLForConditionalGeneration"]
    cfg["model_type"] = "qwen2_vl"
    (hf / "config.json").write_text(json.dumps(cfg))
    _fails(_h2m(hf, tmp_path / "out"), capsys, "unsupported architecture", "Qwen2VL")


def test_unsupported_text_model(hf_dirs, tmp_path, capsys):
    hf = _copy(hf_dirs[0], tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["text_config"]["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    (hf / "config.json").write_text(json.dumps(cfg))
    _fails(_h2m(hf, tmp_path / "out"), capsys, "yarn")


def test_config_weight_shape_mismatch(hf_dirs, tmp_path, capsys):
    hf = _copy(hf_dirs[0], tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 80
    (hf / "config.json").write_text(json.dumps(cfg))
    _fails(
        _h2m(hf, tmp_path / "out"),
        capsys,
        "gate_proj.weight",
        "[96, 64]",
        "[80, 64]",
        ".safetensors",
    )


def test_unexpected_tensor(hf_dirs, tmp_path, capsys):
    hf = _copy(hf_dirs[0], tmp_path / "hf")
    shard = sorted(hf.glob("model-*.safetensors"))[0]
    infos, _ = read_header(shard)
    tensors = {k: read_tensor(v) for k, v in infos.items()}
    tensors["language_model.model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    index["weight_map"]["language_model.model.layers.0.self_attn.q_norm.weight"] = shard.name
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with SafetensorsWriter({shard: [(k, v.dtype, v.shape) for k, v in tensors.items()]}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    _fails(_h2m(hf, tmp_path / "out"), capsys, "unexpected tensor", "q_norm")


def test_refuses_to_overwrite_without_force(hf_dirs, tmp_path, capsys):
    hf, mc = hf_dirs
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(_h2m(hf, out), capsys, "exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    back = ["convert", "mcore-to-hf", "--ckpt", str(mc), "--out", str(out), "--quiet"]
    _fails(back, capsys, "exists")
    assert main([*back, "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").is_file()
    assert [p for p in os.listdir(tmp_path) if p != "out"] == []  # no temp dirs left
    _fails(["convert", "mcore-to-hf", "--ckpt", str(hf), "--out", str(tmp_path / "x")], capsys,
           "mm_megatron.json")  # fmt: skip


def test_verify_passes_and_fails(hf_dirs, tmp_path, capsys):
    hf, mc = hf_dirs
    args = ["convert", "verify", "--hf", str(hf), "--ckpt", str(mc), "--atol", "1e-4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "weights" in out and "logits TP1xPP1" in out and "overall: PASS" in out
    # a checkpoint converted from slightly different weights must fail against the original
    bad_hf = _copy(hf, tmp_path / "bad_hf")
    victim = "language_model.model.layers.1.self_attn.k_proj.weight"
    weight_map = json.loads((bad_hf / "model.safetensors.index.json").read_text())["weight_map"]
    shard = bad_hf / weight_map[victim]
    infos, _ = read_header(shard)
    tensors = {k: read_tensor(v) for k, v in infos.items()}
    tensors[victim] = tensors[victim] * 1.01
    with SafetensorsWriter({shard: [(k, v.dtype, v.shape) for k, v in tensors.items()]}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    assert main(_h2m(bad_hf, tmp_path / "bad_mc")) == 0
    capsys.readouterr()
    bad = ["convert", "verify", "--hf", str(hf), "--ckpt", str(tmp_path / "bad_mc")]
    assert main([*bad, "--atol", "1e-4"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and victim in out and "overall: FAIL" in out


def test_entry_points_show_convert_help():
    """``python -m mm_megatron`` and the ``mm-megatron`` console script expose the verbs."""
    cmds = [[sys.executable, "-m", "mm_megatron", "convert", "--help"]]
    script = Path(sys.executable).with_name("mm-megatron")
    if script.exists():
        cmds.append([str(script), "convert", "--help"])
    for cmd in cmds:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        for verb in ("hf-to-mcore", "mcore-to-hf", "verify", "reshard"):
            assert verb in res.stdout
