"""Parallel layout: how a job splits over tensor, pipeline, context and data parallel ranks.

Fields with a Megatron-LM command-line flag declare it in their metadata (``{"flag": ...}``);
``mm-megatron train`` builds its flags from that (see ``mm_megatron.config.fields``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ParallelConfig:
    """Megatron-style parallel sizes. DP is whatever is left of the world size."""

    tp: int = field(default=1, metadata={"flag": "--tensor-model-parallel-size"})
    """Tensor-parallel size."""
    pp: int = field(default=1, metadata={"flag": "--pipeline-model-parallel-size"})
    """Pipeline-parallel size."""
    cp: int = field(default=1, metadata={"flag": "--context-parallel-size"})
    """Context-parallel size."""
    sequence_parallel: bool = field(default=False, metadata={"flag": "--sequence-parallel"})
    """Shard activations along the sequence in TP regions."""
    virtual_pp: int | None = field(
        default=None, metadata={"flag": "--virtual-pipeline-model-parallel-size"}
    )
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
