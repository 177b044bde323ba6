"""The training loop: set-up, steps, logging, evaluation, checkpoints, signals and NaN guards.

What this file does: `train(job)` runs a whole job on this rank (single process, or one rank of a
torchrun/SLURM job; every rank runs the same code):

1. process groups and megatron parallel state (`mm_megatron.runtime.distributed.initialize`),
   layout validation, micro-batches per step = global / (micro * DP);
2. data (`data_setup.py`; the synthetic dataset when none is configured), tokenizer checks;
3. model chunks, optimizer and LR schedule (`components.py`);
4. state: resume from the latest checkpoint in `train.save` if there is one (model, optimizer,
   scheduler, RNG, data position, counters), else the weights of `train.load`, else fresh;
5. steps: zero grads -> `forward_backward` (megatron schedules, gradient accumulation over the
   micro-batches, DP/CP grad reduction) -> NaN/inf guard -> clip + optimizer step -> LR step;
6. every `log_interval` a Megatron-style log line + memory line, TensorBoard and metrics.jsonl;
   every `eval_interval` (and at the end) validation loss and, on the synthetic data, caption
   colour/shape accuracy; every `save_interval` (and at the end) a checkpoint.

Reliability: SIGTERM or SIGUSR1 makes every rank save a checkpoint after the current step and
return cleanly (the ranks agree through the per-step all-reduce). A step whose loss or gradient
norm is NaN/inf is skipped (no update, no LR step) and counted; `max_nan_iters` in a row raise
`NonFiniteLossError`. Bad samples are skipped by the loader and counted; their totals over all
DP ranks are in the log line, and past `data.max_bad_fraction` every rank stops with the
loader's message (`TooManyBadSamplesError`), never a hang.

What it does not do: parse command lines (`mm_megatron/commands/train_cmd.py`).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mm_megatron.checkpoint import integrity
from mm_megatron.data import TooManyBadSamplesError, prepare_tokenizer
from mm_megatron.infer.samples import heldout_samples
from mm_megatron.model.flops import train_step_flops
from mm_megatron.parallel.layout import validate_layout
from mm_megatron.parallel.schedule import forward_backward
from mm_megatron.runtime import children, cpu_runtime, distributed
from mm_megatron.train import checkpointing as ckpt
from mm_megatron.train import preflight
from mm_megatron.train.components import (
    build_model,
    build_optimizer,
    build_scheduler,
    current_lr,
    optimizer_step,
    resolve_dtype,
)
from mm_megatron.train.config import JobConfig
from mm_megatron.train.data_setup import (
    StepBatches,
    build_loader,
    check_tokenizer,
    resolve_data,
    resume_data_stream,
    stream_states,
)
from mm_megatron.train.evaluate import run_evaluation
from mm_megatron.train.heartbeat import Heartbeat, PeerFailure
from mm_megatron.train.metrics import (
    IntervalStats,
    MetricsWriter,
    format_log_line,
    memory_line,
    memory_stats,
)
from mm_megatron.train.run_outputs import job_record, summary_lines, write_sample_image
from mm_megatron.train.throughput import throughput

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Signals that trigger a checkpoint and a clean exit."""

SAMPLES_PER_EVAL = 4
"""Held-out images captioned into TensorBoard at each evaluation (synthetic data, PP=CP=1)."""


