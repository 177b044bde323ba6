"""The trainer's side of the data pipeline: which data, which loaders, one step's micro-batches.

What this file does:
- `resolve_data(job)`: with no training shards configured, generate the embedded synthetic
  shapes dataset and its tiny tokenizer into `<run_dir>/synthetic-data` (once; rank 0 writes it
  to a temporary directory and renames it, the others wait) and point the data config at it.
  Nothing is downloaded.
- `check_tokenizer(model, info)`: the tokenizer's image-token id and vocabulary must fit the
  model; the error says which flag fixes it.
- `StepBatches`: pulls the micro-batches of one optimizer step from a rank's loader, drops
  `sample_keys`, optionally blanks the images (the ablation), and collects the step's real
  (unpadded, image-expanded) sequence lengths, which the batches carry (`expanded_lens`), and
  image-token counts for throughput and FLOPs.

Every rank of a data-parallel replica (its TP/PP/CP ranks) builds the same loader (same DP
rank and seed), so they all see the same micro-batches without a broadcast; DP ranks read
disjoint shares of every global batch, so step k consumes global samples [k*G, (k+1)*G) at any
DP size. `stream_states` gathers every DP rank's stream position into the checkpoint and
`resume_data_stream` continues from them at another DP size or global batch.

What it does not do: decode, tokenize or pack (`mm_megatron.data`), or talk to other ranks
except for the barrier around the synthetic-data generation and the gather of the stream states.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.data import DataConfig, TokenizerInfo, build_dataloader
from mm_megatron.data.dataset_info import apply_dataset_info, read_dataset_info
from mm_megatron.data.loader import DataCounters
from mm_megatron.data.reader import stream_resume_point
from mm_megatron.model.image_tokens import ImageTokenCounter
from mm_megatron.runtime.distributed import barrier, rank
from mm_megatron.train.config import JobConfig

SYNTHETIC_DIRNAME = "synthetic-data"
"""Sub-directory of the run dir holding the generated dataset."""

SYNTHETIC_VAL_SAMPLES = 200
"""Held-out samples of the generated dataset."""


@dataclass
class ResolvedData:
    """The data a run actually uses."""

    config: DataConfig
    """The data config with shards and tokenizer filled in."""
    synthetic_dir: Path | None = None
    """The generated synthetic dataset, if that is what the run uses."""
    labels: dict[str, list[str]] = field(default_factory=dict)
    """Label vocabularies of the synthetic dataset (colours, shapes, positions)."""
    notes: list[str] = field(default_factory=list)
    """Values taken from the dataset's own `dataset_info.json` (for the run's header)."""


def ensure_synthetic_dataset(out_dir: Path, model: LlavaConfig, n_train: int, seed: int) -> dict:
    """Generate the synthetic dataset into `out_dir` unless it is there already; collective.

    Args:
        out_dir: Target directory (complete when it holds `dataset_info.json`).
        model: The model: images are drawn at its encoder size, the tokenizer fits its vocab.
        n_train: Training samples.
        seed: Dataset seed.

    Returns:
        The dataset's `dataset_info.json` content.
    """
    from mm_megatron.data.synthetic import write_synthetic_dataset

    info_path = out_dir / "dataset_info.json"
    if rank() == 0 and not info_path.is_file():
        print(
            f"[data] generating the synthetic dataset ({n_train} train + "
            f"{SYNTHETIC_VAL_SAMPLES} held-out samples, once) into {out_dir}",
            flush=True,
        )
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_synthetic_dataset(
            str(tmp),
            n_train=n_train,
            n_val=SYNTHETIC_VAL_SAMPLES,
            image_size=model.vision.input_image_size,
            shard_size=500,
            seed=seed,
            vocab_size=min(1024, model.lm.vocab_size),
            show_progress=True,
        )
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    barrier()
    return json.loads(info_path.read_text(encoding="utf-8"))


def resolve_data(job: JobConfig) -> ResolvedData:
    """The job's data, generating the synthetic dataset when none is configured; collective.

    Either way the data directory's `dataset_info.json` fills what the config leaves unset
    (template, validation split, tokenizer; `mm_megatron.data.dataset_info`), so `--data-path`
    on a generated dataset trains exactly like the embedded default.
    """
    data = job.data
    synthetic_dir = None
    if not data.train_shards:
        synthetic_dir = job.run_dir / SYNTHETIC_DIRNAME
        info = ensure_synthetic_dataset(
            synthetic_dir, job.model, job.train.synthetic_samples, seed=0
        )
        if info["splits"]["train"]["num_samples"] < job.train.synthetic_samples:
            raise ValueError(
                f"{synthetic_dir} holds fewer samples than train.synthetic_samples; delete it "
                "to regenerate"
            )
        data = replace(data, train_shards=str(synthetic_dir / "train.index.json"))
    directory, info = read_dataset_info(data.train_shards)
    config, notes = apply_dataset_info(data, directory, info)
    beside = Path(data.train_shards)
    beside = beside if beside.is_dir() else beside.parent
    if config.tokenizer_path is None and (beside / "tokenizer").is_dir():
        config = replace(config, tokenizer_path=str(beside / "tokenizer"))  # carried by the data
    labels = info.get("labels") or {}
    return ResolvedData(config=config, synthetic_dir=synthetic_dir, labels=labels, notes=notes)


def check_tokenizer(model: LlavaConfig, info: TokenizerInfo) -> None:
    """Raise ValueError unless the tokenizer's ids fit the model."""
    if info.image_token_id != model.image_token_id:
        raise ValueError(
            f"the tokenizer's {info.image_token!r} id is {info.image_token_id} but "
            f"model.image_token_id={model.image_token_id}; set --model.image_token_id="
            f"{info.image_token_id} (or use the model's tokenizer)"
        )
    if info.vocab_size > model.lm.vocab_size:
        raise ValueError(
            f"the tokenizer has {info.vocab_size} tokens but lm.vocab_size="
            f"{model.lm.vocab_size}; the embedding table is too small"
        )


