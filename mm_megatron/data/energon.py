"""Second data backend: Megatron-Energon datasets through energon's own loader.

What this file does:
- `is_energon_dataset(spec)`: a directory prepared by `energon prepare` (it holds `.nv-meta/`) or
  an energon metadataset YAML (weighted blends of such directories).
- `write_energon_metadata(out_dir)`: index the webdataset shards of a directory with energon's
  own `BaseWebdatasetFactory.prepare_dataset` and write `.nv-meta/dataset.yaml` declaring a
  `CrudeWebdataset`; every `<prefix>.index.json` in the directory becomes energon split
  `<prefix>`. `mm-megatron data convert` calls it, so its shards load through both backends.
  Indexing runs in the calling process (`InProcessAggregatorPool`): energon's own pool forks
  worker processes from this one, and a forked child that crashes (seen: a segfault in a
  library's garbage collection after fork) leaves the parent waiting on its queue forever.
- `build_energon_loader(...)`: an `EnergonDataLoader`, a `MultimodalDataLoader` whose items come
  from energon's `SavableDataLoader` (energon shards the data over data-parallel ranks and
  workers, shuffles and blends datasets by weight); each crude sample is cooked by the same
  `SampleProcessor` as the webdataset backend, and batches are packed and collated by the same
  code, so both backends produce batches of the contract in `batch.py`.

Resuming: `state_dict()` holds energon's own rank state (`save_state_rank`) plus the sample
(at most one) read from energon but not yet in a returned batch (the packing overflow), plus the
counters; `load_state_dict` restores them, and the loader then yields exactly the batches an
uninterrupted one would. The stream is deterministic for a given seed, DP rank/size and worker
count (energon's own guarantee).

What it does not do: read torch.distributed (DP rank and size are arguments), or choose between
the backends (`mm_megatron.train.data_setup` does, from the shard spec).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mm_megatron.config.model_config import TilingConfig
from mm_megatron.data.batch import ImageGeometry
from mm_megatron.data.config import DataConfig
from mm_megatron.data.loader import DataCounters, MultimodalDataLoader
from mm_megatron.data.samples import BadSample, Example, SampleProcessor
from mm_megatron.data.tokenizer import TokenizerInfo, prepare_tokenizer

NV_META = ".nv-meta"
"""Folder energon keeps its index and dataset description in."""

SHUFFLE_BUFFER = 100
"""Samples in energon's training shuffle buffer."""

MAX_SAMPLES_PER_SEQUENCE = 100
"""Consecutive samples energon reads from one shard slice before switching (training)."""


def is_energon_dataset(spec: str | None) -> bool:
    """True for an energon-prepared directory (`.nv-meta/`) or an energon metadataset YAML."""
    if not spec:
        return False
    path = Path(spec)
    if path.is_dir():
        return (path / NV_META / "dataset.yaml").is_file()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return "megatron.energon" in path.read_text(encoding="utf-8", errors="replace")
    return False


def _in_process_pool_class() -> type:
    """energon's `AggregatorPool` with its tasks run here, one after another, and no processes.

    The aggregator sees exactly the calls energon's pool makes (`on_start`, `on_item` with
    batches of at most `batch_size` items, `on_finish`, `get_final_result_data`); only the
    forked workers and their queues are gone, so a failing shard raises here, naming itself,
    instead of killing a child the parent then waits for.
    """
    from megatron.energon.flavors.webdataset.aggregator_pool import AggregatorPool

    class InProcessAggregatorPool(AggregatorPool):
        def __init__(self, num_workers, user_produce_data, aggregator, *, batch_size=1):
            if batch_size <= 0:
                raise ValueError(f"batch_size must be positive, got {batch_size}")
            self.num_workers = num_workers
            self.user_produce_data = user_produce_data
            self.aggregator = aggregator
            self.batch_size = batch_size
            self.tasks: list[Any] = []

        def submit_task(self, task: Any) -> None:
            self.tasks.append(task)

        def process(self) -> Any:
            self.aggregator.on_start(self)
            for task in self.tasks:
                batch: list[Any] = []
                for item in self.user_produce_data(task):
                    batch.append(item)
                    if len(batch) >= self.batch_size:
                        self.aggregator.on_item(batch, self)
                        batch = []
                if batch:
                    self.aggregator.on_item(batch, self)
            self.aggregator.on_finish(self)
            return self.aggregator.get_final_result_data()

    return InProcessAggregatorPool


