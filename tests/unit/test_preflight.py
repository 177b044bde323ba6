"""Fail before work, with the culprit named (issue 19, item 4). Each case as observed before:

- `--data-path` without `--tokenizer`: `TypeError: 'NoneType' object is not callable`;
- a missing tokenizer directory: a traceback;
- invalid YAML: a traceback that does not name the file;
- an unwritable `--save` / `--run-dir`: a traceback, after 2 training iterations for `--save`;
- not enough free disk space for one checkpoint: found only at the first save;
- a warm-up longer than the run: accepted silently;
- layout problems: one at a time, after 15-19 s (megatron initialised first).

Now each is a one-line error at start-up (exit code 2), before megatron is imported, and all
layout problems come together.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from mm_megatron.cli import main
from mm_megatron.train import preflight
from mm_megatron.train.preflight import PreflightError
from tests.train_helpers import tiny_job, write_tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    write_tiny_dataset(root / "tiny", n_train=16, n_val=8)
    notok = root / "notok"  # the same shards without a tokenizer beside them
    notok.mkdir()
    for f in (root / "tiny").glob("*.*"):
        if f.suffix in (".tar", ".json"):
            shutil.copy(f, notok / f.name)
    (root / "afile").write_text("not a directory\n")
    (root / "bad.yaml").write_text("train:\n  lr: [1, 2\n")
    return root


def _cli(tmp_path, *args):
    run_dir = tmp_path / "run"
    argv = ["train", "--preset", "debug-tiny", "--run-dir", str(run_dir), *args]
    return main(argv), run_dir


CASES = {
    "data_path_without_tokenizer": (
        lambda d: ["--data-path", str(d / "notok/train.index.json")],
        ["needs --tokenizer DIR", "notok/train.index.json"],
    ),
    "missing_tokenizer_dir": (
        lambda d: ["--data-path", str(d / "notok"), "--tokenizer", str(d / "no-such-tok")],
        ["tokenizer directory", "no-such-tok", "does not exist"],
    ),
    "invalid_yaml": (
        lambda d: ["--config", str(d / "bad.yaml")],
        ["bad.yaml: invalid YAML at line 3"],
    ),
    "unwritable_save": (
        lambda d: ["--data-path", str(d / "tiny"), "--save", str(d / "afile/ck")],
        ["--save", "afile/ck", "is a file, not a directory"],
    ),
    "unwritable_run_dir": (
        lambda d: ["--data-path", str(d / "tiny"), "--train.run_dir=" + str(d / "afile/run")],
        ["--run-dir", "afile/run", "is a file, not a directory"],
    ),
    "warmup_longer_than_run": (
        lambda d: ["--train.train_iters=10", "--train.lr_warmup_iters=50"],
        ["warm-up (50 steps) is longer than the run (train.train_iters=10)"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_start_up_error_is_one_line_naming_the_culprit(case, data, tmp_path, capsys):
    make_args, expected = CASES[case]
    rc, run_dir = _cli(tmp_path, *make_args(data))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("mm-megatron train: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)
    assert not (run_dir / "metrics.jsonl").exists()  # nothing ran


def test_every_layout_problem_at_once_before_megatron_is_imported(tmp_path):
    code = (
        "import sys\n"
        "from mm_megatron.cli import main\n"
        f"rc = main(['train', '--preset', 'debug-tiny', '--run-dir', {str(tmp_path)!r},\n"
        "    '--tensor-model-parallel-size', '3', '--pipeline-model-parallel-size', '3'])\n"
        "print('megatron imported:', 'megatron.core' in sys.modules)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "megatron imported: False" in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mm-megatron train: error:")]
    assert len(lines) == 1, proc.stderr
    for culprit in (
        "world size 1 is not divisible by TP*PP*CP = 3*3*1 = 9",
        "lm.num_attention_heads=4 is not divisible by TP=3",
        "vision.num_attention_heads=4 is not divisible by TP=3",
        "lm.num_layers=2 is not divisible by PP=3",
    ):
        assert culprit in lines[0], (culprit, lines[0])


def test_checkpoint_must_fit_before_the_first_step(data, tmp_path, monkeypatch):
    save = tmp_path / "ck"
    job = tiny_job(data / "tiny", tmp_path / "run", train_iters=3, save=str(save))
    monkeypatch.setattr(
        preflight.shutil,
        "disk_usage",
        lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1 << 20),
    )
    from mm_megatron.train import trainer as trainer_mod

    with pytest.raises(PreflightError, match="not enough free disk space for one checkpoint") as e:
        trainer_mod.train(job)
    assert str(save) in str(e.value) and "1.0 MiB free" in str(e.value)
    assert not (tmp_path / "run/metrics.jsonl").exists()  # no step was taken
    assert not save.exists()


def test_checkpoint_estimate_covers_weights_and_adam_state():
    import torch

    layer = torch.nn.Linear(10, 10)  # 110 params
    layer.bias.requires_grad_(False)  # 10 frozen
    assert preflight.checkpoint_bytes([layer], 4, main_params=False) == 100 * 12 + 10 * 4
    assert preflight.checkpoint_bytes([layer], 2, main_params=True) == 100 * 14 + 10 * 2
