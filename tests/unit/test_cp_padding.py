"""Tests for mm_megatron.parallel.cp_padding (CPU only; one small 2-process gloo test)."""

import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mm_megatron.parallel.cp_padding import (
    IGNORE_INDEX,
    CPPadder,
    build_packed_seq_params,
    cp_gather,
    cp_local_indices,
    cp_split,
    cu_seqlens_from_lengths,
    pad_along,
    pad_bshd,
    pad_thd,
    padded_length,
    padding_for,
    scatter_to_sequence_parallel,
    shard_factor,
    sp_split,
    thd_cp_local_indices,
)

# --- arithmetic


@pytest.mark.parametrize(
    "tp, cp, sp, fp8, length, expected",
    [
        # megatron.core.models.multimodal.context_parallel.get_padding's pinned cases
        (1, 1, False, None, 99, 0),
        (2, 2, True, None, 99, 5),
        (2, 2, False, None, 99, 1),
        (4, 1, False, "e4m3", 99, 13),
        # same with SP: lcm(tp=4, 16) = 16; megatron's elif chain gives 1 (factor 4) here
        (4, 1, True, "e4m3", 99, 13),
    ],
)
def test_megatron_pinned_cases(tp, cp, sp, fp8, length, expected):
    assert padding_for(length, shard_factor(tp, cp, sp, fp8)) == expected


@pytest.mark.parametrize(
    "tp, cp, sp, fp8, factor, padding_99",
    [
        (2, 2, True, "e4m3", 16, 13),  # lcm(2*2*2, 16); megatron: 8 -> 5
        (1, 4, False, "mxfp8", 32, 29),  # lcm(8, 32); megatron: 8 -> 5
        (1, 3, False, "hybrid", 48, 45),  # lcm(6, 16); megatron: 6 -> 3
        (3, 2, True, "mxfp8", 96, 93),  # lcm(12, 3, 32)
        (3, 1, True, "delayed", 48, 45),  # lcm(3, 16)
        (2, 3, True, None, 12, 9),  # 2*cp*tp
        (8, 1, False, None, 1, 0),  # TP without SP needs nothing
        (1, 1, False, "mxfp8", 32, 29),
    ],
)
def test_combined_lcm_cases(tp, cp, sp, fp8, factor, padding_99):
    assert shard_factor(tp, cp, sp, fp8) == factor
    assert padding_for(99, factor) == padding_99
    assert padded_length(99, factor) == 99 + padding_99


def _applicable(tp, cp, sp, fp8):
    out = []
    if cp > 1:
        out.append(2 * cp * tp if sp else 2 * cp)
    if sp:
        out.append(tp)
    if fp8:
        out.append(32 if fp8 == "mxfp8" else 16)
    return out


def test_factor_properties_grid():
    for tp in (1, 2, 3, 4, 8):
        for cp in (1, 2, 3, 4, 6):
            for sp in (False, True):
                for fp8 in (None, "e4m3", "mxfp8"):
                    f = shard_factor(tp, cp, sp, fp8)
                    fs = _applicable(tp, cp, sp, fp8)
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
        ((0, 1, False, None), "tp must be >= 1"),
        ((1, -2, False, None), "cp must be >= 1"),
        ((True, 1, False, None), "tp must be an int"),
        ((2, 1, "yes", None), "sequence_parallel must be a bool"),
        ((2, 1, True, ""), "fp8 must be None"),
        ((2, 1, True, True), "fp8 must be None"),
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
    pos = torch.arange(s).expand(b, s) + torch.tensor([[0], [5]])
    out = pad_bshd(emb, labels, mask, pos, factor=f)
    assert out.padding == 3 and out.embeddings.shape == (40, b, h)
    assert torch.equal(out.embeddings[:s], emb) and not out.embeddings[s:].any()
    assert torch.equal(out.labels[:, :s], labels) and (out.labels[:, s:] == IGNORE_INDEX).all()
    assert out.loss_mask.dtype == torch.bool and not out.loss_mask[:, s:].any()
    assert torch.equal(out.position_ids[0, s:], torch.tensor([37, 38, 39]))
    assert torch.equal(out.position_ids[1, s:], torch.tensor([42, 43, 44]))
    out.embeddings.sum().backward()
    assert torch.equal(emb.grad, torch.ones_like(emb))
    # already aligned: returned as is; Nones stay None
    same = pad_bshd(out.embeddings, None, None, None, factor=f)
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
        pos = torch.cat([torch.arange(int(n_)) for n_ in lengths]).unsqueeze(0)
        out = pad_thd(emb, labels, mask, pos, cu_seqlens=cu, factor=factor)

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
            assert torch.equal(out.position_ids[0, a:b], torch.arange(b - a))  # continuing

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
        ValueError, match="sequence 1 has length 6, which is not divisible by 2.CP=4"
    ):
        thd_cp_local_indices(torch.tensor([0, 8, 14]), 2, 1)
    with pytest.raises(ValueError, match="cp_rank=2 out of range for cp_size=2"):
        cp_local_indices(8, 2, 2)


