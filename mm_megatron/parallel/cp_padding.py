"""Context-/sequence-parallel padding and splitting of the decoder input.

Runs after image-token expansion and before the language decoder. It:

* computes the shard factor the combined image+text sequence must be a multiple of: the least
  common multiple of the CP and SP requirements (megatron's ``get_padding`` uses an elif chain;
  an FP8 multiple of 16, 32 for MXFP8, joins the lcm when an FP8 recipe is configured, which no
  config does yet);
* pads BSHD rows at the end, and packed THD rows per sequence (embeddings with 0, labels with
  -100, loss mask with 0), and builds megatron's ``PackedSeqParams``;
* splits the sequence over CP ranks with causal load balancing (2*CP chunks, rank r keeps chunks
  r and 2*CP-1-r; per sequence for THD). :func:`zigzag_positions` is the one implementation of
  that split; the local attention's zig-zag causal mask (``mm_megatron/model/attention.py``)
  uses it too;
* scatters the CP-local embeddings to the sequence-parallel region (megatron's autograd op).

It does NOT expand image tokens, build attention masks or rotary embeddings, split labels for SP
(megatron's output layer gathers SP before the loss), gather the split back (the decoder's output
and per-token loss stay CP-local), or fetch process groups or ranks from megatron's globals:
ranks, sizes and the TP group are arguments, and nothing here calls ``torch.distributed``
directly. Megatron is imported lazily (``PackedSeqParams`` and the SP scatter op only), so
importing this module is cheap.

Layouts follow megatron: embeddings are sequence-first ``[s, b, h]``; labels and loss mask are
``[b, s]``. A packed THD row is ``[t, 1, h]`` / ``[1, t]`` (``b == 1``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from megatron.core.packed_seq_params import PackedSeqParams
    from torch.distributed import ProcessGroup

IGNORE_INDEX = -100


# --- arithmetic


def _check_int(name: str, value, minimum: int) -> int:
    # ValueError (not TypeError) on purpose: every bad argument raises the same exception type.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")  # noqa: TRY004
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def shard_factor(tp: int, cp: int, sequence_parallel: bool) -> int:
    """Multiple the combined (pre-split) sequence length must be padded to.

    Applicable factors: ``2*cp*tp`` (SP and cp > 1), ``2*cp`` (cp > 1, no SP), ``tp`` (SP).
    All that apply are combined by least common multiple, so a further requirement (FP8: 16,
    MXFP8: 32) is one more entry in the list, never lost to an elif chain.

    Args:
        tp: Tensor-parallel size of the language model (>= 1).
        cp: Context-parallel size (>= 1).
        sequence_parallel: Whether sequence parallelism is on (only matters with tp > 1).

    Returns:
        The shard factor (>= 1).
    """
    _check_int("tp", tp, 1)
    _check_int("cp", cp, 1)
    if not isinstance(sequence_parallel, bool):
        msg = f"sequence_parallel must be a bool, got {sequence_parallel!r}"
        raise ValueError(msg)  # noqa: TRY004
    factors = [1]
    if cp > 1:
        factors.append(2 * cp * tp if sequence_parallel else 2 * cp)
    if sequence_parallel:
        factors.append(tp)
    return math.lcm(*factors)


def padding_for(length: int, factor: int) -> int:
    """``ceil(length / factor) * factor - length``: tokens to append, in ``[0, factor)``."""
    _check_int("length", length, 0)
    _check_int("factor", factor, 1)
    return -length % factor


# --- padding


@dataclass
class PaddedBatch:
    """Padded decoder inputs; tensors passed as None stay None.

    Attributes:
        embeddings: ``[s_pad, b, h]``, pad rows are 0.
        labels: ``[b, s_pad]``, pad is ``IGNORE_INDEX`` (-100).
        loss_mask: ``[b, s_pad]``, pad is 0.
        padding: Tokens added (THD: summed over the sequences).
        cu_seqlens: THD only: int32 ``[n + 1]`` cumulative valid lengths.
        cu_seqlens_padded: THD only: int32 ``[n + 1]`` cumulative padded lengths.
    """

    embeddings: torch.Tensor | None
    labels: torch.Tensor | None
    loss_mask: torch.Tensor | None
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


def _check_shapes(embeddings, labels, loss_mask) -> tuple[int, int]:
    """Returns (s, b) after checking ``[s, b, h]`` embeddings against ``[b, s]`` tensors."""
    seq = batch = None
    if embeddings is not None:
        if embeddings.dim() < 2:
            raise ValueError(f"embeddings must be [s, b, h], got shape {tuple(embeddings.shape)}")
        seq, batch = embeddings.shape[0], embeddings.shape[1]
    for name, t in (("labels", labels), ("loss_mask", loss_mask)):
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
        raise ValueError("need at least one of embeddings, labels, loss_mask")
    return seq, batch


def pad_bshd(
    embeddings: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    *,
    factor: int,
) -> PaddedBatch:
    """Pad a BSHD batch at the end of the sequence to a multiple of ``factor``.

    Args:
        embeddings: ``[s, b, h]`` or None.
        labels, loss_mask: ``[b, s]`` or None.
        factor: Shard factor (see ``shard_factor``).

    Returns:
        A ``PaddedBatch`` of sequence length ``s + padding_for(s, factor)``.
    """
    seq, _ = _check_shapes(embeddings, labels, loss_mask)
    pad = padding_for(seq, factor)
    return PaddedBatch(
        embeddings=None if embeddings is None else pad_along(embeddings, 0, pad, 0),
        labels=None if labels is None else pad_along(labels, 1, pad, IGNORE_INDEX),
        loss_mask=None if loss_mask is None else pad_along(loss_mask, 1, pad, 0),
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
    *,
    cu_seqlens: torch.Tensor,
    factor: int,
) -> PaddedBatch:
    """Pad every sequence of a packed (THD) row to a multiple of ``factor``.

    Each sequence's pads follow its valid tokens.

    Args:
        embeddings: ``[t, 1, h]`` or None, ``t == cu_seqlens[-1]``.
        labels, loss_mask: ``[1, t]`` or None.
        cu_seqlens: int ``[n + 1]`` cumulative valid lengths with a leading 0.
        factor: Shard factor, applied to each sequence.

    Returns:
        A ``PaddedBatch`` of length ``cu_seqlens_padded[-1]`` with int32 ``cu_seqlens`` and
        ``cu_seqlens_padded`` on the device of ``cu_seqlens``.
    """
    _check_int("factor", factor, 1)
    seq, batch = _check_shapes(embeddings, labels, loss_mask)
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
    dest = torch.nonzero(offset < lengths[seq_of_slot]).reshape(-1)  # slot of each valid token

    def scatter(x: torch.Tensor | None, dim: int, value) -> torch.Tensor | None:
        if x is None:
            return None
        shape = list(x.shape)
        shape[dim] = total
        return x.new_full(shape, value).index_copy(dim, dest.to(x.device), x)

    return PaddedBatch(
        embeddings=scatter(embeddings, 0, 0),  # [t_pad, 1, h]
        labels=scatter(labels, 1, IGNORE_INDEX),  # [1, t_pad]
        loss_mask=scatter(loss_mask, 1, 0),
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


# --- CP split


def _check_rank(size_name: str, size: int, rank: int) -> None:
    rank_name = size_name.replace("size", "rank")
    _check_int(size_name, size, 1)
    _check_int(rank_name, rank, 0)
    if rank >= size:
        raise ValueError(f"{rank_name}={rank} out of range for {size_name}={size}")


def zigzag_positions(
    seq_lens: torch.Tensor, cp_size: int, cp_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence id and in-sequence position of the tokens CP rank ``cp_rank`` holds.

    Each sequence ``i`` of (padded) length ``seq_lens[i]`` (a multiple of ``2*cp_size``) is cut
    into ``2*cp_size`` chunks; rank r holds chunks r and 2*cp_size-1-r, in that order, sequences
    concatenated. With ``cp_size == 1`` every token, in order. Vectorised (no Python loop over
    sequences).

    Args:
        seq_lens: int ``[n]`` padded sequence lengths.
        cp_size: Context-parallel size.
        cp_rank: Rank in the CP group.

    Returns:
        (seq_id, pos), both int64 ``[sum(seq_lens) // cp_size]``.
    """
    _check_rank("cp_size", cp_size, cp_rank)
    lens = torch.as_tensor(seq_lens).to(torch.int64).reshape(-1)
    if cp_size == 1:  # no split: every token, in order, any lengths
        seq_id = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
        starts = (torch.cumsum(lens, 0) - lens)[seq_id]
        return seq_id, torch.arange(int(lens.sum()), device=lens.device) - starts
    bad = torch.nonzero(lens % (2 * cp_size)).reshape(-1)
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"sequence {i} has length {int(lens[i])}, not a multiple of 2*CP={2 * cp_size}"
        )
    dev = lens.device
    chunk = lens // (2 * cp_size)
    local = 2 * chunk  # tokens per sequence on this rank
    seq_id = torch.repeat_interleave(torch.arange(lens.numel(), device=dev), local)
    j = torch.arange(int(local.sum()), device=dev) - (torch.cumsum(local, 0) - local)[seq_id]
    c = chunk[seq_id]
    second = j >= c
    chunk_id = torch.where(second, 2 * cp_size - 1 - cp_rank, cp_rank)
    return seq_id, chunk_id * c + torch.where(second, j - c, j)