__all__ = ["DataError", "NonFiniteLossError", "PeerFailure", "TrainResult", "train"]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient norm."""


class DataError(RuntimeError):
    """The data pipeline failed on some rank (the message names the rank and the cause)."""


@dataclass
class TrainResult:
    """What a finished (or signalled) run reports."""

    iteration: int
    """Steps done."""
    losses: dict[int, float] = field(default_factory=dict)
    """Loss of every step this process ran."""
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    """Evaluation results by step."""
    exit_reason: str = "done"
    """done, or signal (a checkpoint was saved after SIGTERM/SIGUSR1)."""
    skipped_iters: int = 0
    """Steps without an update (NaN/inf)."""
    resumed_from: int | str | None = None
    """Checkpoint iteration this run resumed from (or the --load iteration), if any."""


class Trainer:
    """One rank's training run; see the module docstring. Use `train(job)`."""

    def __init__(self, job: JobConfig):
        self.job = job
        self.signal_received = False
        """Set by the signal handler on this rank (any time)."""
        self.stop_requested = False
        """Some rank got a signal before this step's all-reduce: every rank saves and stops."""
        self._old_handlers: dict[int, Any] = {}
        self.iteration = 0
        self.consumed_samples = 0
        self.skipped_iters = 0
        self.nan_iters = 0
        self._nan_in_a_row = 0
        self._bad_logged = 0.0
        self.checkpointer: ckpt.Checkpointer | None = None
        self._resumed_dir: str | None = None
        self._resume_changes: list[str] = []
        self.writer: MetricsWriter | None = None
        self.data_totals = (0.0, 0.0)
        self.notes: list[str] = []
        """Announcements for the header (e.g. a changed DP size or global batch on resume)."""
        """(samples read, bad samples) over all DP ranks, as of the last step."""
        self.result = TrainResult(iteration=0)

    # --- set-up ---------------------------------------------------------------------------------
    def _set_threads(self) -> None:
        n = self.job.train.num_threads
        if n is None and cpu_runtime.on_cpu():
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            n = max(1, (os.cpu_count() or 1) // local)
        if n:
            torch.set_num_threads(n)

    def _install_signals(self) -> None:
        def handler(signum, frame):
            self.signal_received = True

        for sig in EXIT_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread (some test runners)
                self._old_handlers[sig] = signal.signal(sig, handler)

    def setup(self) -> None:
        """Everything before the first step; collective."""
        job, t = self.job, self.job.train
        self._set_threads()
        # every start-up problem at once, before torch.distributed and megatron start
        preflight.check_job(job, dist.get_world_size() if dist.is_initialized() else None)
        distributed.initialize(job.parallel, seed=t.seed, timeout_s=t.dist_timeout_s)
        world = dist.get_world_size()
        self.rank = dist.get_rank()
        children.guard_helpers(checkpoint_writer=bool(t.save))  # before any helper starts
        self.heartbeat = Heartbeat(self.rank, world)
        validate_layout(job.model, job.parallel, world)
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.world = world
        per_step = t.micro_batch_size * self.dp
        if t.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                f"micro_batch_size * DP = {t.micro_batch_size} * {self.dp}"
            )
        self.num_microbatches = t.global_batch_size // per_step
        run_dir = job.run_dir
        if self.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        self.data = resolve_data(job)
        self.tokenizer = prepare_tokenizer(self.data.config.tokenizer_path, job.data.image_token)
        check_tokenizer(job.model, self.tokenizer)

        self.dtype = resolve_dtype(t.precision)
        self.chunks = build_model(job, self.dtype)
        self.optimizer = build_optimizer(job, self.chunks, self.dtype)
        self.scheduler = build_scheduler(job, self.optimizer)
        if t.save:
            self._check_checkpoint_space()
        data_state = self._restore()

        loader = build_loader(
            self.data.config, self.tokenizer, job, dp_rank=self.dp_rank, dp_size=self.dp
        )
        self._position_loader(loader, data_state)
        self.train_batches = StepBatches(loader, self.num_microbatches, t.blank_images)
        self.val_loader = None
        if self.data.config.val_shards and t.eval_iters > 0:
            self.val_loader = build_loader(
                self.data.config,
                self.tokenizer,
                job,
                dp_rank=self.dp_rank,
                dp_size=self.dp,
                split="val",
            )
        caption = t.caption_eval
        if caption is None:  # on for the synthetic shapes data (generated or given)
            caption = bool(self.data.labels)
        self.caption_eval = bool(caption) and job.parallel.pp == 1 and job.parallel.cp == 1
        self.caption_eval = self.caption_eval and bool(self.data.labels)

        tb = t.tensorboard_dir or str(run_dir / "tensorboard")
        self.writer = MetricsWriter(self.rank == 0, run_dir / "metrics.jsonl", _path_or_none(tb))
        if t.save:
            self.checkpointer = ckpt.Checkpointer(
                t.save, job.model, t.keep_last, t.async_save, provenance_from=t.load
            )
            if self._resumed_dir == t.save and self.iteration:
                self.checkpointer.last_saved = self.iteration  # it is on disk already
        self.first_step = self.iteration
        self.heldout = []
        if self.caption_eval and not job.parallel.sequence_parallel:
            self.heldout = heldout_samples(self.data.config.val_shards, SAMPLES_PER_EVAL)
        self._install_signals()
        self._print_header()

    def _check_checkpoint_space(self) -> None:
        """One checkpoint must fit in `--save` before the first step; collective."""
        main_params = self.dtype != torch.float32
        param_bytes = torch.finfo(self.dtype).bits // 8
        local = preflight.checkpoint_bytes(self.chunks, param_bytes, main_params)
        total = self._agree([float(local)])[0]
        replicas = self.dp * parallel_state.get_context_parallel_world_size()
        preflight.check_checkpoint_space(self.job.train.save, int(total / replicas))

    def _restore(self) -> dict | None:
        """Resume from `train.save`, or load `train.load`'s weights; returns the data state."""
        t = self.job.train
        latest = ckpt.latest_iteration(t.save) if t.save else None
        if t.save:
            ckpt.clean_stale(t.save)
            # a damaged newest checkpoint is reported by file and the newest intact one used
            latest = integrity.resume_iteration(
                t.save, latest, ckpt.complete_iterations(Path(t.save))
            )
        if isinstance(latest, int):
            ckpt.check_model_matches(t.save, self.job.model)
            state, data_state = ckpt.load_training_state(
                t.save, latest, self.chunks, self.optimizer, self.scheduler
            )
            self.iteration = int(state["iteration"])
            self.consumed_samples = int(state["consumed_samples"])
            self.skipped_iters = int(state["skipped_iters"])
            self.nan_iters = int(state["nan_iters"])
            self.result.resumed_from = latest
            self._resumed_dir = t.save
            self._resume_changes = state.get("changed_on_resume", [])
            self._saved_state = state
            return data_state
        source = t.save if latest == "release" else t.load
        if source:
            self.result.resumed_from = ckpt.load_weights(
                source, self.chunks, self.optimizer, self.job.model
            )
            self._resumed_dir = source
        return None

    def _position_loader(self, loader, data_state: dict | None) -> None:
        saved = getattr(self, "_saved_state", None)
        if saved is not None:
            self.notes += resume_data_stream(
                loader, data_state, saved, self.job.train.global_batch_size, self.dp,
                self.iteration, self.consumed_samples,
            )  # fmt: skip

    def _print_header(self) -> None:
        job, w = self.job, self.writer
        mine = sum(p.numel() for c in self.chunks for p in c.parameters())
        trained = sum(p.numel() for c in self.chunks for p in c.parameters() if p.requires_grad)
        par = job.parallel
        w.print(
            f"mm-megatron train: preset={job.preset} world={self.world} TP={par.tp} PP={par.pp} "
            f"CP={par.cp} DP={self.dp} SP={par.sequence_parallel} dtype={self.dtype} | "
            f"micro batch {job.train.micro_batch_size} x {self.num_microbatches} micro-batches "
            f"x DP {self.dp} = global batch {job.train.global_batch_size}"
        )
        m = job.model
        w.print(
            f"model: {mine:,} parameters on rank 0 ({trained:,} trained) | frozen: "
            f"vision={m.freeze_vision} projector={m.freeze_projector} lm={m.freeze_lm} | "
            f"data: {self.data.config.train_shards} (template {self.data.config.template})"
        )
        for note in self.data.notes:
            w.print(f"data: {note} (from the dataset's own description)")
        for note in self.notes:
            w.print(note)
        if self.result.resumed_from is not None:
            what = "resumed from" if self.iteration else "initial weights from"
            w.print(
                f"{what} {self._resumed_dir} iteration {self.result.resumed_from} "
                f"(step {self.iteration})"
            )
        if self._resume_changes:
            w.print(f"changed since the checkpoint: {', '.join(self._resume_changes)}")

    # --- steps ----------------------------------------------------------------------------------
    def _agree(self, values: list[float]) -> list[float]:
        """Sum `values` over all ranks (one small all-reduce per step)."""
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def _fetch(self):
        try:
            batches, stats = self.train_batches.next_step()
            return batches, stats, None
        except TooManyBadSamplesError as e:
            return None, None, f"rank {self.rank}: {e}"

    def _raise_data_error(self, message: str | None) -> None:
        messages = [message]
        if self.world > 1:
            messages = [None] * self.world
            dist.all_gather_object(messages, message)
        raise DataError("; ".join(m for m in messages if m))

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns its scalars."""
        t = self.job.train
        batches, stats, error = self._fetch()
        counters = self.train_batches.loader.counters
        flops = 0.0
        if stats is not None:
            flops = float(train_step_flops(self.job.model, stats.seq_lens, stats.num_tiles).total)
        sums = self._agree(
            [
                float(error is not None),
                float(self.signal_received),
                float(stats.tokens if stats else 0),
                flops,
                float(counters.samples_read),
                float(counters.samples_bad),
            ]
        )
        if sums[0]:
            self._raise_data_error(error)
        mp = self.world // self.dp  # ranks holding the same data
        self.data_totals = (sums[4] / mp, sums[5] / mp)
        # NOTE: only the agreed flag decides; a signal arriving after the all-reduce is acted
        # upon one step later on every rank (a rank acting alone would deadlock the save).
        self.stop_requested = sums[1] > 0
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        out = forward_backward(self.chunks, batches)
        loss = out["loss"]
        if math.isfinite(loss):
            applied, grad_norm = optimizer_step(self.optimizer, t.clip_grad)
        else:
            applied, grad_norm = False, float("nan")
            self.nan_iters += 1
        if applied:
            self.scheduler.step(increment=1)
            self._nan_in_a_row = 0
        else:
            self.skipped_iters += 1
            self._nan_in_a_row += 1
        self.iteration += 1
        self.consumed_samples += t.global_batch_size
        if self._nan_in_a_row >= t.max_nan_iters:
            raise NonFiniteLossError(
                f"{self._nan_in_a_row} steps in a row had a NaN/inf loss or gradient norm (last "
                f"at step {self.iteration}: loss {loss}, grad norm {grad_norm}); lower train.lr, "
                "check the data, or raise train.max_nan_iters"
            )
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": current_lr(self.optimizer),
            "tokens": sums[2] / mp,
            "flops": sums[3] / mp,
            "samples_read": sums[4] / mp,
            "samples_bad": sums[5] / mp,
        }

    def _log(self, interval: IntervalStats, step: dict[str, float], paused: float) -> None:
        t = self.job.train
        elapsed = max(time.perf_counter() - interval.start - paused, 1e-9)
        per_iter_ms = 1000.0 * elapsed / interval.steps
        rates = throughput(
            tokens=interval.tokens, flops=interval.flops, seconds=elapsed, world_size=self.world
        )
        tokens_per_gpu, tflops_per_gpu = rates.tokens_per_sec_per_gpu, rates.tflops_per_gpu
        values = {
            "lm_loss": interval.mean_loss,
            "grad_norm": step["grad_norm"],
            "learning_rate": step["lr"],
            "elapsed_ms_per_iter": per_iter_ms,
            "tokens_per_sec_per_gpu": tokens_per_gpu,
            "tflops_per_gpu": tflops_per_gpu,
            "consumed_samples": self.consumed_samples,
            "skipped_iterations": self.skipped_iters,
            "nan_iterations": self.nan_iters,
            "bad_samples": int(step["samples_bad"]),
            "samples_read": int(step["samples_read"]),
        }
        mem = memory_stats()
        self.writer.print(
            format_log_line(
                iteration=self.iteration,
                train_iters=t.train_iters,
                consumed_samples=self.consumed_samples,
                elapsed_ms=per_iter_ms,
                tokens_per_sec_per_gpu=tokens_per_gpu,
                tflops_per_gpu=tflops_per_gpu,
                lr=step["lr"],
                loss=interval.mean_loss,
                grad_norm=step["grad_norm"],
                skipped=self.skipped_iters,
                nan_iters=self.nan_iters,
                bad_samples=int(step["samples_bad"]),
                samples_read=int(step["samples_read"]),
            )
        )
        self.writer.print(memory_line(mem))
        recent = self.train_batches.loader.counters.recent_bad
        if step["samples_bad"] > self._bad_logged and recent:
            self.writer.print(f"[data] last bad sample on rank 0: {recent[-1]}")
        self._bad_logged = step["samples_bad"]
        self.writer.scalars(self.iteration, {"loss": step["loss"], **values, **mem})

    def evaluate(self) -> dict[str, float]:
        """Validation loss, caption accuracy, held-out captions (`evaluate.run_evaluation`)."""
        return run_evaluation(self)

    def save(self) -> None:
        """Checkpoint the current state (no-op without `train.save`); collective."""
        if self.checkpointer is None or self.checkpointer.last_saved == self.iteration:
            return
        layout = ckpt.layout_info()
        train_state = {
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "skipped_iters": self.skipped_iters,
            "nan_iters": self.nan_iters,
            "scheduler": self.scheduler.state_dict(),
            "layout": layout,
            "job": job_record(self.job, self.data.config),
            "data_streams": stream_states(self.train_batches.loader, self.dp_rank, self.dp),
        }
        saved = self.checkpointer.save(
            self.iteration,
            self.chunks,
            self.optimizer,
            self.train_batches.loader.state_dict(),
            train_state,
        )
        if not saved:
            self.writer.print(
                f"[checkpoint] NOT saved iteration {self.iteration}: the weights or optimizer "
                "state are not finite; the previous checkpoint stays the latest"
            )
            return
        self.writer.print(
            f"[checkpoint] saved iteration {self.iteration} to {self.job.train.save}"
            + (" (async)" if self.job.train.async_save else "")
        )

    def run(self) -> TrainResult:
        """Steps until `train_iters` (or a signal); collective."""
        t = self.job.train
        interval, paused = IntervalStats(), 0.0
        if self.iteration >= t.train_iters:
            self.writer.print(
                f"[run] already at iteration {self.iteration} of train_iters={t.train_iters}: "
                "nothing to train (raise --train-iters to continue, or --run-dir NEW for a new run)"
            )
            self._print_summary()
            self.result.iteration = self.iteration
            return self.result
        while self.iteration < t.train_iters:
            self.heartbeat.beat(self.iteration + 1)
            step = self.train_step()
            self.result.losses[self.iteration] = step["loss"]
            interval.add(step["tokens"], step["flops"], step["loss"])
            if self.iteration % t.log_interval == 0 or self.iteration == t.train_iters:
                self._log(interval, step, paused)
                interval, paused = IntervalStats(), 0.0
            start = time.perf_counter()
            if t.eval_interval and self.iteration % t.eval_interval == 0:
                self.evaluate()
            if self.stop_requested:
                self.writer.print(f"[signal] stopping after iteration {self.iteration}")
                self.save()
                self.result.exit_reason = "signal"
                break
            if t.save_interval and self.iteration % t.save_interval == 0:
                self.save()
            if self.checkpointer is not None:
                self.checkpointer.finalize(blocking=False)
            paused += time.perf_counter() - start
        else:
            if t.eval_iters > 0 and self.iteration not in self.result.evals:
                self.evaluate()
            self.save()
            self._check_bad_fraction_at_end()
            self._print_summary()
        self.result.iteration = self.iteration
        self.result.skipped_iters = self.skipped_iters
        return self.result

    def _print_summary(self) -> None:
        image, prompt = None, None
        if self.rank == 0 and self.checkpointer is not None:
            image, prompt = write_sample_image(self.job.run_dir, self.data.config.val_shards)
        losses = self.result.losses
        for line in summary_lines(
            job=self.job,
            parameters=sum(p.numel() for c in self.chunks for p in c.parameters()),
            trained=sum(p.numel() for c in self.chunks for p in c.parameters() if p.requires_grad),
            iteration=self.iteration,
            steps_this_run=self.iteration - self.first_step,
            consumed_samples=self.consumed_samples,
            last_loss=losses[max(losses)] if losses else None,
            evals=self.result.evals,
            template=self.data.config.template,
            train_data=str(self.data.config.train_shards),
            checkpoint_iteration=self.checkpointer.last_saved if self.checkpointer else None,
            sample_image=image,
            sample_prompt=prompt,
        ):
            self.writer.print(line)

    def _check_bad_fraction_at_end(self) -> None:
        """`data.max_bad_fraction` holds for the whole run, however few samples it read."""
        read, bad = self.data_totals
        limit = self.job.data.max_bad_fraction
        if read and bad / read > limit:
            raise DataError(
                f"{int(bad)} of {int(read)} samples read in this run were bad "
                f"({bad / read:.1%} > data.max_bad_fraction={limit:.1%}); checked at the end "
                f"because the run read fewer than data.min_samples_for_bad_check="
                f"{self.job.data.min_samples_for_bad_check}; see the [data] lines above"
            )

    def close(self) -> None:
        """Wait for saves, close logs, restore signal handlers, tear down process groups."""
        try:
            if self.checkpointer is not None:
                self.checkpointer.close()
        finally:
            if self.writer is not None:
                self.writer.close()
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)
            distributed.destroy()


def _path_or_none(value: str | None) -> Path | None:
    return Path(value) if value else None


def train(job: JobConfig) -> TrainResult:
    """Run `job` on this rank (collective over all ranks); see the module docstring."""
    trainer = Trainer(job)
    try:
        trainer.setup()
        with trainer.heartbeat.watch():  # a dead or stuck peer: one line naming it, exit 1
            return trainer.run()
    finally:
        trainer.close()