def build_loader(
    data: DataConfig,
    tokenizer: TokenizerInfo,
    job: JobConfig,
    *,
    dp_rank: int,
    dp_size: int,
    split: str = "train",
) -> Any:
    """One DP rank's loader (train: endless; val: endless too, restarted for every eval).

    Training splits the global sample stream by global batch (rank r reads the r-th share of
    every global batch), so the samples of step k do not depend on the DP size.
    """
    is_train = split == "train"
    return build_dataloader(
        data,
        tokenizer,
        dp_rank=dp_rank,
        dp_size=dp_size,
        micro_batch_size=job.train.micro_batch_size,
        image_tokens=ImageTokenCounter.from_config(job.model),
        seed=job.train.seed,
        tiling=job.model.tiling,
        split=split,
        num_epochs=None if is_train else 1_000_000,
        block=job.train.global_batch_size // dp_size if is_train else None,
    )


def stream_states(loader: Any, dp_rank: int, dp_size: int) -> list[dict] | None:
    """Every DP rank's loader state, by DP rank, for the checkpoint; collective.

    A resume at another DP size or global batch continues the global stream from these
    (`reader.stream_resume_point`). None for a backend that keeps its own state (energon).
    """
    if not getattr(loader, "global_stream", False):
        return None
    mine = (dp_rank, loader.state_dict())
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [mine[1]]
    everyone: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    by_rank = dict(everyone)  # the TP/PP/CP ranks of a replica hold the same state
    return [by_rank[r] for r in range(dp_size)]


