"""Context-/sequence-parallel padding and splitting of the decoder input.

Runs after image-token expansion and before the language decoder. It:

* computes the shard factor the combined image+text sequence must be a multiple of: the least
  common multiple of the CP, SP and FP8 requirements (megatron's ``get_padding`` uses an elif
  chain and drops the FP8 multiple whenever SP or CP is on);
* pads BSHD rows at the end, and packed THD rows per sequence (embeddings with 0, labels with
  -100, loss mask with 0, position ids continuing), and builds megatron's ``PackedSeqParams``;
* splits the sequence over CP ranks with causal load balancing (2*CP chunks, rank r keeps chunks
  r and 2*CP-1-r; per sequence for THD), gives the global positions of a rank's tokens (for a
  zig-zag causal mask), and gathers the split back (``cp_gather``, autograd-aware);
* scatters the CP-local embeddings to the sequence-parallel region.

It does NOT expand image tokens, build attention masks or rotary embeddings, split labels for SP
(megatron's output layer gathers SP before the loss), or fetch process groups from megatron's
globals: groups, ranks and sizes are arguments, and ``group=None`` / size-1 paths never touch
``torch.distributed``. Megatron is imported lazily (``PackedSeqParams`` and the SP scatter op
only), so importing this module is cheap.

Layouts follow megatron: embeddings are sequence-first ``[s, b, h]``; labels, loss mask and
position ids are ``[b, s]``. A packed THD row is ``[t, 1, h]`` / ``[1, t]`` (``b == 1``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:  # pragma: no cover
    from megatron.core.packed_seq_params import PackedSeqParams

IGNORE_INDEX = -100
FP8_FACTOR = 16
MXFP8_FACTOR = 32


# --- arithmetic


def _check_int(name: str, value, minimum: int) -> int:
    # ValueError (not TypeError) on purpose: every bad argument raises the same exception type.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")  # noqa: TRY004
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def shard_factor(tp: int, cp: int, sequence_parallel: bool, fp8: str | None = None) -> int:
    """Multiple the combined (pre-split) sequence length must be padded to.

    Applicable factors: ``2*cp*tp`` (SP and cp > 1), ``2*cp`` (cp > 1, no SP), ``tp`` (SP),
    16 for FP8 (32 for ``"mxfp8"``). All that apply are combined by least common multiple.

    Args:
        tp: Tensor-parallel size of the language model (>= 1).
        cp: Context-parallel size (>= 1).
        sequence_parallel: Whether sequence parallelism is on (only matters with tp > 1).
        fp8: None for no FP8, else the FP8 format/recipe name (``"e4m3"``, ``"hybrid"``,
            ``"delayed"``, ...); ``"mxfp8"`` needs 32, any other name 16.

    Returns:
        The shard factor (>= 1).
    """
    _check_int("tp", tp, 1)
    _check_int("cp", cp, 1)
    if not isinstance(sequence_parallel, bool):
        msg = f"sequence_parallel must be a bool, got {sequence_parallel!r}"
        raise ValueError(msg)  # noqa: TRY004
    if fp8 is not None and (not isinstance(fp8, str) or not fp8):
        raise ValueError(
            f"fp8 must be None or a non-empty FP8 format/recipe name ('e4m3', 'hybrid', "
            f"'delayed', 'mxfp8', ...), got {fp8!r}"
        )
    factors = [1]
    if cp > 1:
        factors.append(2 * cp * tp if sequence_parallel else 2 * cp)
    if sequence_parallel:
        factors.append(tp)
    if fp8 is not None:
        factors.append(MXFP8_FACTOR if fp8.lower() == "mxfp8" else FP8_FACTOR)
    return math.lcm(*factors)


def padding_for(length: int, factor: int) -> int:
    """``ceil(length / factor) * factor - length``: tokens to append, in ``[0, factor)``."""
    _check_int("length", length, 0)
    _check_int("factor", factor, 1)
    return -length % factor


def padded_length(length: int, factor: int) -> int:
    """``length`` rounded up to a multiple of ``factor`` (see ``padding_for``)."""
    return length + padding_for(length, factor)


# --- padding


@dataclass
class PaddedBatch:
    """Padded decoder inputs; tensors passed as None stay None.

    Attributes:
        embeddings: ``[s_pad, b, h]``, pad rows are 0.
        labels: ``[b, s_pad]``, pad is ``IGNORE_INDEX`` (-100).
        loss_mask: ``[b, s_pad]``, pad is 0.
        position_ids: ``[b, s_pad]``, pad continues from the last valid id.
        padding: Tokens added (THD: summed over the sequences).
        cu_seqlens: THD only: int32 ``[n + 1]`` cumulative valid lengths.
        cu_seqlens_padded: THD only: int32 ``[n + 1]`` cumulative padded lengths.
    """

    embeddings: torch.Tensor | None
    labels: torch.Tensor | None
    loss_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    padding: int
    cu_seqlens: torch.Tensor | None = None
    cu_seqlens_padded: torch.Tensor | None = None


def pad_along(x: torch.Tensor, dim: int, padding: int, value) -> torch.Tensor:
    """Append ``padding`` (>= 0) entries of ``value`` along ``dim`` (any dtype, autograd-safe)."""
    _check_int("padding", padding, 0)
    if padding == 0:
        return x
    shape = list(x.shape)
    shape[dim] = padding
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def _check_shapes(embeddings, labels, loss_mask, position_ids) -> tuple[int, int]:
    """Returns (s, b) after checking ``[s, b, h]`` embeddings against ``[b, s]`` tensors."""
    seq = batch = None
    if embeddings is not None:
        if embeddings.dim() < 2:
            raise ValueError(f"embeddings must be [s, b, h], got shape {tuple(embeddings.shape)}")
        seq, batch = embeddings.shape[0], embeddings.shape[1]
    for name, t in (("labels", labels), ("loss_mask", loss_mask), ("position_ids", position_ids)):
        if t is None:
            continue
        if t.dim() != 2:
            raise ValueError(f"{name} must be [b, s], got shape {tuple(t.shape)}")
        if seq is None:
            seq, batch = t.shape[1], t.shape[0]
        elif tuple(t.shape) != (batch, seq):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected [b, s] = [{batch}, {seq}] "
                "(embeddings are [s, b, h])"
            )
    if seq is None:
        raise ValueError("need at least one of embeddings, labels, loss_mask, position_ids")
    return seq, batch


def pad_bshd(
    embeddings: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    factor: int,
) -> PaddedBatch:
    """Pad a BSHD batch at the end of the sequence to a multiple of ``factor``.

    Position ids continue (``last + 1, last + 2, ...``) rather than being 0: with causal
    attention valid tokens never attend to the trailing pads, and monotonic ids keep pads from
    looking like the start of a new sequence to position-based masks or packers.

    Args:
        embeddings: ``[s, b, h]`` or None.
        labels, loss_mask, position_ids: ``[b, s]`` or None.
        factor: Shard factor (see ``shard_factor``).

    Returns:
        A ``PaddedBatch`` of sequence length ``padded_length(s, factor)``.
    """
    seq, _ = _check_shapes(embeddings, labels, loss_mask, position_ids)
    pad = padding_for(seq, factor)
    pos = position_ids
    if pos is not None and pad:
        start = pos[:, -1:] + 1 if seq else pos.new_zeros(pos.shape[0], 1)
        pos = torch.cat([pos, start + torch.arange(pad, device=pos.device, dtype=pos.dtype)], 1)
    return PaddedBatch(
        embeddings=None if embeddings is None else pad_along(embeddings, 0, pad, 0),
        labels=None if labels is None else pad_along(labels, 1, pad, IGNORE_INDEX),
        loss_mask=None if loss_mask is None else pad_along(loss_mask, 1, pad, 0),
        position_ids=pos,
        padding=pad,
    )


def cu_seqlens_from_lengths(
    lengths: Sequence[int] | torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """int32 cumulative lengths with a leading 0: ``[l0, l1] -> [0, l0, l0 + l1]``."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=device).reshape(-1)
    if lengths.numel() == 0:
        raise ValueError("lengths must name at least one sequence")
    if bool((lengths <= 0).any()):
        bad = int(torch.nonzero(lengths <= 0)[0, 0])
        raise ValueError(f"lengths[{bad}] = {int(lengths[bad])}; sequences must be non-empty")
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).to(torch.int32)


