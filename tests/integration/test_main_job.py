"""The README's main job as a new user runs it (issue 19 items 1 and 2), each case as observed:

- `mm-megatron train --preset debug-tiny` wrote no checkpoint and created `./runs/debug-tiny/`
  without saying so; now it saves its final checkpoint, prints a summary (what, final metrics,
  where, the next commands) and shows synthesis progress;
- a rerun silently appended to the same metrics.jsonl / TensorBoard; now it resumes (announced)
  or, with no checkpoint to resume, writes to its own directory;
- `--print-config` showed `save: null`, `tensorboard_dir: null`; now the resolved paths;
- TensorBoard had `train/loss` (last step) beside `train/lm_loss` (interval mean), unlabelled;
- there was no way to look at what the model learned: `generate` on held-out images now names
  the right colour for >= 90% of them, and each evaluation writes images + captions to
  TensorBoard.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from mm_megatron import cli
from mm_megatron.infer.samples import heldout_samples
from mm_megatron.train.run_outputs import resolve_output_paths
from tests.train_helpers import kill_session, train_subprocess

RUN = "runs/debug-tiny"

pytestmark = pytest.mark.timeout(2400)  # the main job itself: 44 s idle, minutes when shared


def _main_job(cwd, timeout: float = 1500) -> str:
    proc = train_subprocess(["--preset", "debug-tiny"], cwd=str(cwd))
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_session(proc)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """The README's main job, run exactly as documented, in a fresh directory."""
    cwd = tmp_path_factory.mktemp("user")
    return cwd, _main_job(cwd)


def test_main_job_saves_and_explains_itself(main_job):
    cwd, out = main_job
    assert "synthesising train" in out  # progress while the data is drawn
    assert f"[checkpoint] saved iteration 300 to {RUN}/checkpoints" in out
    summary = out[out.index("run summary") :]
    assert "trained: preset debug-tiny, 283,712 parameters" in summary
    assert re.search(
        r"final: lm loss \(last step\) [\d.]+ \| val_loss [\d.]+ \| colour_acc", summary
    )
    assert f"checkpoint: {RUN}/checkpoints (iteration 300)" in summary
    assert f"metrics: {RUN}/metrics.jsonl" in summary
    assert f"tensorboard: tensorboard --logdir {RUN}/tensorboard" in summary
    assert f"mm-megatron convert mcore-to-hf --ckpt {RUN}/checkpoints --out {RUN}/hf" in summary
    assert f"mm-megatron generate --ckpt {RUN}/checkpoints --image {RUN}/samples/val-0." in summary
    assert (cwd / RUN / "checkpoints" / "iter_0000300" / "metadata.json").is_file()
    assert list((cwd / RUN / "samples").glob("val-0.*"))


def test_tensorboard_names_and_samples(main_job):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cwd, _ = main_job
    acc = EventAccumulator(str(cwd / RUN / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/lm_loss_last_step", "train/lm_loss_mean_since_last_log"} <= scalars
    assert not {"train/loss", "train/lm_loss"} & scalars
    assert "eval/colour_acc" in scalars
    rows = [json.loads(line) for line in (cwd / RUN / "metrics.jsonl").read_text().splitlines()]
    evals = [r["iteration"] for r in rows if r["kind"] == "eval"]
    assert evals and evals[-1] == 300
    # every evaluation: held-out images with their generated captions (image + text)
    assert "samples/0" in acc.Tags()["images"]
    assert [e.step for e in acc.Images("samples/0")] == evals
    assert [t for t in acc.Tags()["tensors"] if t.startswith("samples/")]
    samples = [r for r in rows if r["kind"] == "samples"]
    assert [r["iteration"] for r in samples] == evals
    assert all(len(r["samples"]) == 4 and r["samples"][0]["answer"] for r in samples)


def test_generate_names_the_colour_of_held_out_images(main_job, tmp_path, capsys):
    cwd, _ = main_job
    data = cwd / RUN / "synthetic-data"
    colours = json.loads((data / "dataset_info.json").read_text())["labels"]["colours"]
    caption = re.compile(rf"^a ({'|'.join(colours)}) ")
    samples = [s for s in heldout_samples(str(data / "val.index.json"), 200)]
    samples = [s for s in samples if caption.match(s.reference)]
    assert len(samples) >= 50
    lines = []
    for i, s in enumerate(samples):
        (tmp_path / f"{i}.{s.image_ext}").write_bytes(s.image_bytes)
        lines.append(json.dumps({"image": f"{i}.{s.image_ext}", "prompt": s.prompt}))
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    answers_path = tmp_path / "answers.jsonl"
    ckpt = str(cwd / RUN / "checkpoints")
    rc = cli.main(
        ["generate", "--ckpt", ckpt, "--batch-file", str(batch), "--out", str(answers_path)]
    )
    assert rc == 0
    answers = [json.loads(x)["answer"] for x in answers_path.read_text().splitlines()]
    assert len(answers) == len(samples)
    right = sum(
        (m := caption.match(a)) is not None and m.group(1) == caption.match(s.reference).group(1)
        for a, s in zip(answers, samples)
    )
    assert right / len(samples) >= 0.90, (right, len(samples), answers[:5])
    # the single-image form streams one answer to stdout
    capsys.readouterr()
    image = str(tmp_path / f"0.{samples[0].image_ext}")
    assert cli.main(["generate", "--ckpt", ckpt, "--image", image, "--prompt", "x"]) == 0
    assert capsys.readouterr().out.startswith("a ")


def test_rerun_resumes_and_says_so(main_job):
    cwd, _ = main_job
    out = _main_job(cwd, timeout=600)
    assert f"[run] {RUN}/checkpoints holds a checkpoint: this run resumes from it" in out
    assert f"resumed from {RUN}/checkpoints iteration 300" in out
    assert "already at iteration 300 of train_iters=300: nothing to train" in out
    assert "[checkpoint] saved" not in out
    assert "run summary" in out


def test_print_config_shows_resolved_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--preset", "debug-tiny", "--print-config"]) == 0
    train = yaml.safe_load(capsys.readouterr().out)["train"]
    assert train["run_dir"] == RUN
    assert train["save"] == f"{RUN}/checkpoints"
    assert train["tensorboard_dir"] == f"{RUN}/tensorboard"


def test_rerun_without_checkpoint_gets_its_own_directory(tmp_path, monkeypatch):
    from mm_megatron.commands.train_cmd import resolve_job

    monkeypatch.chdir(tmp_path)
    (tmp_path / RUN).mkdir(parents=True)
    (tmp_path / RUN / "metrics.jsonl").write_text("{}\n")  # an earlier run, nothing saved
    job, _ = resolve_job(["--preset", "debug-tiny"])
    notes = resolve_output_paths(job)
    assert job.train.run_dir == f"{RUN}-2"
    assert job.train.save == f"{RUN}-2/checkpoints"
    assert job.train.tensorboard_dir == f"{RUN}-2/tensorboard"
    assert notes == [
        f"[run] {RUN} holds an earlier run's logs and no checkpoint to resume: this run writes "
        f"to {RUN}-2"
    ]
