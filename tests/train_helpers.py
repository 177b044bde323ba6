"""Helpers the training tests share: tiny datasets (good and deliberately bad), jobs, CLI runs.

What this file does: writes the synthetic shapes dataset at debug-tiny's size with a tokenizer
that fits its 512-token vocabulary; writes a dataset that mixes good caption samples with the
bad kinds the loader must skip (corrupt image, broken JSON, empty conversation, over-long);
builds small `JobConfig`s on them; runs ``python -m mm_megatron train`` as a subprocess.

What it does not do: assert anything (the tests do).
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm_megatron.train.config import JobConfig, load_job_config

BAD_KINDS = ("corrupt_image", "broken_json", "empty_conversation", "too_long", "missing_image")
"""Bad samples `write_bad_dataset` can plant."""


def write_tiny_dataset(out_dir: str | Path, n_train: int = 160, n_val: int = 48, seed: int = 0):
    """The synthetic dataset at debug-tiny's image size and vocabulary; returns its info."""
    from mm_megatron.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(
        str(out_dir),
        n_train=n_train,
        n_val=n_val,
        image_size=64,
        shard_size=64,
        seed=seed,
        vocab_size=512,
    )


def data_overrides(data_dir: str | Path) -> dict[str, Any]:
    """`data` section pointing at a dataset written by `write_tiny_dataset`."""
    data_dir = Path(data_dir)
    return {
        "train_shards": str(data_dir / "train.index.json"),
        "val_shards": str(data_dir / "val.index.json"),
        "tokenizer_path": str(data_dir / "tokenizer"),
        "template": "plain",
        "num_workers": 0,
    }


def _train_section(run_dir: str | Path, **train: Any) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "micro_batch_size": 4,
        "global_batch_size": 8,
        "train_iters": 4,
        "lr": 2e-3,
        "lr_warmup_iters": 1,
        "eval_iters": 0,
        "caption_eval": False,
        "num_threads": 1,
        "log_interval": 1,
        **train,
    }


def tiny_job(data_dir: str | Path, run_dir: str | Path, **train: Any) -> JobConfig:
    """debug-tiny on `data_dir`: micro batch 4, global batch 8, no evaluation, 1 thread."""
    overrides = {"data": data_overrides(data_dir), "train": _train_section(run_dir, **train)}
    return load_job_config("debug-tiny", overrides=overrides)


def cli_args(data_dir: str | Path, run_dir: str | Path, **train: Any) -> list[str]:
    """`mm-megatron train` arguments equivalent to `tiny_job` (dotted overrides)."""
    args = ["--preset", "debug-tiny"]
    for key, value in data_overrides(data_dir).items():
        args.append(f"--data.{key}={value}")
    for key, value in _train_section(run_dir, **train).items():
        args.append(f"--train.{key}={'null' if value is None else value}")
    return args


def train_subprocess(args: list[str], script: str | None = None, **popen: Any) -> subprocess.Popen:
    """Start ``python -m mm_megatron train ARGS`` (or ``python SCRIPT ARGS``) in a new session.

    stdout and stderr go to one line-buffered text pipe unless `popen` says otherwise. The new
    session lets `kill_session` reap helper processes a hard-killed trainer leaves behind
    (megatron's dist_checkpointing starts a multiprocessing Manager that outlives a SIGKILLed
    parent and keeps its stdout open).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, script] if script else [sys.executable, "-m", "mm_megatron", "train"]
    kw: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, **popen}
    return subprocess.Popen(
        [*cmd, *args], text=True, bufsize=1, env=env, start_new_session=True, **kw
    )


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of `proc`'s session (its process group)."""
    import contextlib
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _caption_sample(index: int, rng: random.Random, image_size: int) -> tuple[dict, bytes]:
    from mm_megatron.data.synthetic import COLOURS, POSITION_PHRASES, POSITIONS, SHAPES, draw_shape

    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    position = rng.choice(sorted(POSITIONS))
    img = draw_shape(shape, colour, position, image_size, image_size, rng)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    record = {
        "id": f"good-{index}",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": f"a {colour} {shape} {POSITION_PHRASES[position]}"},
        ],
        "images": [f"{index}.png"],
    }
    return record, buf.getvalue()