def _seq_lengths(cu_seqlens: torch.Tensor, name: str) -> torch.Tensor:
    """Validates ``cu_seqlens`` and returns the int64 per-sequence lengths."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be a 1-D integer tensor [n + 1] with a leading 0")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {cu_seqlens.dtype}")
    if int(cu_seqlens[0]) != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(cu_seqlens[0])}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    if bool((lengths <= 0).any()):
        bad = int(torch.nonzero(lengths <= 0)[0, 0])
        raise ValueError(
            f"{name} must be strictly increasing; sequence {bad} has length {int(lengths[bad])}"
        )
    return lengths


def pad_thd(
    embeddings: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor,
    factor: int,
) -> PaddedBatch:
    """Pad every sequence of a packed (THD) row to a multiple of ``factor``.

    Each sequence's pads follow its valid tokens. Position ids, if given, continue within each
    sequence from its last valid id (they are never reset, see ``pad_bshd``).

    Args:
        embeddings: ``[t, 1, h]`` or None, ``t == cu_seqlens[-1]``.
        labels, loss_mask, position_ids: ``[1, t]`` or None.
        cu_seqlens: int ``[n + 1]`` cumulative valid lengths with a leading 0.
        factor: Shard factor, applied to each sequence.

    Returns:
        A ``PaddedBatch`` of length ``cu_seqlens_padded[-1]`` with int32 ``cu_seqlens`` and
        ``cu_seqlens_padded`` on the device of ``cu_seqlens``.
    """
    _check_int("factor", factor, 1)
    seq, batch = _check_shapes(embeddings, labels, loss_mask, position_ids)
    if batch != 1:
        raise ValueError(f"packed (THD) inputs must have batch size 1, got {batch}")
    lengths = _seq_lengths(cu_seqlens, "cu_seqlens")
    if int(cu_seqlens[-1]) != seq:
        raise ValueError(
            f"cu_seqlens[-1] = {int(cu_seqlens[-1])} but the packed row has {seq} tokens; "
            "slice off any trailing padding first"
        )
    padded = (lengths + factor - 1) // factor * factor
    cu_padded = cu_seqlens_from_lengths(padded, device=cu_seqlens.device)
    total, dev = int(cu_padded[-1]), lengths.device
    # Per slot of the padded row: its sequence, offset inside it, and whether it is a pad.
    seq_of_slot = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), padded)
    offset = torch.arange(total, device=dev) - cu_padded[:-1].to(torch.int64)[seq_of_slot]
    is_pad = offset >= lengths[seq_of_slot]
    dest = torch.nonzero(~is_pad).reshape(-1)  # slot of each valid token, in packed order

    def scatter(x: torch.Tensor | None, dim: int, value) -> torch.Tensor | None:
        if x is None:
            return None
        shape = list(x.shape)
        shape[dim] = total
        return x.new_full(shape, value).index_copy(dim, dest.to(x.device), x)

    pos = scatter(position_ids, 1, 0)
    if pos is not None and total > seq:
        pdev = position_ids.device
        last = position_ids[0, (cu_seqlens[1:] - 1).to(device=pdev, dtype=torch.int64)]
        seq_p = seq_of_slot[is_pad].to(pdev)
        step = offset[is_pad].to(pdev) - lengths.to(pdev)[seq_p] + 1  # 1, 2, ... per sequence
        pos[0, is_pad.to(pdev)] = last[seq_p] + step.to(pos.dtype)
    return PaddedBatch(
        embeddings=scatter(embeddings, 0, 0),  # [t_pad, 1, h]
        labels=scatter(labels, 1, IGNORE_INDEX),  # [1, t_pad]
        loss_mask=scatter(loss_mask, 1, 0),
        position_ids=pos,
        padding=total - seq,
        cu_seqlens=cu_seqlens.to(torch.int32),
        cu_seqlens_padded=cu_padded,
    )


def build_packed_seq_params(
    cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor
) -> PackedSeqParams:
    """Megatron ``PackedSeqParams`` (``qkv_format="thd"``) for a padded packed row.

    The cu_seqlens describe the GLOBAL (pre-CP-split) row, which is what Transformer Engine
    expects with CP. ``max_seqlen_q/kv`` is the longest padded sequence. ``pad_between_seqs``
    is left None so TE infers it from the two cu_seqlens.

    Args:
        cu_seqlens: int ``[n + 1]`` cumulative valid lengths (stored as int32).
        cu_seqlens_padded: int ``[n + 1]`` cumulative padded lengths (stored as int32).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = _seq_lengths(cu_seqlens, "cu_seqlens")
    padded = _seq_lengths(cu_seqlens_padded, "cu_seqlens_padded")
    if lengths.shape != padded.shape or bool((padded < lengths.to(padded.device)).any()):
        raise ValueError(
            "cu_seqlens_padded must describe the same sequences as cu_seqlens, each at least "
            "as long as its valid length"
        )
    cu, cu_pad = cu_seqlens.to(torch.int32), cu_seqlens_padded.to(torch.int32)
    max_len = int(padded.max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu_pad,
        cu_seqlens_kv_padded=cu_pad,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )


