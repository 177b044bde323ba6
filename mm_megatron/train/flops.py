"""Model FLOPs of one training step of a LLaVA model, counting only what actually runs.

What this file does: forward FLOPs of the three parts from the model config and the batch's
real (unpadded) sequence lengths and image count, and the training multiplier of each part
(`docs`: architecture.md, "FLOPs for MFU"):

- LM, per sequence of expanded length s: ``2 * N_lm * s`` for the matmuls (QKV, attention out,
  SwiGLU MLP, and the output layer over the padded vocab megatron computes) plus causal attention
  ``2 * s^2 * (heads * head_dim)`` per layer (QK^T and AV are ``2 s^2 d_attn`` each; the causal
  mask halves them). The embedding lookup is free.
- ViT, per image with p positions (patches + class token): ``2 * N_patch_conv * patches`` +
  per layer ``2 * p * (4 h^2 + 2 h f)`` + bidirectional attention ``4 * p^2 * h``.
- Projector, per image: what the projector class states (`Projector.forward_flops`), e.g.
  ``2 * N_proj * T'`` for T' output tokens.
- Training multiplier (backward = 2x forward when weight gradients are computed, 1x when only
  input gradients are): a trained part costs 3x forward; a frozen part that still has to pass
  gradients to a trained part before it costs 2x; a frozen part with nothing trainable before it
  (the ViT in stage 1, or everything up to the first trained part) costs 1x.

Biases, norms, activations, softmax and the loss are ignored (O(s*h), as in Megatron-LM's and
PaLM's MFU formulas). Recomputation is not counted: these are model FLOPs, not hardware FLOPs.

What it does not do: measure time, or know about parallel layouts (divide by the world size for
per-GPU numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mm_megatron.config.model_config import LanguageConfig, LlavaConfig, VisionConfig
from mm_megatron.model.projector import projector_class


def lm_matmul_params(lm: LanguageConfig, vocab: int | None = None) -> int:
    """Weights the LM multiplies each token by: all layers plus the output layer.

    Args:
        lm: The language model config.
        vocab: Output-layer rows (default: the padded vocab at TP=1).
    """
    h, d = lm.hidden_size, lm.head_dim
    qkv = h * (lm.num_attention_heads + 2 * lm.kv_groups) * d
    out = lm.num_attention_heads * d * h
    mlp = 3 * h * lm.ffn_hidden_size  # SwiGLU: gate, up, down
    vocab = lm.padded_vocab_size(1) if vocab is None else vocab
    return lm.num_layers * (qkv + out + mlp) + h * vocab


def lm_forward_flops(lm: LanguageConfig, seq_lens: Sequence[int], vocab: int | None = None) -> int:
    """Forward FLOPs of the LM over sequences of the given (expanded, unpadded) lengths.

    Args:
        lm: The language model config.
        seq_lens: Real length of every sequence (packed sub-sequences count separately: their
            attention is block-diagonal).
        vocab: Output-layer rows (default: the padded vocab at TP=1).
    """
    n = lm_matmul_params(lm, vocab)
    d_attn = lm.num_attention_heads * lm.head_dim
    tokens = sum(seq_lens)
    squares = sum(s * s for s in seq_lens)
    return 2 * n * tokens + 2 * lm.num_layers * d_attn * squares


def vit_forward_flops(v: VisionConfig, num_images: int) -> int:
    """Forward FLOPs of the vision encoder (only the layers built) over `num_images` images."""
    h, f, p = v.hidden_size, v.ffn_hidden_size, v.num_positions
    patch = 2 * (v.num_channels * v.patch_size * v.patch_size * h) * v.num_patches
    per_layer = 2 * p * (4 * h * h + 2 * h * f) + 4 * p * p * h
    return num_images * (patch + v.num_layers_built * per_layer)


def projector_forward_flops(cfg: LlavaConfig, num_images: int) -> int:
    """Forward FLOPs of the projector over `num_images` one-tile images (its class states them)."""
    proj = projector_class(cfg.projector.type)
    v = cfg.vision
    per_image = proj.forward_flops(
        cfg.projector, v.hidden_size, cfg.lm.hidden_size, v.num_output_tokens
    )
    return per_image * num_images


def training_multipliers(cfg: LlavaConfig) -> tuple[int, int, int]:
    """(vision, projector, LM) cost of one training step in units of their forward pass."""
    trained = (not cfg.freeze_vision, not cfg.freeze_projector, not cfg.freeze_lm)
    out = []
    for i, is_trained in enumerate(trained):
        if is_trained:
            out.append(3)
        elif any(trained[:i]):
            out.append(2)  # frozen, but gradients must flow through it to an earlier part
        else:
            out.append(1)  # frozen front part: forward only
    return out[0], out[1], out[2]


@dataclass
class StepFlops:
    """Model FLOPs of one step, per part (already multiplied for training)."""

    vision: int
    """ViT FLOPs."""
    projector: int
    """Projector FLOPs."""
    lm: int
    """LM FLOPs."""

    @property
    def total(self) -> int:
        """All parts."""
        return self.vision + self.projector + self.lm


def train_step_flops(
    cfg: LlavaConfig,
    seq_lens: Sequence[int],
    num_images: int,
    *,
    vocab: int | None = None,
    training: bool = True,
) -> StepFlops:
    """Model FLOPs of a training (or, with `training=False`, forward-only) step.

    Args:
        cfg: The model (its freeze flags decide the multipliers).
        seq_lens: Real expanded lengths of every (sub-)sequence in the step.
        num_images: Images in the step.
        vocab: Output-layer rows (default: the padded vocab at TP=1).
        training: Count backward passes too.
    """
    mv, mp, ml = training_multipliers(cfg) if training else (1, 1, 1)
    return StepFlops(
        vision=mv * vit_forward_flops(cfg.vision, num_images),
        projector=mp * projector_forward_flops(cfg, num_images),
        lm=ml * lm_forward_flops(cfg.lm, seq_lens, vocab),
    )
