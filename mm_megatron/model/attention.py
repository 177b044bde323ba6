"""Local core attention on ``torch.nn.functional.scaled_dot_product_attention``, with CP.

A drop-in for megatron-core's ``DotProductAttention`` in a ``SelfAttention`` spec (same
constructor and forward signature). Unlike megatron's local attention it supports:

* packed sequences (THD, ``PackedSeqParams``): a block-diagonal (causal) mask from
  ``cu_seqlens_q_padded`` so tokens never attend across sequences;
* GQA without materialising repeated K/V (``enable_gqa``);
* context parallelism: K and V are all-gathered over the CP group (autograd-aware: the backward
  reduce-scatters their gradients) and each rank's queries attend with the zig-zag causal mask of
  the load-balanced split (rank r holds chunks r and 2*CP-1-r of every sequence; positions from
  ``mm_megatron.parallel.cp_padding.zigzag_positions``, the same function that splits the input);
* causal (LM) and unmasked (ViT) attention, chosen by ``attn_mask_type``.

On GPU, SDPA dispatches to FlashAttention / memory-efficient kernels when no explicit mask is
needed (non-CP, non-packed causal or unmasked attention).

Not here: attention bias, sliding windows, softmax variants (use the TE spec); process groups
from megatron's globals (the CP group arrives in ``pg_collection``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mm_megatron.parallel.cp_padding import zigzag_positions


def _block_mask(
    q_id: torch.Tensor, q_pos: torch.Tensor, k_id: torch.Tensor, k_pos: torch.Tensor, causal: bool
) -> torch.Tensor:
    """Boolean [sq, sk] mask, True where query may attend key."""
    allowed = q_id[:, None] == k_id[None, :]
    if causal:
        allowed &= q_pos[:, None] >= k_pos[None, :]
    return allowed


class SDPAttention(MegatronModule):
    """Core attention: softmax(QK^T * scale + mask) V via SDPA.

    Args mirror megatron's ``DotProductAttention``; ``pg_collection.cp`` is the CP group
    (required when ``config.context_parallel_size > 1``; its rank is this rank's CP rank).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(head_dim)
        self.cp_size = config.context_parallel_size
        self.cp_group = getattr(pg_collection, "cp", None)
        self.cp_rank = 0
        if self.cp_size > 1:
            # NOTE: groups come in (megatron's SelfAttention passes the build's pg_collection);
            # the rank is the given group's own answer, never megatron's globals.
            if self.cp_group is None:
                raise ValueError(
                    f"SDPAttention: context_parallel_size={self.cp_size} needs pg_collection.cp"
                )
            if self.cp_group.size() != self.cp_size:
                raise ValueError(
                    f"SDPAttention: pg_collection.cp has {self.cp_group.size()} ranks but "
                    f"context_parallel_size={self.cp_size}"
                )
            self.cp_rank = self.cp_group.rank()
        if cp_comm_type not in (None, "all_gather", "p2p", "a2a"):
            raise ValueError(f"SDPAttention: unsupported cp_comm_type {cp_comm_type!r}")
        self._mask_cache: dict = {}

    # ------------------------------------------------------------------ helpers
    def _causal(self, attn_mask_type: AttnMaskType | None) -> bool:
        kind = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if kind in (AttnMaskType.causal, AttnMaskType.padding_causal):
            return True
        if kind in (AttnMaskType.no_mask, AttnMaskType.padding):
            return False
        raise ValueError(f"SDPAttention: unsupported attn_mask_type {kind}")

    def _mask(
        self, seq_lens: torch.Tensor | None, total: int, causal: bool, device
    ) -> torch.Tensor | None:
        """[sq, sk] bool mask for packed and/or CP layouts; None when SDPA's own is enough."""
        if seq_lens is None and self.cp_size == 1:
            return None
        if seq_lens is None:
            seq_lens = torch.tensor([total * self.cp_size])
        key = (tuple(seq_lens.tolist()), causal, self.cp_rank)
        if key not in self._mask_cache:
            # Queries: this rank's tokens; keys: every rank's, in the all-gather's rank order.
            q_id, q_pos = zigzag_positions(seq_lens, self.cp_size, self.cp_rank)
            ks = [zigzag_positions(seq_lens, self.cp_size, r) for r in range(self.cp_size)]
            k_id = torch.cat([k[0] for k in ks])
            k_pos = torch.cat([k[1] for k in ks])
            mask = _block_mask(q_id, q_pos, k_id, k_pos, causal)
            self._mask_cache.clear()  # one layout per step; keep memory bounded
            self._mask_cache[key] = mask.to(device)
        return self._mask_cache[key]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] (THD: [t, np, hn]) -> [sq, b, np*hn]."""
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention_bias; use the TE spec")
        causal = self._causal(attn_mask_type)
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:
            # [t, np, hn] -> [t, 1, np, hn]
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        sq, b, np_, hn = query.shape
        ng = key.shape[2]

        if self.cp_size > 1:
            # [sk_local, b, ng, hn] -> [sk_local * cp, b, ng, hn], rank-major
            key = tensor_parallel.gather_from_sequence_parallel_region(
                key, tensor_parallel_output_grad=True, group=self.cp_group
            )
            value = tensor_parallel.gather_from_sequence_parallel_region(
                value, tensor_parallel_output_grad=True, group=self.cp_group
            )

        seq_lens = None
        if thd:
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            seq_lens = (cu[1:] - cu[:-1]).long().cpu()
            if self.cp_size == 1 and int(seq_lens.sum()) != sq:
                raise ValueError(
                    f"packed_seq_params cu_seqlens total {int(seq_lens.sum())} != tokens {sq}"
                )
        mask = self._mask(seq_lens, sq, causal, query.device)
        if attention_mask is not None and mask is None and not causal:
            # megatron convention: True = masked out. SDPA: True = attend.
            mask = ~attention_mask.bool()

        # [s, b, n, d] -> [b, n, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        dropout = self.dropout_p if self.training else 0.0
        kwargs = dict(scale=self.softmax_scale, enable_gqa=np_ != ng)
        if dropout > 0.0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = self._sdpa(q, k, v, mask, causal, dropout, kwargs)
        else:
            out = self._sdpa(q, k, v, mask, causal, 0.0, kwargs)
        # [b, n, sq, d] -> [sq, b, n*d]
        out = out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
        if thd:
            out = out.squeeze(1)  # [t, np*hn]; megatron reshapes back to [t, 1, h]
        return out

    @staticmethod
    def _sdpa(q, k, v, mask, causal, dropout, kwargs):
        if mask is None:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=causal, **kwargs
            )
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, **kwargs)
