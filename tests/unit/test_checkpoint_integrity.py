"""Checkpoints never betray a resume (issue 19, item 5), each case as observed:

- a truncated `.distcp`/`.metadata` file (before: a raw EOFError/UnpicklingError naming no file,
  no fallback) is reported by file name and the resume falls back to the newest intact
  checkpoint;
- a full disk during a save (before: `unexpected pos 704 vs 598` and a `.tmp_iter_*` directory
  left filling the disk) says "no space left on device" with the directory, removes the
  temporary directory and keeps the previous checkpoint the latest;
- a state with NaN weights (before: saved and made the latest) is not saved;
- resuming with another LR (before: megatron's "Could not find parameter group" dump) works,
  follows the new schedule and says what changed.

The full-disk case uses a real 6 MiB tmpfs when this process may mount one (root), else the
same failure injected into the writer.
"""

from __future__ import annotations

import logging
import shutil
import subprocess

import pytest
import torch

from mm_megatron.checkpoint import integrity
from mm_megatron.checkpoint.integrity import CheckpointSaveError, check_record
from mm_megatron.train import checkpointing as ckpt
from mm_megatron.train import trainer as trainer_mod
from mm_megatron.train.metrics import read_metrics
from tests.train_helpers import tiny_job, write_tiny_dataset


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 4-step run saving at steps 2 and 4 (lr 2e-3, warm-up 1, cosine to 0)."""
    root = tmp_path_factory.mktemp("integrity")
    write_tiny_dataset(root / "tiny", n_train=16, n_val=8)
    job = tiny_job(
        root / "tiny", root / "run", train_iters=4, save_interval=2, save=str(root / "ck")
    )
    job.train.keep_last = 0
    result = trainer_mod.train(job)
    assert result.exit_reason == "done"
    return {
        "data": root / "tiny",
        "ck": root / "ck",
        "metrics": read_metrics(root / "run/metrics.jsonl"),
    }


def _copy_at(base, dst, iteration: int):
    """The base checkpoint directory as it was after saving `iteration`."""
    later = {f"iter_{it:07d}" for it in ckpt.complete_iterations(base["ck"]) if it > iteration}
    shutil.copytree(base["ck"], dst, ignore=lambda d, names: [n for n in names if n in later])
    (dst / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return dst


def _resume(base, run_dir, save, **train):
    return trainer_mod.train(tiny_job(base["data"], run_dir, save=str(save), **train))


def test_every_save_writes_a_record_that_names_damaged_files(base, tmp_path):
    ck = shutil.copytree(base["ck"], tmp_path / "ck")
    it4 = ck / "iter_0000004"
    assert (it4 / integrity.RECORD).is_file() and check_record(it4) == []
    metadata = it4 / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:-10])  # truncated
    distcp = next(it4.glob("*.distcp"))
    data = bytearray(distcp.read_bytes())
    data[100] ^= 0xFF  # same size, one byte changed
    distcp.write_bytes(bytes(data))
    problems = check_record(it4)
    assert any(".metadata" in p and "truncated" in p for p in problems), problems
    assert any(distcp.name in p and "checksum" in p for p in problems), problems


def test_truncated_newest_checkpoint_falls_back_to_the_intact_one(base, tmp_path, caplog):
    ck = shutil.copytree(base["ck"], tmp_path / "ck")
    distcp = next((ck / "iter_0000004").glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        result = _resume(base, tmp_path / "run", ck, train_iters=5, save_interval=100)
    assert result.resumed_from == 2 and sorted(result.losses) == [3, 4, 5]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "iteration 4 is damaged" in warned and distcp.name in warned, warned
    assert "newest intact" in warned


def _mount_tmpfs(path, size: str) -> bool:
    if shutil.which("mount") is None:
        return False
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return proc.returncode == 0


def _inject_full_disk(monkeypatch):
    """What a full disk looks like to the writer: a partial file, then torch's error."""
    real = ckpt.dist_checkpointing.save

    def save(state, directory, **kw):
        (ckpt.Path(directory) / "__0_0.distcp").write_bytes(b"x" * 598)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(ckpt.dist_checkpointing, "save", save)
    monkeypatch.setattr(integrity.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))
    return real


def _fill_disk_during_step(monkeypatch, disk, iteration: int) -> None:
    """Another writer fills the disk during step `iteration` (after the start-up checks)."""
    original = trainer_mod.Trainer.train_step

    def step(self):
        out = original(self)
        if self.iteration == iteration:
            free = shutil.disk_usage(disk).free
            (disk / "ballast").write_bytes(b"\0" * max(0, free - (256 << 10)))
        return out

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step)


def test_full_disk_says_no_space_and_keeps_the_previous_checkpoint(base, tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = _mount_tmpfs(disk, "16m")
    try:
        ck = _copy_at(base, disk / "ck", 2)
        if mounted:
            _fill_disk_during_step(monkeypatch, disk, 3)
        else:
            _inject_full_disk(monkeypatch)
        with pytest.raises(CheckpointSaveError) as err:
            _resume(base, tmp_path / "run", ck, train_iters=4, save_interval=2)
        message = str(err.value)
        assert "no space left on device" in message and str(ck) in message, message
        assert "\n" not in message
        assert not list(ck.glob(".tmp_*")), list(ck.iterdir())
        assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
        assert ckpt.complete_iterations(ck) == [2]
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


def test_non_finite_state_is_never_saved(base, tmp_path, monkeypatch, capsys):
    ck = _copy_at(base, tmp_path / "ck", 2)
    original = trainer_mod.Trainer.train_step

    def step(self):
        out = original(self)
        if self.iteration == 3:
            with torch.no_grad():
                next(self.chunks[0].parameters()).fill_(float("nan"))  # diverged
        return out

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step)
    result = _resume(base, tmp_path / "run", ck, train_iters=4, save_interval=2)
    assert result.exit_reason == "done"
    assert "NOT saved iteration 4" in capsys.readouterr().out
    assert ckpt.complete_iterations(ck) == [2]
    assert ckpt.latest_iteration(ck) == 2


def test_resume_with_another_lr_follows_the_new_schedule(base, tmp_path, capsys):
    ck = _copy_at(base, tmp_path / "ck", 2)
    result = _resume(base, tmp_path / "run", ck, train_iters=4, save_interval=100, lr=1e-3)
    assert result.resumed_from == 2 and sorted(result.losses) == [3, 4]
    assert "max_lr 0.002 -> 0.001" in capsys.readouterr().out
    got = read_metrics(tmp_path / "run/metrics.jsonl")
    for it in (3, 4):  # cosine to 0 scales with the peak: half the LR of the base run
        assert got[it]["learning_rate"] == pytest.approx(base["metrics"][it]["learning_rate"] / 2)
