"""SDPAttention (local core attention) against a naive softmax reference."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from mm_megatron.model.attention import SDPAttention


def naive(q, k, v, causal, seg=None):
    # q [s, b, n, d], k/v [s, b, g, d]
    n, g = q.shape[2], k.shape[2]
    k = k.repeat_interleave(n // g, dim=2)
    v = v.repeat_interleave(n // g, dim=2)
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) / math.sqrt(q.shape[-1])
    s = q.shape[0]
    allowed = torch.ones(s, s, dtype=torch.bool)
    if causal:
        allowed &= torch.tril(torch.ones(s, s, dtype=torch.bool))
    if seg is not None:
        allowed &= seg[:, None] == seg[None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bnst,tbnd->sbnd", scores.softmax(-1), v)
    return out.reshape(s, q.shape[1], -1)


def make_attn(mask, heads=4, groups=2):
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=heads,
        num_query_groups=groups,
        attention_dropout=0.0,
    )
    return SDPAttention(cfg, 1, mask, "self", pg_collection=_FakePG())


class _FakePG:
    cp = None


@pytest.mark.parametrize("mask", [AttnMaskType.causal, AttnMaskType.no_mask])
def test_matches_naive_gqa(mask):
    torch.manual_seed(0)
    q = torch.randn(7, 2, 4, 8)
    k, v = torch.randn(7, 2, 2, 8), torch.randn(7, 2, 2, 8)
    out = make_attn(mask)(q, k, v, None)
    torch.testing.assert_close(out, naive(q, k, v, mask == AttnMaskType.causal))


def test_packed_thd_block_diagonal():
    torch.manual_seed(1)
    lens = torch.tensor([3, 5, 2])
    t = int(lens.sum())
    q = torch.randn(t, 4, 8)
    k, v = torch.randn(t, 2, 8), torch.randn(t, 2, 8)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(lens, 0).int()])
    psp = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5, max_seqlen_kv=5
    )
    out = make_attn(AttnMaskType.causal)(q, k, v, None, packed_seq_params=psp)
    seg = torch.repeat_interleave(torch.arange(3), lens)
    ref = naive(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), True, seg).squeeze(1)
    torch.testing.assert_close(out, ref)


def test_cp_needs_the_group_it_is_given():
    cfg = TransformerConfig(
        num_layers=1, hidden_size=32, num_attention_heads=4, context_parallel_size=2
    )
    with pytest.raises(ValueError, match="context_parallel_size=2 needs pg_collection.cp"):
        SDPAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=_FakePG())


class _FakeCPGroup:
    """Stands in for a CP process group: the attention reads only its size and this rank."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _zigzag_reference(seq_lens: list[int], cp: int, rank: int) -> list[int]:
    """Global token indices (into the concatenated sequences) that CP rank ``rank`` holds:
    chunks ``rank`` and ``2*cp-1-rank`` of each sequence, written out with plain loops."""
    out, start = [], 0
    for n in seq_lens:
        c = n // (2 * cp)
        for chunk in (rank, 2 * cp - 1 - rank):
            out += list(range(start + chunk * c, start + (chunk + 1) * c))
        start += n
    return out


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("packed", [False, True])
def test_cp_mask_is_exactly_causal_per_sequence(cp, packed):
    """Each CP rank's queries, attending to the all-gathered keys with the rank's mask, give the
    rows of plain causal attention over the whole (unsplit) sequences: no future token, no token
    of another sequence, nothing missing."""
    torch.manual_seed(cp)
    seq_lens = [16, 8, 24] if packed else [32]
    total = sum(seq_lens)
    q = torch.randn(total, 1, 4, 8)
    k, v = torch.randn(total, 1, 2, 8), torch.randn(total, 1, 2, 8)
    seg = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens))
    pos = torch.cat([torch.arange(n) for n in seq_lens])
    allowed = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        context_parallel_size=cp,
        attention_dropout=0.0,
    )
    held = [_zigzag_reference(seq_lens, cp, r) for r in range(cp)]
    gathered = [i for r in range(cp) for i in held[r]]  # the all-gather's rank-major key order
    for rank in range(cp):
        pg = type("PG", (), {"cp": _FakeCPGroup(cp, rank)})()
        attn = SDPAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=pg)
        local = len(held[rank])
        mask = attn._mask(torch.tensor(seq_lens) if packed else None, local, True, "cpu")
        want = allowed[held[rank]][:, gathered]  # [local queries, all keys]
        assert torch.equal(mask, want), f"cp={cp} rank {rank}: mask differs from causal"
        out = torch.nn.functional.scaled_dot_product_attention(
            q[held[rank]].permute(1, 2, 0, 3),
            k[gathered].permute(1, 2, 0, 3),
            v[gathered].permute(1, 2, 0, 3),
            attn_mask=mask,
            scale=attn.softmax_scale,
            enable_gqa=True,
        )  # [b, n, s_local, d]
        causal_ref = naive_masked(q, k, v, allowed)[held[rank]]
        torch.testing.assert_close(out.permute(2, 0, 1, 3).reshape(local, 1, -1), causal_ref)


def naive_masked(q, k, v, allowed):
    """Softmax attention with an explicit [s, s] boolean mask (True = attend); [s, b, n*d]."""
    n, g = q.shape[2], k.shape[2]
    k = k.repeat_interleave(n // g, dim=2)
    v = v.repeat_interleave(n // g, dim=2)
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bnst,tbnd->sbnd", scores.softmax(-1), v)
    return out.reshape(q.shape[0], q.shape[1], -1)