def write_energon_metadata(out_dir: str) -> list[str]:
    """Make the webdataset shards of `out_dir` an energon dataset; returns the splits written.

    Each `<prefix>.index.json` (written by `ShardWriter`) becomes energon split `<prefix>`
    holding the `<prefix>-NNNNNN.tar` shards; energon indexes them (`.nv-meta/index.sqlite`,
    `.info.json`, `split.yaml`) and `dataset.yaml` declares a `CrudeWebdataset`, cooked by
    `EnergonTaskEncoder`.

    Args:
        out_dir: Directory holding the shards and their index files.
    """
    from unittest import mock

    import yaml
    from megatron.energon import BaseWebdatasetFactory, CrudeWebdataset
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset import prepare

    root = Path(out_dir)
    prefixes = sorted(p.name[: -len(".index.json")] for p in root.glob("*.index.json"))
    tars = sorted(str(p.relative_to(root)) for p in root.glob("*.tar"))
    tars = [t for t in tars if any(t.startswith(f"{prefix}-") for prefix in prefixes)]
    if not tars:
        raise ValueError(f"{out_dir}: no <prefix>-NNNNNN.tar shards with a <prefix>.index.json")
    # NOTE: energon brace-expands these regexes, which drops backslashes: write [.] and [0-9]
    patterns = [(prefix, f"^{prefix}-[0-9]+[.]tar$") for prefix in prefixes]
    with mock.patch.object(prepare, "AggregatorPool", _in_process_pool_class()):
        list(  # consume the generator: it does the indexing
            BaseWebdatasetFactory.prepare_dataset(
                EPath(root), tars, split_parts_patterns=patterns, workers=1
            )
        )
    dataset_yaml = {"__module__": "megatron.energon", "__class__": CrudeWebdataset.__name__}
    (root / NV_META / "dataset.yaml").write_text(yaml.safe_dump(dataset_yaml), encoding="utf-8")
    return prefixes