# --- CP split / gather


def _check_rank(size_name: str, size: int, rank: int) -> None:
    rank_name = size_name.replace("size", "rank")
    _check_int(size_name, size, 1)
    _check_int(rank_name, rank, 0)
    if rank >= size:
        raise ValueError(f"{rank_name}={rank} out of range for {size_name}={size}")


def _zigzag(starts: torch.Tensor, lens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global indices of chunks r and 2cp-1-r of every sequence (start, padded length)."""
    dev = lens.device
    chunk = lens // (2 * cp_size)
    local = 2 * chunk  # tokens per sequence on this rank
    seq_of = torch.repeat_interleave(torch.arange(lens.numel(), device=dev), local)
    j = torch.arange(int(local.sum()), device=dev) - (torch.cumsum(local, 0) - local)[seq_of]
    c = chunk[seq_of]
    second = j >= c
    chunk_id = torch.where(second, 2 * cp_size - 1 - cp_rank, cp_rank)
    return starts[seq_of] + chunk_id * c + torch.where(second, j - c, j)


def thd_cp_local_indices(
    cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int
) -> torch.Tensor:
    """Row positions CP rank ``cp_rank`` keeps: the zig-zag split applied to each sequence.

    For a returned index ``i``, its sequence is ``bucketize(i, cu_seqlens_padded[1:],
    right=True)`` and its position in that sequence ``i - cu_seqlens_padded[seq]``.

    Args:
        cu_seqlens_padded: int ``[n + 1]`` cumulative padded lengths of the global row; each
            length must be divisible by ``2 * cp_size``.
        cp_size: Context-parallel size.
        cp_rank: Rank in the CP group.

    Returns:
        int64 ``[cu_seqlens_padded[-1] / cp_size]``, sequence by sequence, chunk ``cp_rank``
        then chunk ``2*cp_size-1-cp_rank`` of each.
    """
    _check_rank("cp_size", cp_size, cp_rank)
    lens = _seq_lengths(cu_seqlens_padded, "cu_seqlens_padded")
    if cp_size == 1:
        return torch.arange(int(lens.sum()), device=lens.device)
    bad = torch.nonzero(lens % (2 * cp_size)).reshape(-1)
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"cu_seqlens_padded: sequence {i} has length {int(lens[i])}, which is not divisible "
            f"by 2*CP={2 * cp_size} after padding"
        )
    return _zigzag(cu_seqlens_padded[:-1].to(torch.int64), lens, cp_size, cp_rank)


def cp_local_indices(
    seq_len: int, cp_size: int, cp_rank: int, device: torch.device | None = None
) -> torch.Tensor:
    """Global positions ``[seq_len / cp_size]`` (int64) of the tokens CP rank ``cp_rank`` keeps.

    One sequence (BSHD): chunk ``cp_rank`` then chunk ``2*cp_size-1-cp_rank`` of ``2*cp_size``;
    ``seq_len`` must be divisible by ``2 * cp_size``.
    """
    _check_rank("cp_size", cp_size, cp_rank)
    _check_int("seq_len", seq_len, 0)
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2*CP={2 * cp_size} after padding"
        )
    lens = torch.full((1,), seq_len, dtype=torch.int64, device=device)
    return _zigzag(torch.zeros_like(lens), lens, cp_size, cp_rank)


def cp_split(
    x: torch.Tensor,
    seq_dim: int,
    cp_size: int,
    cp_rank: int,
    cu_seqlens_padded: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep this CP rank's load-balanced part of ``x`` along ``seq_dim`` (autograd-safe).

    Args:
        x: Full padded tensor, e.g. ``[s, b, h]`` (``seq_dim=0``) or ``[b, s]`` (``seq_dim=1``).
        seq_dim: Sequence dimension of ``x``.
        cp_size: Context-parallel size; 1 returns ``x`` unchanged.
        cp_rank: Rank in the CP group.
        cu_seqlens_padded: THD only: cumulative padded lengths; the split is per sequence.

    Returns:
        ``x`` with ``seq_dim`` divided by ``cp_size``, e.g. ``[s/cp, b, h]``.
    """
    _check_rank("cp_size", cp_size, cp_rank)
    if cp_size == 1:
        return x
    seq_len = x.shape[seq_dim]
    if cu_seqlens_padded is not None:
        if int(cu_seqlens_padded[-1]) != seq_len:
            raise ValueError(
                f"cu_seqlens_padded[-1] = {int(cu_seqlens_padded[-1])} does not match the "
                f"sequence length {seq_len} of x (dim {seq_dim})"
            )
        idx = thd_cp_local_indices(cu_seqlens_padded, cp_size, cp_rank).to(x.device)
        return x.index_select(seq_dim, idx)
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_len} of x (dim {seq_dim}) is not divisible by "
            f"2*CP={2 * cp_size} after padding"
        )
    c = seq_len // (2 * cp_size)
    first = x.narrow(seq_dim, cp_rank * c, c)
    second = x.narrow(seq_dim, (2 * cp_size - 1 - cp_rank) * c, c)
    return torch.cat([first, second], dim=seq_dim)


