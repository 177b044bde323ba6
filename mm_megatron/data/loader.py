"""The per-rank multimodal data loader: ordered, counted, batched, packed and resumable.

What this file does: `build_dataloader` wires config, tokenizer, shards, sample order and sample
processing into a `MultimodalDataLoader`. Iterating it runs a torch DataLoader over the
`ExampleDataset` (workers decode and send back chunks of consecutive samples), puts the items back
in stream order, counts and logs bad samples (raising `TooManyBadSamplesError` past the configured
fraction), groups good samples into micro batches (one per row, or greedy-knapsack packed) and
collates them into the contract of `batch.py`.

Resuming: `state_dict()` after a batch holds `sample_position`, the first stream position not yet
in a returned batch. A loader built with `start_sample=sample_position` (or given the state with
`load_state_dict`) yields exactly the batches an uninterrupted loader yields next. Each batch is a
contiguous run of the stream (packing refuses a sample instead of skipping ahead), which is what
makes one integer enough. Positions count bad samples too.

What it does not do: move batches to a device, broadcast them across tensor/pipeline ranks, or
read torch.distributed (the caller passes dp_rank/dp_size).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mm_megatron.config.model_config import TilingConfig
from mm_megatron.data.batch import ImageGeometry
from mm_megatron.data.collate import collate_rows
from mm_megatron.data.config import DataConfig
from mm_megatron.data.packing import KnapsackBatcher
from mm_megatron.data.reader import ExampleDataset, SampleOrder
from mm_megatron.data.samples import BadSample, Example, SampleProcessor
from mm_megatron.data.shards import resolve_shards
from mm_megatron.data.tokenizer import TokenizerInfo, prepare_tokenizer
from mm_megatron.runtime.children import loader_worker_init

logger = logging.getLogger(__name__)

LOG_FIRST_BAD = 50
"""Bad samples logged at WARNING level; later ones go to DEBUG."""

RECENT_BAD = 20
"""How many recent bad samples `DataCounters.recent_bad` keeps."""


class TooManyBadSamplesError(RuntimeError):
    """More than `max_bad_fraction` of the samples read were bad."""


@dataclass
class DataCounters:
    """What the loader has read so far on this rank (restored with the loader state)."""

    samples_read: int = 0
    """Samples taken from the stream, bad ones included."""

    samples_bad: int = 0
    """Samples skipped as bad."""

    bad_by_reason: dict[str, int] = field(default_factory=dict)
    """Bad samples per reason (see `samples.BAD_REASONS`)."""

    recent_bad: list[str] = field(default_factory=list)
    """The last few bad samples as `reason shard key: detail`."""

    @property
    def bad_fraction(self) -> float:
        """samples_bad / samples_read (0 before anything was read)."""
        return self.samples_bad / self.samples_read if self.samples_read else 0.0

    @classmethod
    def merged(cls, states: list[dict[str, Any]]) -> DataCounters:
        """The sum of several ranks' counters (`asdict` forms), e.g. at a change of DP size."""
        total = cls()
        for state in states:
            c = cls(**state)
            total.samples_read += c.samples_read
            total.samples_bad += c.samples_bad
            for reason, n in c.bad_by_reason.items():
                total.bad_by_reason[reason] = total.bad_by_reason.get(reason, 0) + n
            total.recent_bad = (total.recent_bad + c.recent_bad)[-RECENT_BAD:]
        return total


def _keep(item: Any) -> Any:
    """DataLoader collate_fn that passes items through (module level so it pickles)."""
    return item


