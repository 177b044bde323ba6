"""Resume restores the whole training state, not only the weights: the counters a run reports
(consumed samples, skipped and NaN steps, bad and read samples) after a stop and a resume equal
those of the uninterrupted run, and so do the losses."""

from __future__ import annotations

import math

import pytest

from mm_megatron.train import trainer as trainer_mod
from mm_megatron.train.metrics import read_metrics
from tests.train_helpers import tiny_job, write_bad_dataset, write_tiny_dataset

COUNTERS = ("consumed_samples", "skipped_iterations", "nan_iterations", "bad_samples")
ITERS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-state")
    write_tiny_dataset(root / "tiny", n_train=16, n_val=8)  # for its tokenizer
    bad = write_bad_dataset(root / "bad", bad_every=6, n=160)
    return root / "tiny", bad


def _job(data, run_dir, save):
    tiny, bad = data
    job = tiny_job(tiny, run_dir, train_iters=ITERS, save_interval=100, save=str(save))
    job.data.train_shards, job.data.val_shards = str(bad), None
    job.data.shuffle = False
    job.data.min_samples_for_bad_check = 0
    job.data.max_bad_fraction = 0.5
    return job


def _poison_step(monkeypatch, step: int) -> None:
    """The `step`-th forward_backward of this process reports a NaN loss (skipped, counted)."""
    real = trainer_mod.forward_backward
    calls = {"n": 0}

    def fake(chunks, batches, **kw):
        out = real(chunks, batches, **kw)
        calls["n"] += 1
        if calls["n"] == step:
            out["loss"] = float("nan")
        return out

    monkeypatch.setattr(trainer_mod, "forward_backward", fake)


def _stop_after(monkeypatch, iteration: int) -> None:
    original = trainer_mod.Trainer.train_step

    def step(self):
        out = original(self)
        if self.iteration == iteration:
            self.stop_requested = True  # as if SIGTERM arrived during this step
        return out

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step)


def test_resume_restores_counters_and_losses(data, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        _poison_step(m, 2)
        ref = trainer_mod.train(_job(data, tmp_path / "a", tmp_path / "a/ck"))
    assert ref.exit_reason == "done" and ref.skipped_iters == 1

    run, save = tmp_path / "b", tmp_path / "b/ck"
    with monkeypatch.context() as m:
        _poison_step(m, 2)
        _stop_after(m, 3)
        first = trainer_mod.train(_job(data, run, save))
    assert first.exit_reason == "signal" and first.iteration == 3
    second = trainer_mod.train(_job(data, run, save))
    assert second.resumed_from == 3 and sorted(second.losses) == [4, 5, 6]

    want = read_metrics(tmp_path / "a" / "metrics.jsonl")
    got = read_metrics(run / "metrics.jsonl")  # the resumed run's records win
    assert sorted(got) == sorted(want) == list(range(1, ITERS + 1))
    for it in range(1, ITERS + 1):
        for key in (*COUNTERS, "samples_read"):
            assert got[it][key] == want[it][key], (it, key, got[it][key], want[it][key])
        w, g = want[it]["lm_loss"], got[it]["lm_loss"]
        assert (math.isnan(w) and math.isnan(g)) or g == w, (it, g, w)
    last = want[ITERS]
    assert last["bad_samples"] > 0 and last["nan_iterations"] == 1
    assert last["consumed_samples"] == ITERS * 8
