"""Reliability: SIGKILL + restart is bit-identical, SIGTERM/SIGUSR1 save and exit, a kill during a
save leaves the previous checkpoint loadable, NaN/inf steps are skipped, bad samples counted.

The kill tests run ``python -m mm_megatron train`` in a subprocess, exactly as a user would.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import textwrap

import pytest
import torch

from mm_megatron.checkpoint import model_io
from mm_megatron.train import checkpointing as ckpt
from mm_megatron.train import trainer as trainer_mod
from mm_megatron.train.metrics import read_metrics
from tests.train_helpers import (
    BAD_KINDS,
    cli_args,
    kill_session,
    tiny_job,
    train_subprocess,
    write_bad_dataset,
    write_tiny_dataset,
)

ITERS = 8
RUN = dict(train_iters=ITERS, save_interval=2, log_interval=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_tiny_dataset(out)
    return out


def _run_to_end(args: list[str], timeout: float = 300) -> str:
    proc = train_subprocess(args)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_session(proc)
    assert proc.returncode == 0, out[-3000:]
    return out


def _losses(run_dir) -> dict[int, float]:
    return {it: r["loss"] for it, r in read_metrics(run_dir / "metrics.jsonl").items()}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run's per-step losses."""
    run = tmp_path_factory.mktemp("ref")
    _run_to_end(cli_args(data_dir, run, save=str(run / "ck"), **RUN))
    losses = _losses(run)
    assert sorted(losses) == list(range(1, ITERS + 1))
    return losses


def _wait_for_iteration(proc: subprocess.Popen, iteration: int, lines: list[str]) -> None:
    for line in proc.stdout:
        lines.append(line)
        m = re.match(r"iteration\s+(\d+)/", line)
        if m and int(m.group(1)) >= iteration:
            return
    tail = "".join(lines)[-3000:]
    raise AssertionError(f"run ended before iteration {iteration}:\n{tail}")


def test_sigkill_at_a_random_step_then_restart_is_bit_identical(data_dir, tmp_path, reference):
    kill_at = random.Random(os.getpid()).randint(3, ITERS - 1)
    args = cli_args(data_dir, tmp_path, save=str(tmp_path / "ck"), **RUN)
    proc, lines = train_subprocess(args), []
    try:
        _wait_for_iteration(proc, kill_at, lines)
        proc.send_signal(signal.SIGKILL)  # the trainer process only, as a crash would
        proc.wait(timeout=60)
    finally:
        kill_session(proc)  # reap helper processes the dead trainer left behind
    assert proc.returncode == -signal.SIGKILL
    latest = ckpt.latest_iteration(tmp_path / "ck")
    assert latest is not None and latest <= kill_at, (kill_at, latest)
    out = _run_to_end(args)
    assert f"iteration {latest} (step {latest})" in out
    got = _losses(tmp_path)  # later records (the resumed run) win
    assert sorted(got) == list(range(1, ITERS + 1))
    mismatched = {it: (got[it], reference[it]) for it in got if got[it] != reference[it]}
    assert not mismatched, f"killed at {kill_at}, resumed from {latest}: {mismatched}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_and_exits_cleanly(data_dir, tmp_path, sig):
    save = tmp_path / "ck"
    args = cli_args(data_dir, tmp_path, save=str(save), train_iters=1000, log_interval=1)
    proc, lines = train_subprocess(args), []
    try:
        _wait_for_iteration(proc, 2, lines)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        kill_session(proc)
    out = "".join(lines) + out
    assert proc.returncode == 0, out[-3000:]
    assert "[signal] stopping after iteration" in out
    stopped = int(out.split("[signal] stopping after iteration ")[1].split()[0])
    assert 2 <= stopped < 1000
    assert model_io.read_tracker(save) == stopped
    assert ckpt.complete_iterations(save) == [stopped]


