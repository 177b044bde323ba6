"""The Perceiver resampler's shape (MiniCPM-V 2.x): ``ProjectorConfig.resampler``.

Read only when ``projector.type`` is ``resampler`` (:mod:`mm_megatron.model.projector_resampler`).
The resampler's width is ``projector.hidden_size`` (None: the LM width, as MiniCPM-V's
``embed_dim``); its output always has the LM width.

What it does not do: know the vision or LM widths (the model passes them), or the parallel layout.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ResamplerConfig:
    """Learned queries cross-attending once to one tile's ViT features."""

    num_queries: int = 64
    """Learned queries = LM embeddings per tile, whatever its grid (MiniCPM-V 2.x: 64); a square
    number, for the queries' 2D sin-cos positions."""
    num_heads: int | None = None
    """Cross-attention heads (must divide the width, and by TP); None: width // 128."""

    def heads(self, width: int) -> int:
        """Cross-attention heads at resampler width `width`: `num_heads`, else width // 128."""
        return self.num_heads or max(1, width // 128)

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        if self.num_queries < 1:
            raise ValueError(f"projector.resampler.num_queries={self.num_queries} must be >= 1")
        if self.num_heads is not None and self.num_heads < 1:
            raise ValueError(f"projector.resampler.num_heads={self.num_heads} must be >= 1")