class MultimodalDataLoader:
    """Iterable of collated batches for one data-parallel rank (see the module docstring)."""

    global_stream = True
    """Positions map into the global sample stream (`continue_global_stream` works), so a
    resume at another DP size or global batch can continue it."""

    def __init__(
        self,
        dataset: ExampleDataset,
        tokenizer_info: TokenizerInfo,
        *,
        micro_batch_size: int,
        packing: bool,
        max_seq_len: int,
        pad_to: int | None = None,
        pad_to_multiple_of: int = 1,
        num_workers: int = 2,
        prefetch_per_worker: int = 8,
        max_bad_fraction: float = 0.01,
        min_samples_for_bad_check: int = 200,
        start_sample: int = 0,
        drop_last: bool = False,
    ):
        """Args:
        dataset: The rank's example stream.
        tokenizer_info: Tokenizer and its ids (pad, image token).
        micro_batch_size: Rows per batch.
        packing: Pack several samples per row up to `max_seq_len` expanded tokens.
        max_seq_len: Row capacity for packing, in expanded tokens.
        pad_to: Fixed text length of the batch, or None for the longest row.
        pad_to_multiple_of: Round the text length up to a multiple of this.
        num_workers: DataLoader worker processes (0: work in this process).
        prefetch_per_worker: Samples each worker prepares ahead.
        max_bad_fraction: Raise when the bad fraction exceeds this.
        min_samples_for_bad_check: Samples read before the fraction is checked.
        start_sample: Stream position to start at (from `state_dict()["sample_position"]`).
        drop_last: Drop a final incomplete batch of a finite stream.
        """
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
        self.dataset = dataset
        self.tokenizer_info = tokenizer_info
        self.micro_batch_size = micro_batch_size
        self.packing = packing
        self.max_seq_len = max_seq_len
        self.pad_to = pad_to
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_workers = num_workers
        self.prefetch_per_worker = prefetch_per_worker
        self.max_bad_fraction = max_bad_fraction
        self.min_samples_for_bad_check = min_samples_for_bad_check
        self.drop_last = drop_last
        self.counters = DataCounters()
        """Read/bad counts; see `DataCounters`."""
        self._position = start_sample

    @property
    def image_token_id(self) -> int:
        """Id of the one-token image placeholder in input_ids."""
        return self.tokenizer_info.image_token_id

    @property
    def samples_per_epoch(self) -> int:
        """Samples (good and bad) this rank reads per epoch."""
        return self.dataset.order.samples_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """Where to resume: the first position not in a returned batch, the global offset its
        positions count from, plus the counters."""
        return {
            "sample_position": self._position,
            "global_offset": self.dataset.order.offset,
            "exclude": list(self.dataset.order.exclude),
            "counters": asdict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a `state_dict()`; takes effect at the next `iter()`."""
        self._position = int(state["sample_position"])
        if "global_offset" in state:
            self.dataset.order.offset = int(state["global_offset"])
            self.dataset.order.exclude = tuple(state.get("exclude", ()))
        if "counters" in state:
            self.counters = DataCounters(**state["counters"])

    def continue_global_stream(
        self, start: int, exclude: tuple[int, ...] = (), counters: DataCounters | None = None
    ) -> None:
        """Continue the global stream at global sample `start`, leaving out `exclude` (a resume
        at another DP size or global batch; `stream_resume_point` computes both): this rank's
        positions restart at 0 from there, with `counters` (default: fresh)."""
        self.dataset.order.offset = int(start)
        self.dataset.order.exclude = tuple(sorted(exclude))
        self._position = 0
        self.counters = counters if counters is not None else DataCounters()

    def _items(self, start: int) -> Iterator[Example | BadSample]:
        """Stream items from `start` on, in position order."""
        dataset = copy.copy(self.dataset)
        dataset.start = start
        if self.num_workers == 0:
            yield from dataset.iter_positions(start)
            return
        # NOTE: must be set before the workers fork; the tokenizers library otherwise warns (and
        # may deadlock) when a process that already used its thread pool forks.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            collate_fn=_keep,
            num_workers=self.num_workers,
            worker_init_fn=loader_worker_init,  # workers outlive no rank, ignore stop signals
            prefetch_factor=max(1, -(-self.prefetch_per_worker // dataset.chunk)),
        )
        pending: dict[int, list[Example | BadSample]] = {}
        expected = start
        for chunk in loader:
            pending[chunk[0].position] = chunk
            while expected in pending:  # workers can finish out of turn at the end
                chunk = pending.pop(expected)
                yield from chunk
                expected += len(chunk)

    def _stream_end(self) -> int | None:
        """One past the last stream position, or None for an endless stream."""
        return self.dataset.order.end

    def _count(self, item: Example | BadSample) -> None:
        counters = self.counters
        counters.samples_read += 1
        if isinstance(item, BadSample):
            counters.samples_bad += 1
            counters.bad_by_reason[item.reason] = counters.bad_by_reason.get(item.reason, 0) + 1
            line = f"{item.reason} {item.shard} {item.key}: {item.detail}"
            counters.recent_bad = [*counters.recent_bad, line][-RECENT_BAD:]
            level = logging.WARNING if counters.samples_bad <= LOG_FIRST_BAD else logging.DEBUG
            logger.log(
                level,
                "skipping bad sample (%s) shard=%s key=%s: %s",
                item.reason,
                item.shard,
                item.key,
                item.detail,
            )
            if counters.samples_bad == LOG_FIRST_BAD:
                logger.warning("%d bad samples; further ones are logged at DEBUG", LOG_FIRST_BAD)
        if (
            counters.samples_read >= self.min_samples_for_bad_check
            and counters.bad_fraction > self.max_bad_fraction
        ):
            raise TooManyBadSamplesError(
                f"{counters.samples_bad} of {counters.samples_read} samples were bad "
                f"({counters.bad_fraction:.1%} > max_bad_fraction={self.max_bad_fraction:.1%}); "
                f"by reason: {counters.bad_by_reason}; recent: {counters.recent_bad[-5:]}"
            )

    def _collate(self, rows: list[list[Example]]) -> dict:
        return collate_rows(
            rows,
            pad_token_id=self.tokenizer_info.pad_token_id,
            image_transform=self.dataset.processor.image_transform,
            packed=self.packing,
            pad_to=self.pad_to,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )

    def __iter__(self) -> Iterator[dict]:
        examples: list[Example] = []
        batcher = KnapsackBatcher(self.max_seq_len, self.micro_batch_size) if self.packing else None
        for item in self._items(self._position):
            if isinstance(item, BadSample):
                self._count(item)
                continue
            if batcher is None:
                self._count(item)
                examples.append(item)
                if len(examples) == self.micro_batch_size:
                    self._position = item.position + 1
                    rows = [[ex] for ex in examples]
                    examples = []
                    yield self._collate(rows)
                continue
            if not batcher.try_add(item.expanded_len):
                # The batch is full; `item` opens the next one, so resuming starts at it (and
                # counts it then, so the restored counters match an uninterrupted run).
                self._position = item.position
                rows = [[examples[i] for i in row] for row in batcher.rows()]
                batcher.reset()
                examples = []
                yield self._collate(rows)
                batcher.try_add(item.expanded_len)
            self._count(item)
            examples.append(item)
        end = self._stream_end()
        if end is not None:
            self._position = end
        if examples and not self.drop_last:
            if batcher is None:
                yield self._collate([[ex] for ex in examples])
            else:
                yield self._collate([[examples[i] for i in row] for row in batcher.rows()])


def build_dataloader(
    data_config: DataConfig,
    tokenizer: Any = None,
    *,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
    image_tokens: Callable[[ImageGeometry], int],
    seed: int,
    tiling: TilingConfig | None = None,
    start_sample: int = 0,
    split: str = "train",
    num_epochs: int | None = None,
    block: int | None = None,
) -> MultimodalDataLoader:
    """Build the loader of one data-parallel rank.

    Args:
        data_config: Shards, template, image and packing settings.
        tokenizer: A `TokenizerInfo`, a HF tokenizer, a local path, or None to load
            `data_config.tokenizer_path`. A HF tokenizer lacking `<image>` gets it added in place.
        dp_rank: This rank's index in the data-parallel group.
        dp_size: Size of the data-parallel group.
        micro_batch_size: Rows per batch.
        image_tokens: The model's image-token count for an image of a given geometry
            (`mm_megatron.model.image_tokens.ImageTokenCounter`); sizes samples and packing.
        tiling: The model's tiling scheme (`tiling.py`; None: one square tile per image).
        seed: Shuffle seed; all ranks pass the same one.
        start_sample: Stream position to resume at (`state_dict()["sample_position"]`).
        split: `train` (endless, shuffled if configured) or `val` (one pass, file order).
        num_epochs: Override the stream length in epochs (None: endless for train, 1 for val).
        block: Samples this rank takes from each global batch (global batch / DP): the global
            sample stream is then the same at every DP size (`reader.SampleOrder`). None: each
            rank reads a contiguous slice of every epoch.

    An energon dataset or metadataset as the split's shards selects the energon backend
    (`energon.py`; its train split is endless, its val split one pass unless `num_epochs` > 1
    asks for an endless one).
    """
    data_config.validate()
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}; choose train or val")
    from mm_megatron.data import energon

    if energon.is_energon_dataset(getattr(data_config, f"{split}_shards")):
        if start_sample:
            raise ValueError("an energon dataset resumes from its state_dict(), not start_sample")
        return energon.build_energon_loader(
            data_config,
            tokenizer,
            dp_rank=dp_rank,
            dp_size=dp_size,
            micro_batch_size=micro_batch_size,
            image_tokens=image_tokens,
            seed=seed,
            tiling=tiling,
            split=split,
            repeat_val=num_epochs is not None and num_epochs > 1,
        )
    if not isinstance(tokenizer, TokenizerInfo):
        source = data_config.tokenizer_path if tokenizer is None else tokenizer
        if source is None:
            raise ValueError("no tokenizer given and data.tokenizer_path is not set")
        tokenizer = prepare_tokenizer(source, data_config.image_token)
    spec = data_config.train_shards if split == "train" else data_config.val_shards
    if not spec:
        raise ValueError(f"data.{split}_shards is not set")
    is_train = split == "train"
    order = SampleOrder(
        resolve_shards(spec, split),
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=seed,
        shuffle=data_config.shuffle and is_train,
        num_epochs=num_epochs if num_epochs is not None else (None if is_train else 1),
        block=block,
    )
    processor = SampleProcessor.from_config(data_config, tokenizer, image_tokens, tiling)
    return MultimodalDataLoader(
        ExampleDataset(order, processor),
        tokenizer,
        micro_batch_size=micro_batch_size,
        packing=data_config.packing,
        max_seq_len=data_config.max_seq_len,
        pad_to=data_config.pad_to,
        pad_to_multiple_of=data_config.pad_to_multiple_of,
        num_workers=data_config.num_workers,
        prefetch_per_worker=data_config.prefetch_per_worker,
        max_bad_fraction=data_config.max_bad_fraction,
        min_samples_for_bad_check=data_config.min_samples_for_bad_check,
        start_sample=start_sample,
    )
