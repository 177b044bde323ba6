"""The per-rank sample stream: deterministic order, DP/worker sharding, resumable positions.

What this file does:
- `SampleOrder` defines, for one data-parallel rank, which (shard, sample) sits at every
  position 0, 1, 2, ... of its stream. Epoch e is the whole dataset with the shard order
  permuted and each shard's samples permuted (seeded by (seed, e), when shuffling); the epochs
  concatenated are the global stream. Two ways to split it over DP ranks:
  - `block=None` (validation): rank r takes the r-th contiguous slice of every epoch (slices
    differ by at most one sample, cover every sample once and never overlap);
  - `block=B` (training, B = global batch / DP): the global stream is cut into global batches of
    B * dp_size samples and rank r takes the r-th block of B of each, so step k consumes global
    samples [k*G, (k+1)*G) whatever the DP size, and a run resumed at another DP size (or global
    batch) continues the same stream from `offset` (the first global sample not yet read),
    skipping the `exclude`d global samples that some rank had already read past it (ranks run
    unevenly ahead when packing fits more samples in a row or bad samples are skipped).
  Position p is a pure function of (shards, seed, dp_rank, dp_size, block, offset, exclude), so
  resuming at p needs nothing but p, and the number of DataLoader workers does not change the
  stream. `stream_resume_point` computes `offset` and `exclude` from the old ranks' positions.
- `ExampleDataset` (a torch IterableDataset) reads positions start, start+1, ... in chunks of
  consecutive positions (chunk j goes to worker j % W), finds each sample in its tar shard by
  random access (`shards.ShardMembers`), and yields an `Example` or, for a sample that must be
  skipped, a `BadSample` at the same position, so the loader can restore the order and count it.

The data-parallel rank and size are arguments; nothing here reads torch.distributed.

What it does not do: count/log bad samples, batch, pack or collate (`loader.py`).
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch

from mm_megatron.data.samples import BadSample, BadSampleError, Example, SampleProcessor
from mm_megatron.data.shards import ShardInfo, ShardMembers


class SampleOrder:
    """Maps positions of one DP rank's stream to (shard index, sample index in the shard)."""

    def __init__(
        self,
        shards: list[ShardInfo],
        *,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool,
        num_epochs: int | None = None,
        block: int | None = None,
        offset: int = 0,
        exclude: tuple[int, ...] = (),
    ):
        """Args:
        shards: All shards of the split, in a fixed order (every rank passes the same list).
        dp_rank: This rank's index in the data-parallel group.
        dp_size: Size of the data-parallel group.
        seed: Base seed of the shuffles (non-negative).
        shuffle: Permute shards and samples per epoch; False keeps file order.
        num_epochs: Length of the stream in epochs; None for endless.
        block: Samples per rank per global batch (global-batch-major split); None for
            contiguous per-epoch slices.
        offset: Global samples consumed before position 0 (block mode only).
        exclude: Global indices >= `offset` already read, left out of the stream (block mode
            only; see `stream_resume_point`).
        """
        if block is not None and block < 1:
            raise ValueError(f"block={block} must be >= 1")
        if offset < 0:
            raise ValueError(f"offset={offset} must be >= 0")
        self.exclude = tuple(sorted(set(exclude)))
        if self.exclude and (block is None or self.exclude[0] < offset):
            raise ValueError(f"exclude needs block mode and indices >= offset={offset}")
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.block = block
        self.offset = offset
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.shards = shards
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self._counts = np.array([s.num_samples for s in shards], dtype=np.int64)
        total = int(self._counts.sum())
        base, extra = divmod(total, dp_size)
        self.samples_per_epoch = base + (1 if dp_rank < extra else 0)
        """Samples this rank reads per epoch."""
        self._rank_offset = dp_rank * base + min(dp_rank, extra)
        if self.samples_per_epoch == 0:
            raise ValueError(f"{total} samples cannot be split over dp_size={dp_size} ranks")
        self._epoch = -1
        self._shard_order = np.arange(len(shards))
        self._ends = np.cumsum(self._counts)
        self._perms: dict[int, np.ndarray] = {}

    @property
    def end(self) -> int | None:
        """One past the last position, or None for an endless stream."""
        if self.num_epochs is None:
            return None
        if self.block is None:
            return self.num_epochs * self.samples_per_epoch
        left = max(0, self.num_epochs * int(self._counts.sum()) - self.offset - len(self.exclude))
        rounds, rest = divmod(left, self.block * self.dp_size)
        return rounds * self.block + min(max(rest - self.dp_rank * self.block, 0), self.block)

    def global_index(self, position: int) -> int:
        """Index in the global stream (epochs concatenated) of this rank's `position`."""
        if self.block is None:
            epoch, offset = divmod(position, self.samples_per_epoch)
            return epoch * int(self._counts.sum()) + self._rank_offset + offset
        step, within = divmod(position, self.block)
        j = self.offset + (step * self.dp_size + self.dp_rank) * self.block + within
        skipped = 0  # the j-th index counting from offset with the excluded ones left out
        while (n := bisect.bisect_right(self.exclude, j + skipped)) != skipped:
            skipped = n
        return j + skipped

    def _set_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        self._epoch, self._perms = epoch, {}
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            self._shard_order = rng.permutation(len(self.shards))
        self._ends = np.cumsum(self._counts[self._shard_order])

    def locate(self, position: int) -> tuple[int, int]:
        """(shard index, sample index within the shard) at `position` of this rank's stream."""
        epoch, g = divmod(self.global_index(position), int(self._counts.sum()))
        self._set_epoch(epoch)  # g: index in the epoch's global order
        k = int(np.searchsorted(self._ends, g, side="right"))
        shard = int(self._shard_order[k])
        local = g - (int(self._ends[k - 1]) if k else 0)
        if self.shuffle:
            if shard not in self._perms:
                rng = np.random.default_rng([self.seed, epoch, shard, 1])
                self._perms[shard] = rng.permutation(int(self._counts[shard]))
            local = int(self._perms[shard][local])
        return shard, local