def write_bad_dataset(
    out_dir: str | Path, bad_every: int = 8, n: int = 96, image_size: int = 64, seed: int = 0
) -> Path:
    """Caption samples with a bad one (cycling through `BAD_KINDS`) every `bad_every` samples.

    Returns:
        The `train.index.json` path (the split is called train).
    """
    from mm_megatron.data.shards import ShardWriter, encode_sample, sample_key

    rng = random.Random(seed)
    out_dir = Path(out_dir)
    with ShardWriter(str(out_dir), "train", samples_per_shard=32) as writer:
        for i in range(n):
            record, png = _caption_sample(i, rng, image_size)
            kind = BAD_KINDS[(i // bad_every) % len(BAD_KINDS)] if i % bad_every == 3 else None
            payload = [("png", png)]
            if kind == "corrupt_image":
                payload = [("png", b"\x89PNG this is not an image")]
            elif kind == "empty_conversation":
                record["conversations"] = []
            elif kind == "too_long":
                record["conversations"][1]["value"] = " ".join(["red circle"] * 400)
            if kind:
                record["id"] = f"bad-{kind}-{i}"
            sample = encode_sample(sample_key(i, record["id"]), record, payload)
            if kind == "broken_json":
                sample["json"] = b'{"id": "broken", "conversations": [{'
            elif kind == "missing_image":
                del sample["0.png"]
            writer.write(sample)
    return out_dir / "train.index.json"


LEARNING_TRAIN = [
    "--micro-batch-size", "32",
    "--global-batch-size", "32",
    "--train-iters", "1500",
    "--lr", "2e-3",
    "--lr-warmup-iters", "30",
    "--log-interval", "100",
    "--eval-iters", "1",
    "--train.caption_eval=true",
    "--train.num_threads=1",
    "--data.template=plain",
    "--data.num_workers=1",
]  # fmt: skip
"""The learning tests' schedule: 1500 steps of 32 on one CPU thread, held-out caption check."""


@dataclass
class LearningRun:
    """A learning run started by `start_learning`; `finish` waits for it."""

    proc: subprocess.Popen
    log_path: Path
    run_dir: Path
    log: Any

    def finish(self, timeout: float = 1500) -> dict:
        """Wait, require exit 0, and return the final evaluation (colour/shape accuracy)."""
        from mm_megatron.train.metrics import read_metrics

        try:
            self.proc.wait(timeout=timeout)
        finally:
            kill_session(self.proc)
            self.log.close()
        assert self.proc.returncode == 0, self.log_path.read_text()[-3000:]
        evals = read_metrics(self.run_dir / "metrics.jsonl", kind="eval")
        return evals[max(evals)]


def start_learning(
    tmp_path: Path, preset: str, *extra: str, non_square_fraction: float = 0.25
) -> LearningRun:
    """Start training ``preset`` on the synthetic shapes task (6000 train / 400 held-out 64 px
    images) with `LEARNING_TRAIN` plus ``extra`` flags, in the background (one CPU thread)."""
    from mm_megatron.data.synthetic import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(
        str(data),
        n_train=6000,
        n_val=400,
        image_size=64,
        shard_size=1000,
        vocab_size=512,
        non_square_fraction=non_square_fraction,
    )
    run_dir = tmp_path / "run"
    args = [
        "--preset", preset,
        f"--data.train_shards={data}/train.index.json",
        f"--data.val_shards={data}/val.index.json",
        f"--data.tokenizer_path={data}/tokenizer",
        f"--run-dir={run_dir}",
        *LEARNING_TRAIN,
        *extra,
    ]  # fmt: skip
    log_path = tmp_path / "train.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed by LearningRun.finish
    return LearningRun(train_subprocess(args, stdout=log), log_path, run_dir, log)
