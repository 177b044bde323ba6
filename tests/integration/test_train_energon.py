"""Training on an energon dataset resumes exactly from the checkpoint: a run stopped after 2
steps and resumed equals the uninterrupted run (losses and consumed samples), and two fresh runs
on the same seed are equal."""

from __future__ import annotations

import pytest

from mm_megatron.train import trainer as trainer_mod
from tests.train_helpers import tiny_job, write_tiny_dataset

pytest.importorskip("megatron.energon")

ITERS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mm_megatron.data.energon import write_energon_metadata

    root = tmp_path_factory.mktemp("train-energon") / "tiny"
    write_tiny_dataset(root, n_train=24, n_val=8)
    assert write_energon_metadata(str(root)) == ["train", "val"]
    return root


def _job(data, run_dir, save):
    job = tiny_job(data, run_dir, train_iters=ITERS, save_interval=100, save=str(save))
    job.data.train_shards = job.data.val_shards = str(data)  # the energon dataset directory
    return job


def _stop_after(monkeypatch, iteration: int) -> None:
    original = trainer_mod.Trainer.train_step

    def step(self):
        out = original(self)
        if self.iteration == iteration:
            self.stop_requested = True  # as if SIGTERM arrived during this step
        return out

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step)


def test_energon_run_resumes_exactly(data, tmp_path, monkeypatch):
    ref = trainer_mod.train(_job(data, tmp_path / "a", tmp_path / "a/ck"))
    assert ref.exit_reason == "done" and sorted(ref.losses) == list(range(1, ITERS + 1))

    run, save = tmp_path / "b", tmp_path / "b/ck"
    with monkeypatch.context() as m:
        _stop_after(m, 2)
        first = trainer_mod.train(_job(data, run, save))
    assert first.exit_reason == "signal" and first.iteration == 2
    assert [first.losses[i] for i in (1, 2)] == [ref.losses[i] for i in (1, 2)]  # deterministic
    second = trainer_mod.train(_job(data, run, save))
    assert second.resumed_from == 2 and sorted(second.losses) == [3, 4]
    assert [second.losses[i] for i in (3, 4)] == [ref.losses[i] for i in (3, 4)]