def stream_resume_point(
    order: SampleOrder, streams: list[dict], dp_size: int, block: int
) -> tuple[int, tuple[int, ...]]:
    """Where the global stream continues after a run whose DP ranks stopped at `streams`.

    Each old rank read a prefix of its own positions; with packing or bad samples some ranks
    ran further ahead than others. The stream continues at the first global index no rank read
    (`start`), leaving out the indices past it that some rank had read (`exclude`), so across a
    change of DP size or global batch no sample is lost or read twice. Without packing or bad
    samples every rank stopped at the same step boundary: `start` is the consumed sample count
    and `exclude` is empty.

    Args:
        order: This run's order (shards, seed and shuffle are taken from it).
        streams: Every old DP rank's loader `state_dict()`, by DP rank.
        dp_size: The old DP size.
        block: The old samples per rank per global batch.
    """
    olds = [
        (
            SampleOrder(
                order.shards,
                dp_rank=r,
                dp_size=dp_size,
                seed=order.seed,
                shuffle=order.shuffle,
                block=block,
                offset=int(state["global_offset"]),
                exclude=tuple(state.get("exclude", ())),
            ),
            int(state["sample_position"]),
        )
        for r, state in enumerate(streams)
    ]
    start = min(old.global_index(position) for old, position in olds)
    read: set[int] = set()
    for old, position in olds:
        while position > 0 and (g := old.global_index(position - 1)) >= start:
            read.add(g)
            position -= 1
        read.update(e for e in old.exclude if e >= start)
    return start, tuple(sorted(read))


class ExampleDataset(torch.utils.data.IterableDataset):
    """Yields chunks (lists) of `Example` / `BadSample` for positions start, start+1, ..."""

    def __init__(
        self,
        order: SampleOrder,
        processor: SampleProcessor,
        *,
        start: int = 0,
        chunk: int = 4,
        max_open_shards: int = 4,
    ):
        """Args:
        order: The rank's sample order.
        processor: Turns raw members into arrays.
        start: First position to read (to resume).
        chunk: Consecutive positions a worker reads and sends as one item.
        max_open_shards: Shard files each worker keeps open.
        """
        super().__init__()
        self.order = order
        self.processor = processor
        self.start = start
        self.chunk = chunk
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, ShardMembers | Exception] = OrderedDict()
        self._open_pid = os.getpid()

    def __getstate__(self) -> dict:
        # Open files do not pickle (spawn/forkserver workers); each process reopens its own.
        state = dict(self.__dict__)
        state["_open"], state["_open_pid"] = OrderedDict(), -1
        return state

    def _shard(self, index: int) -> ShardMembers | Exception:
        if self._open_pid != os.getpid():
            # NOTE: a forked worker must not share file offsets with its parent: reopen.
            self._open, self._open_pid = OrderedDict(), os.getpid()
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        try:
            members: ShardMembers | Exception = ShardMembers(self.order.shards[index].path)
        except Exception as e:  # unreadable or truncated tar: its samples become bad samples
            members = e
        self._open[index] = members
        while len(self._open) > self.max_open_shards:
            _, old = self._open.popitem(last=False)
            if isinstance(old, ShardMembers):
                old.close()
        return members

    def read_position(self, position: int) -> Example | BadSample:
        """The sample at `position`, processed."""
        shard_index, local = self.order.locate(position)
        path = self.order.shards[shard_index].path
        members = self._shard(shard_index)
        if isinstance(members, Exception):
            reason, detail = "unreadable_shard", f"{type(members).__name__}: {members}"
            return BadSample("?", path, position, reason, detail)
        if local >= len(members.keys):
            detail = (
                f"sample {local} requested, the tar holds {len(members.keys)} ({members.error})"
            )
            return BadSample("?", path, position, "unreadable_shard", detail)
        key = members.keys[local]

        def read(ext: str) -> bytes:
            try:
                return members.read(key, ext)
            except OSError as e:
                raise BadSampleError("unreadable_shard", f"{key}.{ext}: {e}") from e

        try:
            fields = self.processor(members.members[key].keys(), read)
        except BadSampleError as e:
            return BadSample(key, path, position, e.reason, e.detail)
        return Example(key, path, position, *fields)

    def iter_chunks(
        self, start: int, worker_id: int = 0, num_workers: int = 1, chunk: int = 1
    ) -> Iterator[list[Example | BadSample]]:
        """This worker's chunks of consecutive positions, in increasing order.

        Positions from `start` on are cut into chunks of `chunk`; chunk j goes to worker
        j % num_workers. Chunks amortise the per-item cost of sending results between processes.

        Args:
            start: First position of the stream to read.
            worker_id: This worker's index.
            num_workers: Number of workers sharing the stream.
            chunk: Positions per chunk.
        """
        end = self.order.end
        first = start + worker_id * chunk
        while end is None or first < end:
            last = first + chunk if end is None else min(first + chunk, end)
            yield [self.read_position(p) for p in range(first, last)]
            first += num_workers * chunk

    def iter_positions(self, start: int) -> Iterator[Example | BadSample]:
        """Every position from `start` on, in this process."""
        for items in self.iter_chunks(start):
            yield from items

    def __iter__(self) -> Iterator[list[Example | BadSample]]:
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        # Each worker gets its own copy of this object; it opens its own file handles.
        return self.iter_chunks(self.start, worker_id, num_workers, self.chunk)