class _CPGather(torch.autograd.Function):
    """All-gather along the sequence dim and undo the zig-zag permutation."""

    @staticmethod
    def forward(ctx, x, seq_dim, group, cu_seqlens_padded, grad_reduce):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        x0 = x.movedim(seq_dim, 0).contiguous()  # [s/cp, ...]
        parts = [torch.empty_like(x0) for _ in range(world)]
        dist.all_gather(parts, x0, group=group)
        full_len = x0.shape[0] * world
        if cu_seqlens_padded is None:
            per_rank = [cp_local_indices(full_len, world, r, x.device) for r in range(world)]
        else:
            cu = cu_seqlens_padded.to(x.device)
            per_rank = [thd_cp_local_indices(cu, world, r) for r in range(world)]
        full = x0.new_empty((full_len, *x0.shape[1:]))  # [s, ...]
        full[torch.cat(per_rank)] = torch.cat(parts)
        ctx.seq_dim, ctx.group, ctx.grad_reduce = seq_dim, group, grad_reduce
        ctx.save_for_backward(per_rank[rank])
        return full.movedim(0, seq_dim)

    @staticmethod
    def backward(ctx, grad):
        (mine,) = ctx.saved_tensors
        g0 = grad.movedim(ctx.seq_dim, 0).contiguous()  # [s, ...]
        if ctx.grad_reduce:
            dist.all_reduce(g0, op=dist.ReduceOp.SUM, group=ctx.group)
        return g0.index_select(0, mine).movedim(0, ctx.seq_dim), None, None, None, None


