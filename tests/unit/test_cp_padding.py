"""Tests for mm_megatron.parallel.cp_padding (CPU, one process, no process groups)."""

import math
import subprocess
import sys

import pytest
import torch

from mm_megatron.parallel.cp_padding import (
    IGNORE_INDEX,
    CPPadder,
    build_packed_seq_params,
    cp_split,
    cu_seqlens_from_lengths,
    pad_along,
    pad_bshd,
    pad_thd,
    padding_for,
    scatter_to_sequence_parallel,
    shard_factor,
    thd_cp_local_indices,
    zigzag_positions,
)


def cp_local_indices(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """Positions CP rank ``rank`` keeps of one BSHD row of ``seq_len`` tokens."""
    return thd_cp_local_indices(torch.tensor([0, seq_len]), cp, rank)


# --- arithmetic


@pytest.mark.parametrize(
    "tp, cp, sp, length, expected",
    [
        # megatron.core.models.multimodal.context_parallel.get_padding's pinned cases
        (1, 1, False, 99, 0),
        (2, 2, True, 99, 5),
        (2, 2, False, 99, 1),
        (4, 1, True, 99, 1),
    ],
)
def test_megatron_pinned_cases(tp, cp, sp, length, expected):
    assert padding_for(length, shard_factor(tp, cp, sp)) == expected


@pytest.mark.parametrize(
    "tp, cp, sp, factor, padding_99",
    [
        (2, 2, True, 8, 5),  # 2*cp*tp
        (2, 3, True, 12, 9),  # 2*cp*tp
        (3, 2, True, 12, 9),  # lcm(2*2*3, 3)
        (1, 4, False, 8, 5),  # 2*cp
        (3, 1, True, 3, 0),  # tp
        (8, 1, False, 1, 0),  # TP without SP needs nothing
    ],
)
def test_combined_lcm_cases(tp, cp, sp, factor, padding_99):
    assert shard_factor(tp, cp, sp) == factor
    assert padding_for(99, factor) == padding_99


def _applicable(tp, cp, sp):
    out = []
    if cp > 1:
        out.append(2 * cp * tp if sp else 2 * cp)
    if sp:
        out.append(tp)
    return out


def test_factor_properties_grid():
    for tp in (1, 2, 3, 4, 8):
        for cp in (1, 2, 3, 4, 6):
            for sp in (False, True):
                f = shard_factor(tp, cp, sp)
                fs = _applicable(tp, cp, sp)
                assert all(f % g == 0 for g in fs)
                assert f == math.lcm(1, *fs)
                # smallest such multiple
                assert all(any(m % g for g in fs) for m in range(1, f))
                for length in (0, 1, 7, 99, 100, 1023, 4097):
                    p = padding_for(length, f)
                    assert 0 <= p < f
                    assert all((length + p) % g == 0 for g in fs)


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 1, False), "tp must be >= 1"),
        ((1, -2, False), "cp must be >= 1"),
        ((True, 1, False), "tp must be an int"),
        ((2, 1, "yes"), "sequence_parallel must be a bool"),
    ],
)
def test_shard_factor_validation(args, match):
    with pytest.raises(ValueError, match=match):
        shard_factor(*args)


def test_padding_for_validation():
    with pytest.raises(ValueError, match="length must be >= 0"):
        padding_for(-1, 4)
    with pytest.raises(ValueError, match="factor must be >= 1"):
        padding_for(3, 0)


# --- padding


def test_pad_bshd_values_and_grad():
    s, b, h, f = 37, 2, 3, 8
    emb = torch.randn(s, b, h, requires_grad=True)
    labels = torch.randint(0, 50, (b, s))
    mask = torch.ones(b, s, dtype=torch.bool)
    out = pad_bshd(emb, labels, mask, factor=f)
    assert out.padding == 3 and out.embeddings.shape == (40, b, h)
    assert torch.equal(out.embeddings[:s], emb) and not out.embeddings[s:].any()
    assert torch.equal(out.labels[:, :s], labels) and (out.labels[:, s:] == IGNORE_INDEX).all()
    assert out.loss_mask.dtype == torch.bool and not out.loss_mask[:, s:].any()
    out.embeddings.sum().backward()
    assert torch.equal(emb.grad, torch.ones_like(emb))
    # already aligned: returned as is; Nones stay None
    same = pad_bshd(out.embeddings, None, None, factor=f)
    assert same.embeddings is out.embeddings and same.padding == 0 and same.labels is None


