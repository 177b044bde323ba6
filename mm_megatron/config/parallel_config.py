"""Parallel layout: how a job splits over tensor, pipeline, context and data parallel ranks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """Megatron-style parallel sizes. DP is whatever is left of the world size."""

    tp: int = 1
    """Tensor-parallel size (``--tensor-model-parallel-size``)."""
    pp: int = 1
    """Pipeline-parallel size (``--pipeline-model-parallel-size``)."""
    cp: int = 1
    """Context-parallel size (``--context-parallel-size``)."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in TP regions (``--sequence-parallel``)."""
    virtual_pp: int | None = None
    """Virtual (interleaved) pipeline stages per rank; None for plain 1F1B."""
    first_stage_lm_layers: int | None = None
    """LM layers on the first pipeline stage, which also holds the vision encoder; None for an
    even split."""
    last_stage_lm_layers: int | None = None
    """LM layers on the last pipeline stage; None for an even split."""

    @property
    def model_parallel_size(self) -> int:
        """Ranks one model replica spans."""
        return self.tp * self.pp * self.cp

    def dp(self, world_size: int) -> int:
        """Data-parallel size for ``world_size`` ranks."""
        return world_size // self.model_parallel_size