def cp_gather(
    x: torch.Tensor,
    seq_dim: int,
    cp_group: dist.ProcessGroup | None,
    cu_seqlens_padded: torch.Tensor | None = None,
    grad_reduce: bool = False,
) -> torch.Tensor:
    """Inverse of ``cp_split``: all-gather over the CP group and restore sequence order.

    Autograd-aware. Backward returns this rank's slice of the incoming gradient. Keep
    ``grad_reduce=False`` when every rank computes the same function of the gathered tensor;
    pass True when ranks compute different things, so the gradients are summed over the group
    first (the all-gather's true adjoint, a reduce-scatter).

    Args:
        x: This rank's part, e.g. ``[s/cp, b, h]``; same shape on every rank.
        seq_dim: Sequence dimension of ``x``.
        cp_group: CP process group; None (or a size-1 group) returns ``x`` unchanged, without
            touching ``torch.distributed`` for None.
        cu_seqlens_padded: THD only: the global cumulative padded lengths (same on all ranks).
        grad_reduce: Sum gradients over the CP group in backward.

    Returns:
        The full tensor, e.g. ``[s, b, h]``.
    """
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return x
    return _CPGather.apply(x, seq_dim, cp_group, cu_seqlens_padded, grad_reduce)


# --- SP scatter


def sp_split(x: torch.Tensor, tp_size: int, tp_rank: int, seq_dim: int = 0) -> torch.Tensor:
    """Keep contiguous chunk ``tp_rank`` of ``tp_size`` along ``seq_dim``: plain slicing.

    The forward of megatron's ``scatter_to_sequence_parallel_region`` with no communication in
    backward: for data or tests; inside a model use ``scatter_to_sequence_parallel``. Maps e.g.
    ``[s/cp, b, h]`` to ``[s/(cp*tp), b, h]``.
    """
    _check_rank("tp_size", tp_size, tp_rank)
    seq_len = x.shape[seq_dim]
    if seq_len % tp_size:
        raise ValueError(
            f"local sequence length {seq_len} (dim {seq_dim}) is not divisible by TP={tp_size}"
        )
    c = seq_len // tp_size
    return x.narrow(seq_dim, tp_rank * c, c)