def test_pad_bshd_shape_errors():
    with pytest.raises(ValueError, match=r"labels has shape \(2, 36\), expected \[b, s\]"):
        pad_bshd(torch.zeros(37, 2, 4), torch.zeros(2, 36), factor=4)
    with pytest.raises(ValueError, match="need at least one"):
        pad_bshd(None, factor=4)
    assert torch.equal(pad_along(torch.ones(2, 3), 1, 2, 7)[:, 3:], torch.full((2, 2), 7.0))


@pytest.mark.parametrize("factor", [1, 4, 8, 12])
def test_pad_thd_random(factor):
    g = torch.Generator().manual_seed(factor)
    for _ in range(5):
        n = int(torch.randint(1, 6, (1,), generator=g))
        lengths = torch.randint(1, 30, (n,), generator=g)
        cu = cu_seqlens_from_lengths(lengths)
        t, h = int(lengths.sum()), 3
        emb = torch.randn(t, 1, h, generator=g)
        labels = torch.randint(0, 100, (1, t), generator=g)
        mask = torch.ones(1, t)
        out = pad_thd(emb, labels, mask, cu_seqlens=cu, factor=factor)

        padded = [-(-int(n_) // factor) * factor for n_ in lengths]
        assert out.cu_seqlens.dtype == out.cu_seqlens_padded.dtype == torch.int32
        assert out.cu_seqlens.tolist() == [0, *torch.cumsum(lengths, 0).tolist()]
        assert out.cu_seqlens_padded.tolist() == [0, *torch.cumsum(torch.tensor(padded), 0)]
        assert out.padding == sum(padded) - t
        cu_p = out.cu_seqlens_padded.tolist()
        for i, n_ in enumerate(lengths.tolist()):
            a, b = cu_p[i], cu_p[i + 1]
            src = slice(int(cu[i]), int(cu[i + 1]))
            assert torch.equal(out.embeddings[a : a + n_], emb[src])
            assert not out.embeddings[a + n_ : b].any()
            assert torch.equal(out.labels[0, a : a + n_], labels[0, src])
            assert (out.labels[0, a + n_ : b] == IGNORE_INDEX).all()
            assert out.loss_mask[0, a : a + n_].all() and not out.loss_mask[0, a + n_ : b].any()

        params = build_packed_seq_params(out.cu_seqlens, out.cu_seqlens_padded)
        assert params.qkv_format == "thd"
        assert params.cu_seqlens_q is params.cu_seqlens_kv
        assert torch.equal(params.cu_seqlens_q, out.cu_seqlens)
        assert torch.equal(params.cu_seqlens_q_padded, out.cu_seqlens_padded)
        assert torch.equal(params.cu_seqlens_kv_padded, out.cu_seqlens_padded)
        assert params.cu_seqlens_q.dtype == params.cu_seqlens_q_padded.dtype == torch.int32
        assert params.max_seqlen_q == params.max_seqlen_kv == max(padded)


def test_pad_thd_errors():
    emb = torch.zeros(10, 1, 2)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 9 but the packed row has 10"):
        pad_thd(emb, cu_seqlens=torch.tensor([0, 4, 9]), factor=4)
    with pytest.raises(ValueError, match="strictly increasing; sequence 1 has length 0"):
        pad_thd(emb, cu_seqlens=torch.tensor([0, 4, 4, 10]), factor=4)
    with pytest.raises(ValueError, match="batch size 1"):
        pad_thd(torch.zeros(10, 2, 2), cu_seqlens=torch.tensor([0, 10]), factor=4)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 0"):
        cu_seqlens_from_lengths([3, 0])


# --- CP split


def _inverse_concat(chunks, indices, dim):
    """Undo the split: place every rank's chunk at its global indices."""
    cat = torch.cat(chunks, dim)
    order = torch.cat(indices)
    return cat.index_select(dim, torch.argsort(order))


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_split_roundtrip_bshd(cp):
    s = 8 * 5
    emb = torch.randn(s, 2, 3)  # [s, b, h]
    labels = torch.randint(0, 9, (2, s))  # [b, s]
    for x, dim in ((emb, 0), (labels, 1)):
        chunks = [cp_split(x, dim, cp, r) for r in range(cp)]
        idx = [cp_local_indices(s, cp, r) for r in range(cp)]
        for r in range(cp):
            assert torch.equal(chunks[r], x.index_select(dim, idx[r]))
            assert chunks[r].shape[dim] == s // cp
        assert torch.equal(_inverse_concat(chunks, idx, dim), x)
    if cp > 1:  # rank 0 keeps chunks 0 and 2*cp-1
        c = s // (2 * cp)
        assert cp_local_indices(s, cp, 0).tolist() == [*range(c), *range(s - c, s)]


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_split_roundtrip_thd(cp):
    g = torch.Generator().manual_seed(cp)
    lengths = torch.randint(1, 40, (6,), generator=g)
    f = shard_factor(1, cp, False)
    t = int(lengths.sum())
    out = pad_thd(
        torch.randn(t, 1, 4, generator=g), cu_seqlens=cu_seqlens_from_lengths(lengths), factor=f
    )
    cu_p = out.cu_seqlens_padded
    chunks = [cp_split(out.embeddings, 0, cp, r, cu_p) for r in range(cp)]
    idx = [thd_cp_local_indices(cu_p, cp, r) for r in range(cp)]
    assert torch.equal(_inverse_concat(chunks, idx, 0), out.embeddings)
    # each rank holds 1/cp of every sequence, sequence by sequence
    for r in range(cp):
        seq_of = torch.bucketize(idx[r], cu_p[1:].long(), right=True)
        counts = torch.bincount(seq_of, minlength=len(lengths))
        assert torch.equal(counts, (cu_p[1:] - cu_p[:-1]).long() // cp)


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_causal_work_balanced(cp):
    # query at position q attends to q + 1 keys under a causal mask
    s = 2 * cp * 7
    work = [int((cp_local_indices(s, cp, r) + 1).sum()) for r in range(cp)]
    assert len(set(work)) == 1 and sum(work) == s * (s + 1) // 2
    cu_p = cu_seqlens_from_lengths([2 * cp * 3, 2 * cp * 10, 2 * cp])
    work = []
    for r in range(cp):
        idx = thd_cp_local_indices(cu_p, cp, r)
        seq_of = torch.bucketize(idx, cu_p[1:].long(), right=True)
        work.append(int((idx - cu_p[seq_of] + 1).sum()))
    assert len(set(work)) == 1


def test_split_errors():
    with pytest.raises(
        ValueError, match=r"sequence length 37 of x \(dim 0\) is not divisible by 2\*CP=4"
    ):
        cp_split(torch.zeros(37, 1), 0, 2, 0)
    with pytest.raises(
        ValueError, match="cu_seqlens_padded: sequence 1 has length 6, not a multiple of 2.CP=4"
    ):
        thd_cp_local_indices(torch.tensor([0, 8, 14]), 2, 1)
    with pytest.raises(ValueError, match="cp_rank=2 out of range for cp_size=2"):
        cp_local_indices(8, 2, 2)


def test_zigzag_positions_cover_sequence():
    lens = torch.tensor([8, 16])
    cp = 2
    got = [zigzag_positions(lens, cp, r) for r in range(cp)]
    assert got[0][1][:2].tolist() == [0, 1] and got[0][1][2:4].tolist() == [6, 7]
    for sid, n in enumerate(lens.tolist()):
        pos = torch.cat([p[i == sid] for i, p in got])
        assert sorted(pos.tolist()) == list(range(n))
    with pytest.raises(ValueError, match="not a multiple of 2\\*CP=4"):
        zigzag_positions(torch.tensor([6]), 2, 0)


def _zigzag_loop(seq_lens, cp, rank):
    """Reference: the per-sequence Python loop the vectorised version replaced."""
    ids, poss = [], []
    for i, n in enumerate(seq_lens):
        c = n // (2 * cp)
        for chunk in (rank, 2 * cp - 1 - rank):
            poss += list(range(chunk * c, (chunk + 1) * c))
            ids += [i] * c
    return ids, poss


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_zigzag_positions_match_loop(cp):
    g = torch.Generator().manual_seed(cp)
    lens = 2 * cp * torch.randint(1, 6, (5,), generator=g)
    for r in range(cp):
        seq_id, pos = zigzag_positions(lens, cp, r)
        assert (seq_id.tolist(), pos.tolist()) == _zigzag_loop(lens.tolist(), cp, r)


# --- SP and the whole padder


class _FakeGroup:
    """Just enough of a ProcessGroup for the padder's size check (no collectives run)."""

    def __init__(self, size):
        self._size = size

    def size(self):
        return self._size


def test_single_rank_scatter_is_identity():
    x = torch.arange(24.0).view(12, 2, 1)  # [s/cp, b, h]
    assert scatter_to_sequence_parallel(x, None) is x
    assert scatter_to_sequence_parallel(x, _FakeGroup(1)) is x
    with pytest.raises(ValueError, match="not divisible by TP=5"):
        scatter_to_sequence_parallel(x, _FakeGroup(5))


@pytest.mark.parametrize("packed", [False, True])
def test_cppadder_all_ranks_single_process(packed):
    tp, cp, s, b, h = 2, 2, 53, 1 if packed else 2, 4
    emb = torch.randn(s, b, h)
    labels = torch.randint(0, 9, (b, s))
    mask = torch.ones(b, s)
    lengths = [20, 33] if packed else None
    locals_ = []
    for cp_rank in range(cp):
        padder = CPPadder(tp, cp, True, cp_rank=cp_rank, tp_group=_FakeGroup(tp))
        assert padder.factor == 8
        out = padder.pad_and_split(emb, labels, mask, seq_lengths=lengths)
        assert out.labels.shape == (b, out.padded_seq_len // cp)  # labels are not SP-split
        assert out.embeddings.shape == (out.padded_seq_len // cp, b, h)  # SP scatter: prepare
        locals_.append(out)
    params = locals_[0].packed_seq_params
    if packed:
        cu_p = params.cu_seqlens_q_padded
        idx = [thd_cp_local_indices(cu_p, cp, r) for r in range(cp)]
    else:
        idx = [cp_local_indices(locals_[0].padded_seq_len, cp, r) for r in range(cp)]
    full = _inverse_concat([o.embeddings for o in locals_], idx, 0)
    full_labels = _inverse_concat([o.labels for o in locals_], idx, 1)
    if packed:
        assert cu_p.tolist() == [0, 24, 64]
        assert params.cu_seqlens_q.tolist() == [0, 20, 53]
        assert torch.equal(full[:20], emb[:20]) and torch.equal(full[24:57], emb[20:])
        assert (full_labels[0, 20:24] == IGNORE_INDEX).all()
    else:
        assert params is None and locals_[0].padded_seq_len == 56
        assert torch.equal(full[:s], emb) and not full[s:].any()
        assert torch.equal(full_labels[:, :s], labels)


def test_cppadder_errors():
    with pytest.raises(ValueError, match="cp_rank=2 out of range for cp_size=2"):
        CPPadder(cp=2, cp_rank=2)
    with pytest.raises(ValueError, match="sequence_parallel with tp=2 needs tp_group"):
        CPPadder(tp=2, sequence_parallel=True)
    with pytest.raises(ValueError, match="tp_group has 4 ranks but tp=2"):
        CPPadder(tp=2, sequence_parallel=True, tp_group=_FakeGroup(4))
    with pytest.raises(ValueError, match="need at least one of"):
        CPPadder().prepare(None)


def test_import_is_cheap():
    code = "import sys, mm_megatron.parallel.cp_padding; assert 'megatron' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