class EnergonDataLoader(MultimodalDataLoader):
    """A `MultimodalDataLoader` fed by energon (see the module docstring)."""

    global_stream = False
    """Energon shards and keeps its own per-rank state: it resumes only at the saved layout."""

    def __init__(
        self,
        make_energon: Callable[[], Any],
        processor: SampleProcessor,
        repeat: bool = False,
        **kw: Any,
    ):
        """Args:
        make_energon: Builds a fresh energon `SavableDataLoader` of this rank's stream.
        processor: The sample processor (its image transform normalises the batch images).
        repeat: When energon's stream ends (the val split), start it again.
        **kw: `MultimodalDataLoader` options (batching, packing, bad-sample threshold).
        """
        super().__init__(None, processor.tokenizer_info, **kw)
        self.processor = processor
        self._make_energon = make_energon
        self._energon: Any = None
        self._restore: Any = None
        self._pending: list[Example] = []
        self._last: Example | BadSample | None = None
        self.repeat = repeat

    @property
    def samples_per_epoch(self) -> int:
        """Samples of this rank's energon stream per epoch (energon's own count)."""
        return len(self._loader())

    def _loader(self) -> Any:
        if self._energon is None:
            self._energon = self._make_energon()
            self._energon.restore_state_rank(self._restore)
        return self._energon

    def state_dict(self) -> dict[str, Any]:
        """Energon's rank state, the sample read but not yet batched, and the counters."""
        pending = []
        if self._last is not None and self._last.position == self._position:
            pending = [self._last]  # the packing overflow opens the next batch
        energon_state = self._energon.save_state_rank() if self._energon is not None else None
        return {
            "sample_position": self._position,
            "energon": energon_state if self._energon is not None else self._restore,
            "pending": pending if self._energon is not None else self._pending,
            "counters": asdict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a `state_dict()`; a state without `energon` restarts the stream."""
        self._position = int(state.get("sample_position", 0))
        self._restore = state.get("energon")
        self._pending = list(state.get("pending", []))
        self._energon, self._last = None, None
        if "counters" in state:
            self.counters = DataCounters(**state["counters"])

    def _items(self, start: int) -> Iterator[Example | BadSample]:
        position = start
        pending, self._pending = self._pending, []
        if not pending and self._last is not None and self._last.position == start:
            pending = [self._last]  # a new iter() after a packing overflow starts with it
        for item in pending:
            self._last = item
            yield item
            position = item.position + 1
        while True:
            for sample in self._loader():
                item = copy.copy(sample.item)
                item.position = position
                position += 1
                self._last = item
                yield item
            if not self.repeat:
                return
            self._energon, self._restore = None, None  # next pass from the start

    def _stream_end(self) -> int | None:
        return None

    def _collate(self, rows: list[list[Example]]) -> dict:
        from mm_megatron.data.collate import collate_rows

        return collate_rows(
            rows,
            pad_token_id=self.tokenizer_info.pad_token_id,
            image_transform=self.processor.image_transform,
            packed=self.packing,
            pad_to=self.pad_to,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )


def build_energon_loader(
    data_config: DataConfig,
    tokenizer: Any = None,
    *,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
    image_tokens: Callable[[ImageGeometry], int],
    seed: int,
    tiling: TilingConfig | None = None,
    split: str = "train",
    repeat_val: bool = False,
) -> EnergonDataLoader:
    """Build one data-parallel rank's loader over an energon dataset or metadataset.

    Args:
        data_config: `train_shards`/`val_shards` name the energon dataset directory or
            metadataset YAML; template, image and packing settings as for webdataset shards.
        tokenizer: A `TokenizerInfo`, a HF tokenizer, a local path, or None for
            `data_config.tokenizer_path`.
        dp_rank: This rank's index in the data-parallel group.
        dp_size: Size of the data-parallel group.
        micro_batch_size: Rows per batch.
        image_tokens: The model's image-token count for an image of a given geometry.
        tiling: The model's tiling scheme (`tiling.py`; None: one square tile per image).
        seed: Shuffle seed (energon's `seed_offset`); all ranks pass the same one.
        split: `train` (endless, shuffled, blended by weight) or `val` (in order).
        repeat_val: Read the val split again and again instead of once (the trainer's
            evaluation draws a fixed number of batches, like the webdataset backend's).
    """
    from megatron.energon import (
        WorkerConfig,
        get_savable_loader,
        get_train_dataset,
        get_val_dataset,
    )

    data_config.validate()
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}; choose train or val")
    spec = data_config.train_shards if split == "train" else data_config.val_shards
    if not is_energon_dataset(spec):
        raise ValueError(f"data.{split}_shards={spec!r} is not an energon dataset or metadataset")
    if not isinstance(tokenizer, TokenizerInfo):
        source = data_config.tokenizer_path if tokenizer is None else tokenizer
        if source is None:
            raise ValueError("no tokenizer given and data.tokenizer_path is not set")
        tokenizer = prepare_tokenizer(source, data_config.image_token)
    processor = SampleProcessor.from_config(data_config, tokenizer, image_tokens, tiling)
    workers = data_config.num_workers

    def make_energon() -> Any:
        # NOTE: as for the webdataset backend, set before energon forks its workers.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        worker_config = WorkerConfig(
            rank=dp_rank, world_size=dp_size, num_workers=workers, seed_offset=seed
        )
        from mm_megatron.data.energon_encoder import EnergonTaskEncoder

        encoder = EnergonTaskEncoder(processor)
        if split == "train":
            dataset = get_train_dataset(
                spec,
                worker_config=worker_config,
                batch_size=None,
                shuffle_buffer_size=SHUFFLE_BUFFER if data_config.shuffle else None,
                max_samples_per_sequence=MAX_SAMPLES_PER_SEQUENCE,
                task_encoder=encoder,
            )
        else:
            dataset = get_val_dataset(
                spec,
                split_part="val",
                worker_config=worker_config,
                batch_size=1,
                task_encoder=encoder,
            )
        return get_savable_loader(dataset, checkpoint_every_min_n_samples=max(1, workers))

    return EnergonDataLoader(
        make_energon,
        processor,
        repeat=split == "val" and repeat_val,
        micro_batch_size=micro_batch_size,
        packing=data_config.packing,
        max_seq_len=data_config.max_seq_len,
        pad_to=data_config.pad_to,
        pad_to_multiple_of=data_config.pad_to_multiple_of,
        num_workers=workers,
        max_bad_fraction=data_config.max_bad_fraction,
        min_samples_for_bad_check=data_config.min_samples_for_bad_check,
    )
