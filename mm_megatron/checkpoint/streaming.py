"""Streaming torch_dist writer: a megatron-core dist checkpoint whose tensors are made on demand.

``megatron.core.dist_checkpointing.save`` needs every tensor in memory at once (its writer even
preloads them all). A converter producing a 7B checkpoint from HF files would then hold the whole
model. :func:`save_streaming` writes the *same* format from a sharded state dict whose tensors live
on the ``meta`` device (build the model under ``torch.device("meta")``): it runs megatron's own
preprocessing (factories such as the SwiGLU split, key renames, validation) and translation to the
PyTorch DCP layout, then saves with ``torch.distributed.checkpoint`` through a planner that asks
``resolve`` for each chunk's real data just before it is written, one chunk at a time.

Result: ``metadata.json`` + ``.metadata`` + ``__0_0.distcp``, identical in structure to what
``dist_checkpointing.save`` writes for a real TP1/PP1 model (checked by the tests), loadable by
``dist_checkpointing.load`` at any layout.

Touch points with megatron-core internals (pinned 0.19.2): ``save_preprocess``,
``_replace_state_dict_keys_with_sharded_keys``, ``mcore_to_pyt_state_dict``, ``MCoreSavePlanner``.
Single process only (a converter); training saves go through ``dist_checkpointing.save``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.planner import WriteItemType


@dataclass(frozen=True)
class ChunkView:
    """Which part of a parameter one stored chunk is (a strided view of the full tensor)."""

    param_key: str
    """State-dict key of the parameter (e.g. ``model.language_model.output_layer.weight``)."""
    shape: tuple[int, ...]
    """View shape."""
    stride: tuple[int, ...]
    """View strides."""
    offset: int
    """Storage offset of the view relative to the parameter's start."""

    def row_range(self, param_shape: tuple[int, ...]) -> tuple[int, int] | None:
        """(first, end) rows if the view is a block of whole dim-0 rows of a contiguous
        parameter of ``param_shape``, else None."""
        row = 1
        for s in param_shape[1:]:
            row *= s
        if tuple(self.shape[1:]) != tuple(param_shape[1:]) or self.offset % max(row, 1):
            return None
        first = self.offset // max(row, 1)
        return first, first + self.shape[0]

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This view of ``full`` (a contiguous tensor shaped like the parameter)."""
        if self.offset == 0 and tuple(full.shape) == self.shape:
            return full
        return full.as_strided(self.shape, self.stride, full.storage_offset() + self.offset)


Resolver = Callable[[ChunkView], torch.Tensor]


class _LazyPlanner(MCoreSavePlanner):
    def __init__(self, views, resolve: Resolver, on_write=None, **kwargs):
        super().__init__(**kwargs)
        self._views = views
        self._resolve = resolve
        self._on_write = on_write

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        key = (write_item.index.fqn, tuple(write_item.index.offset))
        view = self._views[key]
        sizes = tuple(write_item.tensor_data.chunk.sizes)
        data = self._resolve(view)
        if tuple(data.shape) != view.shape:
            raise ValueError(f"{key[0]}: resolve gave {tuple(data.shape)}, chunk is {view.shape}")
        data = data.reshape(sizes).contiguous()
        if data.dtype != write_item.tensor_data.properties.dtype:
            raise TypeError(f"{key[0]}: produced {data.dtype}, declared dtype differs")
        if self._on_write is not None:
            self._on_write(data.numel() * data.element_size())
        return data


def _collect_views(node, param_key: str | None, out: dict) -> None:
    """Record (sharded key, global offset) -> ChunkView for every ShardedTensor under ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            _collect_views(v, k if isinstance(k, str) else param_key, out)
    elif isinstance(node, list | tuple):
        for v in node:
            _collect_views(v, param_key, out)
    elif isinstance(node, ShardedTensor):
        t = node.data
        if t is None:
            raise ValueError(f"{node.key}: ShardedTensor without data (meta tensor expected)")
        base = t._base if t._base is not None else t
        view = ChunkView(
            param_key=param_key,
            shape=tuple(t.shape),
            stride=tuple(t.stride()),
            offset=t.storage_offset() - base.storage_offset(),
        )
        key = (node.key, tuple(node.global_offset))
        if key in out:
            raise ValueError(f"duplicate chunk {key}")
        out[key] = view


def save_streaming(
    sharded_state_dict: dict,
    checkpoint_dir: Path,
    resolve: Resolver,
    *,
    on_write: Callable[[int], None] | None = None,
) -> int:
    """Write ``sharded_state_dict`` (meta-device tensors) as a torch_dist checkpoint.

    Args:
        sharded_state_dict: as passed to ``dist_checkpointing.save`` but with meta tensors.
        checkpoint_dir: an existing, empty directory.
        resolve: ``resolve(view)`` returns the chunk of parameter ``view.param_key`` that
            ``view`` describes (``view.shape``, the parameter's dtype); ``view.take(full)`` cuts
            it from the full parameter. Called once per chunk, in storage order (the chunks of
            one parameter are consecutive), so caching the last parameter is enough.
        on_write: called with the byte count of each tensor chunk as it is written.

    Returns:
        Total tensor bytes written.
    """
    checkpoint_dir = Path(checkpoint_dir)
    sharded_part, common = save_preprocess(sharded_state_dict, validate_access_integrity=True)
    views: dict = {}
    _collect_views(sharded_part, None, views)
    sharded_part["common_state"] = ShardedObject(
        key="common_state", data=common, global_shape=(1,), global_offset=(0,), replica_id=0
    )
    flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_part, True)
    pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
    total = [0]

    def count(n: int) -> None:
        total[0] += n
        if on_write is not None:
            on_write(n)

    planner = _LazyPlanner(
        views,
        resolve,
        count,
        dedup_replicated_tensors=False,
        flatten_state_dict=False,
        flatten_sharded_tensors=False,
    )
    writer = FileSystemWriter(
        str(checkpoint_dir), single_file_per_rank=True, thread_count=1, sync_files=True
    )
    dcp_save(pyt_state_dict, storage_writer=writer, planner=planner, no_dist=True)
    save_config(CheckpointingConfig("torch_dist", 1), str(checkpoint_dir))
    return total[0]
