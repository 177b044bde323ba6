"""The language model's statement of its own cost: matmul weights and forward FLOPs.

The LM itself is megatron-core's ``GPTModel`` (built in `llava.py`); this module is the LM-side
counterpart of ``VisionEncoder.forward_flops`` and the projectors' ``forward_flops``, so that
`mm_megatron.model.flops` only sums the parts. Counted (architecture.md, "FLOPs for MFU"):

- matmuls: ``2 * N_matmul`` per token, where ``N_matmul`` is QKV, attention output, the SwiGLU
  MLP (gate, up, down) of every layer, plus the output layer over the padded vocabulary megatron
  computes. The embedding lookup is free.
- causal attention: ``QK^T`` and ``AV`` are ``2 * s^2 * d_attn`` each per layer for a sequence
  of ``s`` tokens; the causal mask halves them, so ``2 * s^2 * d_attn`` per layer. Packed (THD)
  sub-sequences attend only within themselves, so each counts with its own length.

Biases, norms, RoPE, softmax and the loss are O(s*h) and ignored, as in Megatron-LM's and PaLM's
MFU formulas. What it does not do: know about parallel layouts, padding, or training multipliers.
"""

from __future__ import annotations

from collections.abc import Sequence

from mm_megatron.config.model_config import LanguageConfig


def lm_matmul_params(lm: LanguageConfig, vocab: int | None = None) -> int:
    """Weights the LM multiplies each token by: every layer plus the output layer.

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
        seq_lens: Real length of every sequence; packed sub-sequences count separately (their
            attention is block-diagonal).
        vocab: Output-layer rows (default: the padded vocab at TP=1).
    """
    n = lm_matmul_params(lm, vocab)
    d_attn = lm.num_attention_heads * lm.head_dim
    tokens = sum(seq_lens)
    squares = sum(s * s for s in seq_lens)
    return 2 * n * tokens + 2 * lm.num_layers * d_attn * squares
