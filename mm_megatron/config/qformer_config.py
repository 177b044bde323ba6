"""The Q-Former connector's shape (BLIP-2 / InstructBLIP / MiniGPT-4): ``ProjectorConfig.qformer``.

Read only when ``projector.type`` is ``qformer`` (:mod:`mm_megatron.model.projector_qformer`).
Field names follow their HF ``Blip2QFormerConfig`` meaning; the defaults are BLIP-2's published
Q-Former (BERT-base width, 12 layers, cross-attention every second layer, 32 queries).

What it does not do: know the vision or LM widths (the model passes them), or the parallel layout.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class QFormerConfig:
    """Learnable queries through BERT-style post-LN layers that cross-attend to the image."""

    num_query_tokens: int = 32
    """Learnable queries = LM embeddings per image (tile), whatever the encoder's token count."""
    hidden_size: int = 768
    """Q-Former width (HF ``qformer_config.hidden_size``)."""
    num_layers: int = 12
    """Q-Former layers (HF ``num_hidden_layers``)."""
    num_attention_heads: int = 12
    """Heads of self- and cross-attention (must divide by TP)."""
    intermediate_size: int = 3072
    """MLP inner width (must divide by TP)."""
    cross_attention_frequency: int = 2
    """Layer ``i`` cross-attends to the image features when ``i % cross_attention_frequency == 0``
    (HF's rule: layers 0, 2, 4, ... by default)."""
    activation: str = "gelu"
    """MLP activation, an HF ``hidden_act`` name from ``PROJECTOR_ACTIVATIONS``."""
    layernorm_eps: float = 1e-12
    """Epsilon of every Q-Former LayerNorm (BERT's 1e-12)."""

    @property
    def num_cross_layers(self) -> int:
        """Layers that cross-attend to the image."""
        return len(range(0, self.num_layers, self.cross_attention_frequency))

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        for name in ("num_query_tokens", "num_layers", "cross_attention_frequency"):
            if getattr(self, name) < 1:
                raise ValueError(f"projector.qformer.{name}={getattr(self, name)} must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"projector.qformer.hidden_size={self.hidden_size} not divisible by "
                f"projector.qformer.num_attention_heads={self.num_attention_heads}"
            )