def scatter_to_sequence_parallel(
    x: torch.Tensor, tp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Scatter ``x`` ``[s, b, h]`` to the sequence-parallel region: ``[s/tp, b, h]``.

    For a ``tp_group`` of size > 1 this is megatron's autograd op
    ``tensor_parallel.mappings.scatter_to_sequence_parallel_region`` (forward: keep dim-0 chunk
    tp_rank; backward: all-gather dim 0, which megatron allocates on the current CUDA device, so
    backward needs CUDA). None or a size-1 group returns ``x``.
    """
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return x
    world = dist.get_world_size(tp_group)
    if x.shape[0] % world:
        raise ValueError(f"sequence length {x.shape[0]} (dim 0) is not divisible by TP={world}")
    from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region

    return scatter_to_sequence_parallel_region(x, group=tp_group)


# --- top level


@dataclass
class DecoderInputs:
    """Decoder inputs after padding, CP split and SP scatter.

    Attributes:
        embeddings: ``[s_pad/(cp*tp), b, h]`` after the SP scatter, else ``[s_pad/cp, b, h]``.
        labels: ``[b, s_pad/cp]`` (not SP-split: the output layer gathers SP before the loss).
        loss_mask: ``[b, s_pad/cp]``.
        position_ids: ``[b, s_pad/cp]``, the padded ids of the kept tokens.
        packed_seq_params: THD only, describing the global padded row.
        local_indices: ``[s_pad/cp]`` global (padded-row) position of each CP-local token.
        padded_seq_len: Global padded length ``s_pad``.
        padding: Tokens added before the split.
        factor: The shard factor used.
    """

    embeddings: torch.Tensor | None
    labels: torch.Tensor | None
    loss_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    packed_seq_params: PackedSeqParams | None
    local_indices: torch.Tensor
    padded_seq_len: int
    padding: int
    factor: int


@dataclass(frozen=True)
class CPPadder:
    """Pads, CP-splits and SP-scatters decoder inputs for one parallel configuration.

    Args:
        tp: Tensor-parallel size of the language model.
        cp: Context-parallel size.
        sequence_parallel: Sequence parallelism on.
        fp8: None or the FP8 format/recipe name (see ``shard_factor``).
        cp_rank: Rank in the CP group; taken from ``cp_group`` when None.
        cp_group: CP process group (for ``gather``, and the rank when ``cp_rank`` is None).
        tp_group: TP group for the autograd SP scatter; without it ``tp_rank`` slicing is used.
        tp_rank: Rank in the TP group when there is no ``tp_group``.
    """

    tp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    fp8: str | None = None
    cp_rank: int | None = None
    cp_group: dist.ProcessGroup | None = None
    tp_group: dist.ProcessGroup | None = None
    tp_rank: int | None = None

    @property
    def factor(self) -> int:
        """The shard factor of this configuration."""
        return shard_factor(self.tp, self.cp, self.sequence_parallel, self.fp8)

    def _cp_rank(self) -> int:
        if self.cp_group is not None:
            size, rank = dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)
            if size != self.cp:
                raise ValueError(f"cp_group has {size} ranks but cp={self.cp}")
            if self.cp_rank is not None and self.cp_rank != rank:
                raise ValueError(f"cp_rank={self.cp_rank} but this is rank {rank} of cp_group")
            return rank
        if self.cp_rank is None:
            if self.cp > 1:
                raise ValueError(f"cp={self.cp} needs cp_rank or cp_group")
            return 0
        _check_rank("cp_size", self.cp, self.cp_rank)
        return self.cp_rank

    def _sp_scatter(self, emb: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel or self.tp == 1:
            return emb
        if self.tp_group is not None:
            if dist.get_world_size(self.tp_group) != self.tp:
                size = dist.get_world_size(self.tp_group)
                raise ValueError(f"tp_group has {size} ranks but tp={self.tp}")
            return scatter_to_sequence_parallel(emb, self.tp_group)
        if self.tp_rank is None:
            raise ValueError(f"sequence_parallel with tp={self.tp} needs tp_group or tp_rank")
        return sp_split(emb, self.tp, self.tp_rank, seq_dim=0)

    def prepare(
        self,
        embeddings: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        seq_lengths: Sequence[int] | torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        scatter_sp: bool = True,
    ) -> DecoderInputs:
        """Pad, split over CP and scatter the embeddings to the SP region.

        ``seq_lengths`` or ``cu_seqlens`` (valid lengths of the sequences packed in a ``b == 1``
        row) select THD: each sequence is padded and split on its own and ``packed_seq_params``
        is built. Otherwise every BSHD row is one sequence, padded at the end.

        Args:
            embeddings: ``[s, b, h]`` or None (e.g. on the last pipeline stage).
            labels, loss_mask, position_ids: ``[b, s]`` or None.
            seq_lengths: THD per-sequence valid lengths.
            cu_seqlens: THD cumulative valid lengths with a leading 0 (instead of seq_lengths).
            scatter_sp: Scatter the embeddings to the SP region when SP is on.

        Returns:
            ``DecoderInputs``.
        """
        if seq_lengths is not None and cu_seqlens is not None:
            raise ValueError("pass either seq_lengths or cu_seqlens, not both")
        factor, rank = self.factor, self._cp_rank()
        s = _check_shapes(embeddings, labels, loss_mask, position_ids)[0]
        given = [t for t in (embeddings, labels, loss_mask, position_ids) if t is not None]
        device = given[0].device
        if seq_lengths is not None:
            cu_seqlens = cu_seqlens_from_lengths(seq_lengths, device)
        if cu_seqlens is None:
            batch = pad_bshd(embeddings, labels, loss_mask, position_ids, factor=factor)
            cu_pad = params = None
        else:
            batch = pad_thd(
                embeddings, labels, loss_mask, position_ids, cu_seqlens=cu_seqlens, factor=factor
            )
            cu_pad = batch.cu_seqlens_padded
            params = build_packed_seq_params(batch.cu_seqlens, cu_pad)
        s_pad = s + batch.padding
        if cu_pad is None:
            local = cp_local_indices(s_pad, self.cp, rank, device)
        else:
            local = thd_cp_local_indices(cu_pad, self.cp, rank)

        def split(t: torch.Tensor | None, dim: int) -> torch.Tensor | None:
            return None if t is None else cp_split(t, dim, self.cp, rank, cu_pad)

        emb = split(batch.embeddings, 0)  # [s/cp, b, h]
        if emb is not None and scatter_sp:
            emb = self._sp_scatter(emb)  # [s/(cp*tp), b, h]
        return DecoderInputs(
            embeddings=emb,
            labels=split(batch.labels, 1),  # [b, s/cp]
            loss_mask=split(batch.loss_mask, 1),  # [b, s/cp]
            position_ids=split(batch.position_ids, 1),  # [b, s/cp]
            packed_seq_params=params,
            local_indices=local,
            padded_seq_len=s_pad,
            padding=batch.padding,
            factor=factor,
        )

    __call__ = prepare

    def gather(
        self,
        x: torch.Tensor,
        seq_dim: int,
        cu_seqlens_padded: torch.Tensor | None = None,
        grad_reduce: bool = False,
    ) -> torch.Tensor:
        """``cp_gather`` over this configuration's CP group (identity when cp == 1)."""
        if self.cp == 1:
            return x
        if self.cp_group is None:
            raise ValueError(f"gather with cp={self.cp} needs cp_group")
        return cp_gather(x, seq_dim, self.cp_group, cu_seqlens_padded, grad_reduce)
