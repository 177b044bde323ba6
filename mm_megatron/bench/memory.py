"""Per-rank memory model of a LLaVA training job: model state and activations.

What this file does, for one layout (TP/PP/CP/DP, SP, virtual stages, uneven first stage):

- **Model state** per pipeline rank, from the parameter list of the real model (built once on
  the ``meta`` device, `model_params`) and megatron's sharding rules:
  weights (``params x dtype``), gradients (megatron DDP keeps them in an fp32 buffer,
  ``grad_reduce_in_fp32``: 4 bytes per trained parameter) and optimizer state (Adam: exp_avg and
  exp_avg_sq in fp32, plus fp32 main parameters when the weights are bf16; SGD: a momentum
  buffer), divided over DP by the distributed optimizer. Megatron's bucket alignment padding
  (at most 64 elements per parameter and ``lcm(DP, 128)`` per bucket with the distributed
  optimizer) is not counted.
- **Activations** saved for backward by one micro-batch on each pipeline rank, term by term as
  the local spec saves them (`tests/unit/test_memory_model.py` measures them with
  ``torch.autograd.graph.saved_tensors_hooks``):
  - LM layer, per token (``t`` = TP; norm and linear-input terms use the SP-sharded token count
    when SP is on, all others the CP-local count): two RMSNorms (input, normalised input and
    rstd: ``2h + 1`` each), the QKV and fc1 inputs (``h`` each), the QKV output, the roped q and
    k, the attention output and its log-sum-exp (``((nh + 2kv) + (nh + kv) + nh) d / t + nh / t``),
    SwiGLU's fc1 output, its two halves' products and the fc2 input (``5 f / t``), plus the RoPE
    tables (``4 s d`` per layer). Under CP the all-gathered K and V of the whole sequence are
    saved too. Full recompute keeps only each layer's input; selective recompute drops the core
    attention's own saves (q, k, v, output, log-sum-exp) for its inputs.
  - ViT (first stage, only when it trains): the input pixels, pre-LN, and per layer two
    LayerNorms (``h + 2``), the QKV and fc1 inputs, the QKV output, attention output and LSE
    (``(4h + nh) / t``), the activation and fc2 input (``2 f / t``), for ``positions`` tokens per
    image (padded to a multiple of TP under SP).
  - Projector (when it or the ViT trains): its input and two inner-width tensors per token, or
    what the projector class states in an ``activation_elements`` classmethod.
  - Last stage: final norm, output-layer input and the vocab-parallel cross-entropy's fp32
    softmax over the padded vocab shard.
- **In-flight micro-batches**: 1F1B keeps ``min(PP - r, M)`` on pipeline rank ``r``; the
  interleaved schedule ``min(2 (PP - r - 1) + (VP - 1) PP + 1, M VP)`` model chunks.

A frozen part with nothing trainable before it saves nothing; a frozen part after a trained one
is counted like a trained one (an upper bound: its linears need not keep their inputs).
Integer index tensors (merge plan, labels, O(b s) int64) are ignored.

What it does not do: time anything (`planner.py`), or measure (the validation test does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.config.parallel_config import ParallelConfig
from mm_megatron.config.vit_styles import vit_style
from mm_megatron.model.summary import ParamInfo, shard_numel
from mm_megatron.parallel.layout import stage_layers

FP32 = 4
"""Bytes of an fp32 element (gradient buffer, optimizer state, cross-entropy softmax)."""


@dataclass(frozen=True)
class Workload:
    """What one micro-batch holds and how the job trains."""

    seq: int
    """Expanded sequence length per sample (image tokens included)."""
    mbs: int = 1
    """Micro-batch size."""
    images: int = 1
    """Images per sample."""
    tiles_per_image: int = 1
    """Encoder passes per image (the model's tiling scheme; ``representative_image(cfg).tiles``)."""
    dtype_bytes: int = 2
    """Bytes per weight / activation element (2 for bf16, 4 for fp32)."""
    recompute: str | None = None
    """None, ``full`` (every LM layer) or ``selective`` (core attention)."""
    distributed_optimizer: bool = False
    """Optimizer state sharded over DP."""
    optimizer: str = "adam"
    """adam or sgd."""


@dataclass
class ModelState:
    """Bytes of model state on one rank."""

    weights: int
    """Parameters."""
    grads: int
    """fp32 gradient buffer (trained parameters)."""
    optimizer: int
    """Optimizer state (this DP rank's shard with the distributed optimizer)."""

    @property
    def total(self) -> int:
        """All model state."""
        return self.weights + self.grads + self.optimizer


@dataclass
class RankMemory:
    """The memory estimate of one pipeline rank, with the numbers behind it."""

    pp_rank: int
    """Pipeline rank."""
    state: ModelState
    """Weights, grads, optimizer."""
    activations_per_microbatch: dict[str, float] = field(default_factory=dict)
    """Bytes saved for backward by one micro-batch, per component (all chunks of the rank)."""
    in_flight: float = 1.0
    """Micro-batches whose activations are alive at once (in units of the whole rank)."""

    @property
    def activations(self) -> float:
        """Peak activation bytes."""
        return sum(self.activations_per_microbatch.values()) * self.in_flight

    @property
    def total(self) -> float:
        """Model state plus peak activations."""
        return self.state.total + self.activations


# --- parameters and model state ---------------------------------------------------------------


def model_params(cfg: LlavaConfig) -> list[ParamInfo]:
    """The real model's parameters (built once at TP=PP=1 on the meta device, in its own
    single-process megatron state, which is torn down again)."""
    from mm_megatron.model.summary import collect_params
    from mm_megatron.runtime.distributed import process_groups

    with process_groups():
        return collect_params(cfg)


def lm_layer_owner(cfg: LlavaConfig, par: ParallelConfig) -> list[tuple[int, int]]:
    """(pipeline rank, virtual stage) of every LM layer, megatron's assignment."""
    n = cfg.lm.num_layers
    vp = par.virtual_pp or 1
    if vp > 1:
        per_chunk = n // (par.pp * vp)
        return [((i // per_chunk) % par.pp, (i // per_chunk) // par.pp) for i in range(n)]
    bounds = [0]
    for k in stage_layers(n, par):
        bounds.append(bounds[-1] + k)
    return [(next(r for r in range(par.pp) if bounds[r] <= i < bounds[r + 1]), 0) for i in range(n)]


def rank_params(cfg: LlavaConfig, params: list[ParamInfo], par: ParallelConfig) -> list[list[int]]:
    """[total, trained] parameters held by one TP rank of every pipeline rank."""
    owner = lm_layer_owner(cfg, par)
    out = [[0, 0] for _ in range(par.pp)]
    prefix = "language_model.decoder.layers."
    for p in params:
        n = shard_numel(p, cfg, par.tp)
        if p.name.startswith(prefix):
            ranks = [owner[int(p.name[len(prefix) :].split(".")[0])][0]]
        elif p.name.startswith(("language_model.decoder.final_layernorm", "language_model.output")):
            ranks = [par.pp - 1]
        elif p.name == "language_model.embedding.word_embeddings.weight":
            ranks = [0]
            if cfg.lm.tie_embeddings and par.pp > 1:
                ranks.append(par.pp - 1)  # the last stage keeps its own copy of tied weights
        else:
            ranks = [0]  # embeddings, vision encoder, projector
        for r in ranks:
            out[r][0] += n
            out[r][1] += n if p.trainable else 0
    return out


def optimizer_bytes_per_param(dtype_bytes: int, optimizer: str = "adam") -> int:
    """Optimizer state bytes per trained parameter (before distributed-optimizer sharding)."""
    main = FP32 if dtype_bytes != FP32 else 0  # fp32 main copy of low-precision weights
    return main + (2 * FP32 if optimizer == "adam" else FP32)


def model_state(
    cfg: LlavaConfig, params: list[ParamInfo], par: ParallelConfig, dp: int, w: Workload
) -> list[ModelState]:
    """Weights, gradient buffer and optimizer state of every pipeline rank."""
    out = []
    for total, trained in rank_params(cfg, params, par):
        opt = trained * optimizer_bytes_per_param(w.dtype_bytes, w.optimizer)
        if w.distributed_optimizer and dp > 1:
            opt = math.ceil(trained / dp) * optimizer_bytes_per_param(w.dtype_bytes, w.optimizer)
        out.append(ModelState(weights=total * w.dtype_bytes, grads=trained * FP32, optimizer=opt))
    return out


# --- activations --------------------------------------------------------------------------------


def padded_seq(seq: int, par: ParallelConfig) -> int:
    """Sequence length after the CP/SP padding (`parallel/cp_padding.py`'s shard factor)."""
    factor = 1
    if par.cp > 1:
        factor = math.lcm(factor, 2 * par.cp)
    if par.sequence_parallel:
        factor = math.lcm(factor, par.tp * (2 * par.cp if par.cp > 1 else 1))
    return -(-seq // factor) * factor


def lm_layer_elements(cfg: LlavaConfig, par: ParallelConfig, w: Workload) -> tuple[float, float]:
    """(elements saved by one LM layer for one micro-batch, of which RoPE-table elements)."""
    lm, t = cfg.lm, par.tp
    h, f, d, nh, kv = (
        lm.hidden_size,
        lm.ffn_hidden_size,
        lm.head_dim,
        lm.num_attention_heads,
        lm.kv_groups,
    )
    s_l = padded_seq(w.seq, par) / par.cp  # CP-local tokens
    s_n = s_l / t if par.sequence_parallel else s_l  # norm / linear-input tokens
    b = w.mbs
    rope = 4 * s_l * d
    if w.recompute == "full":
        return b * s_n * h, 0.0
    norms = 2 * (2 * h + 1) * s_n + 2 * h * s_n  # two RMSNorms + QKV and fc1 inputs
    core = (nh * d + nh) * s_l / t + (nh + kv) * d * s_l / t  # output + LSE, roped q and k
    qkv = (nh + 2 * kv) * d * s_l / t
    if par.cp > 1:
        qkv += 2 * kv * d * s_l * par.cp / t  # K and V all-gathered over CP
    if w.recompute == "selective":
        core = (nh + kv) * d * s_l / t  # only the checkpoint's inputs
    mlp = 5 * f * s_l / t
    return b * (norms + core + qkv + mlp) + rope, rope


def vision_elements(cfg: LlavaConfig, par: ParallelConfig, w: Workload) -> float:
    """Elements the trained ViT saves for one micro-batch (all its images)."""
    v, t = cfg.vision, par.tp
    n = w.mbs * w.images * w.tiles_per_image
    p = v.num_positions
    p_pad = -(-p // t) * t if par.sequence_parallel else p
    p_n = p_pad / t if par.sequence_parallel else p
    h, f, nh = v.hidden_size, v.ffn_hidden_size, v.num_attention_heads
    pre_ln = vit_style(v.vit_style).pre_layernorm
    front = v.num_channels * v.image_size**2 + (p * (h + 2) if pre_ln else 0)
    layer = p_n * (4 * h + 4) + p_pad * (4 * h + nh) / t + 2 * p * f / t
    post = p * (h + 2) if v.apply_post_layernorm else 0
    return n * (front + v.num_layers_built * layer + post)


def projector_elements(cfg: LlavaConfig, par: ParallelConfig, w: Workload) -> float:
    """Elements the projector saves for one micro-batch (its class may state them itself)."""
    from mm_megatron.model.projector import projector_class
    from mm_megatron.model.vision import vision_encoder_class

    cls = projector_class(cfg.projector.type)
    tokens = cfg.vision.num_output_tokens
    stated = getattr(cls, "activation_elements", None)
    hv, h_lm = cfg.vision.feature_width, cfg.lm.hidden_size
    if stated is not None:
        per_image = stated(cfg.projector, hv, h_lm, tokens, par.tp)
    else:
        inner = cfg.projector.hidden_size or h_lm
        per_image = tokens * (hv + 2 * inner / par.tp)  # input, activation, second input
    # an encoder's connector parts (MGM's mining), if it states any, save with the projector
    connector = getattr(
        vision_encoder_class(cfg.vision.style), "connector_activation_elements", None
    )
    per_image += connector(cfg.vision) if connector else 0
    return w.mbs * w.images * w.tiles_per_image * per_image  # per_image: per encoder tile


def _saves(cfg: LlavaConfig) -> tuple[bool, bool, bool]:
    """Whether the ViT, projector and LM keep activations (something before or in them trains)."""
    trained = (not cfg.freeze_vision, not cfg.freeze_projector, not cfg.freeze_lm)
    return tuple(any(trained[: i + 1]) for i in range(3))  # type: ignore[return-value]


def stage_activations(
    cfg: LlavaConfig, par: ParallelConfig, w: Workload, pp_rank: int
) -> dict[str, float]:
    """Bytes one micro-batch saves on pipeline rank ``pp_rank`` (all its model chunks)."""
    a = w.dtype_bytes
    vit_saves, proj_saves, lm_saves = _saves(cfg)
    out: dict[str, float] = {}
    if pp_rank == 0:
        out["vision"] = vision_elements(cfg, par, w) * a if vit_saves else 0.0
        out["projector"] = projector_elements(cfg, par, w) * a if proj_saves else 0.0
    layers = sum(1 for r, _ in lm_layer_owner(cfg, par) if r == pp_rank)
    per_layer, _ = lm_layer_elements(cfg, par, w)
    out["lm layers"] = layers * per_layer * a if lm_saves else 0.0
    if pp_rank == par.pp - 1 and lm_saves:
        s_l = padded_seq(w.seq, par) / par.cp
        s_n = s_l / par.tp if par.sequence_parallel else s_l
        h = cfg.lm.hidden_size
        out["final norm + output"] = w.mbs * s_n * (3 * h + 1) * a
        vocab = cfg.lm.padded_vocab_size(par.tp) / par.tp
        out["loss"] = w.mbs * s_l * (vocab * FP32 + 9)  # fp32 softmax, int64 target, bool mask
    return out


def in_flight(par: ParallelConfig, pp_rank: int, num_microbatches: int) -> float:
    """Micro-batches alive at the peak on ``pp_rank``, in units of the rank's whole model."""
    vp = par.virtual_pp or 1
    if par.pp == 1:
        return 1.0
    if vp == 1:
        return float(min(par.pp - pp_rank, num_microbatches))
    chunks = min(2 * (par.pp - pp_rank - 1) + (vp - 1) * par.pp + 1, num_microbatches * vp)
    return chunks / vp


def estimate(
    cfg: LlavaConfig,
    params: list[ParamInfo],
    par: ParallelConfig,
    dp: int,
    w: Workload,
    num_microbatches: int,
) -> list[RankMemory]:
    """Memory of one rank of every pipeline stage."""
    states = model_state(cfg, params, par, dp, w)
    return [
        RankMemory(
            pp_rank=r,
            state=states[r],
            activations_per_microbatch=stage_activations(cfg, par, w, r),
            in_flight=in_flight(par, r, num_microbatches),
        )
        for r in range(par.pp)
    ]