def resume_data_stream(
    loader: Any,
    data_state: dict | None,
    saved: dict,
    global_batch: int,
    dp: int,
    iteration: int,
    consumed_samples: int,
) -> list[str]:
    """Put a resumed run's loader where the stream continues; returns announcements.

    At the same DP size and global batch the saved position is exact (bad samples included).
    When either changed, the loader continues the global sample stream where the old ranks
    left it (`reader.stream_resume_point`: no sample lost or read twice, packing and bad
    samples included; the bad-sample counters carry over), and the change is announced.
    A checkpoint without the ranks' states (older ones) continues at `consumed_samples`.

    Args:
        loader: The rank's training loader.
        data_state: This rank's saved loader state (None when the DP size changed).
        saved: The checkpoint's training state (layout, job, data_streams).
        global_batch: This run's global batch size.
        dp: This run's data-parallel size.
        iteration: The step resumed at.
        consumed_samples: Global samples consumed before it.
    """
    notes = []
    old_g = (saved.get("job") or {}).get("train", {}).get("global_batch_size")
    old_dp = saved["layout"]["dp"]
    if data_state is not None and old_g in (None, global_batch):
        loader.load_state_dict(data_state)
        return notes
    if not getattr(loader, "global_stream", False):
        raise ValueError(
            "this data backend (energon) resumes only at the DP size and global batch size it "
            f"was saved with (DP {old_dp}, global batch {old_g})"
        )
    streams = saved.get("data_streams")
    start, exclude, counters = consumed_samples, (), None
    if streams and old_g:
        order = loader.dataset.order
        start, exclude = stream_resume_point(order, streams, old_dp, old_g // old_dp)
        if order.dp_rank == 0:  # the totals live on one rank; the trainer sums over ranks
            counters = DataCounters.merged([s["counters"] for s in streams])
    loader.continue_global_stream(start, exclude, counters)
    where = f"global sample {start}" + (
        f" ({len(exclude)} samples past it that a rank had read are left out)" if exclude else ""
    )
    if old_g is not None and old_g != global_batch:
        first = (
            f"consumes global samples [{start}, {start + global_batch})"
            if not exclude
            else f"starts at {where}"
        )
        notes.append(
            f"[resume] global batch size changed from {old_g} to {global_batch}: step "
            f"{iteration + 1} {first}"
        )
    if old_dp != dp:
        notes.append(
            f"[resume] data-parallel size changed from {old_dp} to {dp}: the data stream "
            f"continues at {where}; each rank reads its share of every global batch"
            + ("" if streams else "; bad-sample counters start afresh")
        )
    return notes


@dataclass
class StepStats:
    """What one rank fed the model in one step."""

    seq_lens: list[int]
    """Real expanded length of every (sub-)sequence."""
    num_images: int
    """Images."""
    samples: int
    """Samples (packed sub-sequences count one each)."""
    image_tokens: list[int] = field(default_factory=list)
    """Embeddings of every image."""
    num_tiles: int = 0
    """Encoder tiles (one ViT pass each; equals ``num_images`` without a tiling scheme)."""

    @property
    def tokens(self) -> int:
        """Real tokens."""
        return sum(self.seq_lens)


class StepBatches:
    """Draws the micro-batches of one optimizer step from a loader.

    Args:
        loader: A `MultimodalDataLoader` (kept; its `state_dict()` is the resume position).
        num_microbatches: Micro-batches per step on this rank.
        blank_images: Replace every image by zeros (ablation).
    """

    def __init__(self, loader, num_microbatches: int, blank_images: bool):
        self.loader = loader
        self.num_microbatches = num_microbatches
        self.blank_images = blank_images
        self._iter = None

    def next_step(self) -> tuple[list[dict], StepStats]:
        """The next step's micro-batches (model inputs only) and their statistics."""
        if self._iter is None:
            self._iter = iter(self.loader)
        batches, lens, tokens, samples, tiles = [], [], [], 0, 0
        for _ in range(self.num_microbatches):
            batch = next(self._iter)
            samples += len(batch.pop("sample_keys"))
            lens += batch.pop("expanded_lens").tolist()
            tokens += batch["image_tokens"].tolist()
            tiles += int(batch["num_tiles"].sum())
            if self.blank_images:
                batch["images"] = torch.zeros_like(batch["images"])
            batches.append(batch)
        stats = StepStats(
            seq_lens=lens,
            num_images=len(tokens),
            image_tokens=tokens,
            samples=samples,
            num_tiles=tiles,
        )
        return batches, stats