KILL_IN_SAVE = """
import os, signal, sys
from mm_megatron.checkpoint import model_io

original = model_io.publish_checkpoint
count = [0]

def publish(*args, **kwargs):
    count[0] += 1
    if count[0] == 2:  # the second save: its files are written, nothing is renamed yet
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)

model_io.publish_checkpoint = publish

if __name__ == "__main__":
    from mm_megatron.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_kill_during_a_save_keeps_the_previous_checkpoint(data_dir, tmp_path, reference):
    save = tmp_path / "ck"
    args = cli_args(data_dir, tmp_path, save=str(save), **RUN)
    script = tmp_path / "kill_in_save.py"
    script.write_text(textwrap.dedent(KILL_IN_SAVE))
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        proc = train_subprocess(args, script=str(script), stdout=f)
        try:
            proc.wait(timeout=300)
        finally:
            kill_session(proc)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    # The half-finished save of iteration 4 is there, but nothing points at it.
    assert (save / ".tmp_iter_0000004" / "metadata.json").is_file()
    assert model_io.read_tracker(save) == 2 and ckpt.latest_iteration(save) == 2
    out = _run_to_end(args)
    assert "iteration 2 (step 2)" in out
    assert not (save / ".tmp_iter_0000004").exists()
    got = _losses(tmp_path)
    assert all(got[it] == reference[it] for it in range(1, ITERS + 1))


def test_nan_steps_are_skipped_counted_and_bounded(data_dir, tmp_path, monkeypatch):
    real = trainer_mod.forward_backward
    calls = {"n": 0}
    poison = {2, 3}

    def fake(chunks, batches, **kw):
        out = real(chunks, batches, **kw)
        calls["n"] += 1
        if calls["n"] in poison:
            out["loss"] = float("nan")
        return out

    monkeypatch.setattr(trainer_mod, "forward_backward", fake)
    params = []
    original = trainer_mod.Trainer.train_step

    def step(self):
        out = original(self)
        params.append(
            torch.cat([p.detach().flatten().clone() for p in self.chunks[0].parameters()])
        )
        return out

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step)
    result = trainer_mod.train(tiny_job(data_dir, tmp_path, train_iters=5, max_nan_iters=3))
    assert result.skipped_iters == 2
    assert math.isnan(result.losses[2]) and math.isnan(result.losses[3])
    assert torch.equal(params[0], params[1]) and torch.equal(params[1], params[2])  # no update
    assert not torch.equal(params[2], params[3])  # training goes on afterwards
    line = [r for r in read_metrics(tmp_path / "metrics.jsonl").values()][-1]
    assert line["nan_iterations"] == 2 and line["skipped_iterations"] == 2

    calls["n"], params[:] = 0, []
    with pytest.raises(trainer_mod.NonFiniteLossError, match="2 steps in a row"):
        trainer_mod.train(tiny_job(data_dir, tmp_path / "b", train_iters=5, max_nan_iters=2))


def test_nan_gradient_is_not_applied(data_dir, tmp_path, monkeypatch):
    real = trainer_mod.forward_backward

    def fake(chunks, batches, **kw):
        out = real(chunks, batches, **kw)
        for p in chunks[0].parameters():
            p.main_grad.view(-1)[0] = float("inf")
            break
        return out

    monkeypatch.setattr(trainer_mod, "forward_backward", fake)
    job = tiny_job(data_dir, tmp_path, train_iters=2, max_nan_iters=5)
    t = trainer_mod.Trainer(job)
    try:
        t.setup()
        before = [p.detach().clone() for p in t.chunks[0].parameters()]
        step = t.train_step()
        assert not math.isfinite(step["grad_norm"]) and t.skipped_iters == 1
        assert all(torch.equal(a, p) for a, p in zip(before, t.chunks[0].parameters()))
        assert t.scheduler.num_steps == 0
    finally:
        t.close()


def test_bad_samples_are_skipped_counted_and_bounded(data_dir, tmp_path, capsys, caplog):
    # one bad sample every 8, cycling through every kind; file order (no shuffle)
    index = write_bad_dataset(tmp_path / "bad", bad_every=8)

    def job(fraction):
        j = tiny_job(data_dir, tmp_path / f"run{fraction}", train_iters=5)
        j.data.train_shards, j.data.val_shards = str(index), None
        j.data.shuffle = False
        j.data.min_samples_for_bad_check = 0
        j.data.max_bad_fraction = fraction
        return j

    trainer_mod.train(job(0.5))
    out = capsys.readouterr().out
    last = [line for line in out.splitlines() if line.startswith("iteration ")][-1]
    # 5 steps x 8 = 40 good samples took 46 reads: bad ones at 3, 11, 19, 27, 35, 43
    assert "bad samples: 6 (13.04%)" in last, last
    record = read_metrics(tmp_path / "run0.5" / "metrics.jsonl")[5]
    assert record["bad_samples"] == 6 and record["samples_read"] == 46
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for reason in BAD_KINDS:
        assert f"({reason})" in logged, reason
    assert "shard=" in logged and "train-000000.tar" in logged and "key=000000003_bad-" in logged
    assert "[data] last bad sample on rank 0: corrupt_image" in out

    with pytest.raises(trainer_mod.DataError, match="max_bad_fraction") as err:
        trainer_mod.train(job(0.05))
    assert "bad-" in str(err.value)  # names the samples (record ids are in the keys)


def test_metrics_file_is_json_per_step(data_dir, tmp_path):
    trainer_mod.train(tiny_job(data_dir, tmp_path, train_iters=2))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2]
    for key in (
        "loss",
        "lm_loss",
        "grad_norm",
        "learning_rate",
        "tokens_per_sec_per_gpu",
        "tflops_per_gpu",
        "consumed_samples",
        "mem_rss_mib",
    ):
        assert key in records[-1]
    assert any((tmp_path / "tensorboard").iterdir())