# --- SP and single-rank paths


def test_sp_split_and_single_rank_paths():
    x = torch.arange(24.0).view(12, 2, 1)  # [s/cp, b, h]
    parts = [sp_split(x, 3, r) for r in range(3)]
    assert torch.equal(torch.cat(parts), x) and parts[1].shape == (4, 2, 1)
    with pytest.raises(ValueError, match="not divisible by TP=5"):
        sp_split(x, 5, 0)
    assert not dist.is_initialized()
    assert scatter_to_sequence_parallel(x, None) is x
    assert cp_gather(x, 0, None) is x
    assert CPPadder().gather(x, 0) is x


@pytest.mark.parametrize("packed", [False, True])
def test_cppadder_all_ranks_single_process(packed):
    tp, cp, s, b, h = 2, 2, 53, 1 if packed else 2, 4
    emb = torch.randn(s, b, h)
    labels = torch.randint(0, 9, (b, s))
    mask = torch.ones(b, s)
    pos = torch.arange(s).expand(b, s)
    lengths = [20, 33] if packed else None
    locals_, embs = [], []
    for cp_rank in range(cp):
        per_tp = []
        for tp_rank in range(tp):
            padder = CPPadder(tp, cp, True, "e4m3", cp_rank=cp_rank, tp_rank=tp_rank)
            out = padder(emb, labels, mask, pos, seq_lengths=lengths)
            per_tp.append(out.embeddings)
        assert out.factor == 16
        assert out.labels.shape == (b, out.padded_seq_len // cp)  # labels are not SP-split
        assert per_tp[0].shape == (out.padded_seq_len // (cp * tp), b, h)
        locals_.append(out)
        embs.append(torch.cat(per_tp))  # undo SP
    cu_p = locals_[0].packed_seq_params.cu_seqlens_q_padded if packed else None
    full = _inverse_concat(embs, [o.local_indices for o in locals_], 0)
    full_labels = _inverse_concat(
        [o.labels for o in locals_], [o.local_indices for o in locals_], 1
    )
    if packed:
        assert cu_p.tolist() == [0, 32, 80]
        assert locals_[0].packed_seq_params.cu_seqlens_q.tolist() == [0, 20, 53]
        assert torch.equal(full[:20], emb[:20]) and torch.equal(full[32:65], emb[20:])
        assert (full_labels[0, 20:32] == IGNORE_INDEX).all()
    else:
        assert locals_[0].packed_seq_params is None and locals_[0].padded_seq_len == 64
        assert torch.equal(full[:s], emb) and not full[s:].any()
        assert torch.equal(full_labels[:, :s], labels)


def test_cppadder_errors():
    with pytest.raises(ValueError, match="cp=2 needs cp_rank or cp_group"):
        CPPadder(cp=2)(torch.zeros(8, 1, 1))
    with pytest.raises(ValueError, match="needs tp_group or tp_rank"):
        CPPadder(tp=2, sequence_parallel=True)(torch.zeros(8, 1, 1))
    with pytest.raises(ValueError, match="either seq_lengths or cu_seqlens"):
        CPPadder()(torch.zeros(8, 1, 1), seq_lengths=[8], cu_seqlens=torch.tensor([0, 8]))


# --- real processes (gloo)


def _gather_worker(rank, world, init_file):
    assert "megatron" not in sys.modules  # importing cp_padding must not pull in megatron
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        g = torch.Generator().manual_seed(0)  # same data on every rank
        s, b, h = 8 * world, 2, 3
        x = torch.randn(s, b, h, generator=g)
        w = torch.randn(s, b, h, generator=g)
        mine = cp_local_indices(s, world, rank)

        # BSHD, identical loss on all ranks: grad is this rank's slice of w
        local = cp_split(x, 0, world, rank).requires_grad_()
        full = cp_gather(local, 0, group)
        assert torch.equal(full, x)
        (full * w).sum().backward()
        assert torch.equal(local.grad, w[mine])

        # grad_reduce: different loss per rank, grads summed over the group
        local = cp_split(x, 0, world, rank).requires_grad_()
        full = cp_gather(local, 0, group, grad_reduce=True)
        (full * w * (rank + 1)).sum().backward()
        assert torch.allclose(local.grad, w[mine] * sum(range(1, world + 1)))

        # THD, [b, s] layout, through CPPadder.gather
        labels = torch.randint(0, 9, (1, 37), generator=g)
        padded = pad_thd(None, labels, cu_seqlens=cu_seqlens_from_lengths([10, 27]), factor=4)
        cu_p = padded.cu_seqlens_padded
        assert cu_p.tolist() == [0, 12, 40]
        local = cp_split(padded.labels, 1, world, rank, cu_p)
        full_labels = CPPadder(cp=world, cp_group=group).gather(local, 1, cu_p)
        assert torch.equal(full_labels, padded.labels)
        assert "megatron" not in sys.modules
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_cp_gather_two_gloo_processes(tmp_path):
    world = 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_gather_worker, args=(world, str(tmp_path / "pg_init")), nprocs=world, join=True)