def thd_cp_local_indices(
    cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int
) -> torch.Tensor:
    """Row positions CP rank ``cp_rank`` keeps: the zig-zag split applied to each sequence.

    Args:
        cu_seqlens_padded: int ``[n + 1]`` cumulative padded lengths of the global row; each
            length must be divisible by ``2 * cp_size``.
        cp_size: Context-parallel size.
        cp_rank: Rank in the CP group.

    Returns:
        int64 ``[cu_seqlens_padded[-1] / cp_size]``, sequence by sequence, chunk ``cp_rank``
        then chunk ``2*cp_size-1-cp_rank`` of each.
    """
    lens = _seq_lengths(cu_seqlens_padded, "cu_seqlens_padded")
    try:
        seq_id, pos = zigzag_positions(lens, cp_size, cp_rank)
    except ValueError as e:
        raise ValueError(f"cu_seqlens_padded: {e}") from None
    return cu_seqlens_padded[:-1].to(torch.int64)[seq_id] + pos


def cp_split(
    x: torch.Tensor,
    seq_dim: int,
    cp_size: int,
    cp_rank: int,
    cu_seqlens_padded: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep this CP rank's load-balanced part of ``x`` along ``seq_dim`` (autograd-safe).

    The kept positions are :func:`zigzag_positions` of each sequence (the whole row for BSHD).

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
    if cu_seqlens_padded is None:  # BSHD: the row is one sequence
        if seq_len % (2 * cp_size):
            raise ValueError(
                f"sequence length {seq_len} of x (dim {seq_dim}) is not divisible by "
                f"2*CP={2 * cp_size} after padding"
            )
        cu_seqlens_padded = torch.tensor([0, seq_len], device=x.device)
    elif int(cu_seqlens_padded[-1]) != seq_len:
        raise ValueError(
            f"cu_seqlens_padded[-1] = {int(cu_seqlens_padded[-1])} does not match the "
            f"sequence length {seq_len} of x (dim {seq_dim})"
        )
    idx = thd_cp_local_indices(cu_seqlens_padded, cp_size, cp_rank).to(x.device)
    return x.index_select(seq_dim, idx)


# --- SP scatter


def scatter_to_sequence_parallel(x: torch.Tensor, tp_group: ProcessGroup | None) -> torch.Tensor:
    """Scatter ``x`` ``[s, b, h]`` to the sequence-parallel region: ``[s/tp, b, h]``.

    For a ``tp_group`` of size > 1 this is megatron's autograd op
    ``tensor_parallel.mappings.scatter_to_sequence_parallel_region`` (forward: keep dim-0 chunk
    tp_rank; backward: all-gather dim 0). None or a size-1 group returns ``x``.
    """
    if tp_group is None or tp_group.size() == 1:
        return x
    if x.shape[0] % tp_group.size():
        raise ValueError(
            f"sequence length {x.shape[0]} (dim 0) is not divisible by TP={tp_group.size()}"
        )
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
        packed_seq_params: THD only, describing the global padded row.
        padded_seq_len: Global padded length ``s_pad``.
    """

    embeddings: torch.Tensor | None
    labels: torch.Tensor | None
    loss_mask: torch.Tensor | None
    packed_seq_params: PackedSeqParams | None
    padded_seq_len: int


@dataclass(frozen=True)
class CPPadder:
    """Pads, CP-splits and SP-scatters decoder inputs for one parallel configuration.

    Args:
        tp: Tensor-parallel size of the language model.
        cp: Context-parallel size.
        sequence_parallel: Sequence parallelism on.
        cp_rank: This process's rank in the CP group.
        tp_group: TP group of megatron's autograd SP scatter; required for SP with tp > 1.
    """

    tp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    cp_rank: int = 0
    tp_group: ProcessGroup | None = None

    def __post_init__(self):
        _check_rank("cp_size", self.cp, self.cp_rank)
        if self.sequence_parallel and self.tp > 1:
            if self.tp_group is None:
                raise ValueError(f"sequence_parallel with tp={self.tp} needs tp_group")
            if self.tp_group.size() != self.tp:
                raise ValueError(f"tp_group has {self.tp_group.size()} ranks but tp={self.tp}")

    @property
    def factor(self) -> int:
        """The shard factor of this configuration."""
        return shard_factor(self.tp, self.cp, self.sequence_parallel)

    def pad_and_split(
        self,
        embeddings: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        *,
        seq_lengths: Sequence[int] | torch.Tensor | None = None,
    ) -> DecoderInputs:
        """Pad to the shard factor and keep this CP rank's part (no SP scatter).

        ``seq_lengths`` (valid lengths of the sequences packed in a ``b == 1`` row) selects
        THD: each sequence is padded and split on its own and ``packed_seq_params`` is built.
        Otherwise every BSHD row is one sequence, padded at the end.

        Args:
            embeddings: ``[s, b, h]`` or None (e.g. on the last pipeline stage).
            labels, loss_mask: ``[b, s]`` or None.
            seq_lengths: THD per-sequence valid lengths.

        Returns:
            ``DecoderInputs`` with embeddings ``[s_pad/cp, b, h]``.
        """
        s = _check_shapes(embeddings, labels, loss_mask)[0]
        device = next(t for t in (embeddings, labels, loss_mask) if t is not None).device
        if seq_lengths is None:
            batch = pad_bshd(embeddings, labels, loss_mask, factor=self.factor)
            cu_pad = params = None
        else:
            cu = cu_seqlens_from_lengths(seq_lengths, device)
            batch = pad_thd(embeddings, labels, loss_mask, cu_seqlens=cu, factor=self.factor)
            cu_pad = batch.cu_seqlens_padded
            params = build_packed_seq_params(batch.cu_seqlens, cu_pad)

        def split(t: torch.Tensor | None, dim: int) -> torch.Tensor | None:
            return None if t is None else cp_split(t, dim, self.cp, self.cp_rank, cu_pad)

        return DecoderInputs(
            embeddings=split(batch.embeddings, 0),  # [s/cp, b, h]
            labels=split(batch.labels, 1),  # [b, s/cp]
            loss_mask=split(batch.loss_mask, 1),  # [b, s/cp]
            packed_seq_params=params,
            padded_seq_len=s + batch.padding,
        )

    def prepare(
        self,
        embeddings: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        *,
        seq_lengths: Sequence[int] | torch.Tensor | None = None,
    ) -> DecoderInputs:
        """:meth:`pad_and_split`, then scatter the embeddings to the SP region when SP is on.

        Returns:
            ``DecoderInputs`` with embeddings ``[s_pad/(cp*tp), b, h]`` under SP.
        """
        out = self.pad_and_split(embeddings, labels, loss_mask, seq_lengths=seq_lengths)
        if out.embeddings is not None and self.sequence_parallel:
            out.embeddings = scatter_to_sequence_parallel(out.embeddings, self.tp_group)
        return out
