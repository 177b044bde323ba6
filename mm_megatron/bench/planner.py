"""`mm-megatron plan`: enumerate layouts for N GPUs, estimate memory and step time, rank them.

What this file does:
- enumerates TP x PP x CP x DP layouts of the world size (TP within a node), each with SP on/off
  (TP > 1), no / selective / full recompute, the distributed optimizer (DP > 1), virtual stages
  (2 per rank where the layers divide) and an uneven first stage sized so the vision tower plus
  its LM layers cost about one even stage; impossible ones (`parallel.layout` rules, batch
  divisibility) are dropped;
- estimates per-rank memory with `memory.py` (worst pipeline rank) and marks layouts that exceed
  the usable memory (90% of the GPU's) with the reason;
- estimates step time: model FLOPs of every stage (`flops.py`, plus the recomputed forward) at an
  achievable fraction of the GPU's peak, the pipeline bubble (``(PP - 1) / VP`` micro-batch
  times), and exposed communication from volumes and bandwidths (TP/SP: 4 ring collectives of
  the layer activations per layer and micro-batch; CP: K/V all-gather and its reduce-scatter;
  PP: activations and their gradients between stages; DP: the gradient all-reduce, or
  reduce-scatter + parameter all-gather with the distributed optimizer). A group is on NVLink
  when its ranks fit one node (megatron's order: TP fastest, then CP, DP, PP), else on the NIC;
- ranks the layouts that fit by predicted tokens/s/GPU and lists the numbers behind each verdict;
- calibrates the achievable fraction on a sweep's ``bench.json`` (`sweep.py`): per measured
  layout, the fraction that makes the model's step time equal the measured one; the median wins.

What it does not do: run anything (`sweep.py` measures), or model overlap of communication
with compute (all of it is counted as exposed: an upper bound on the time).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm_megatron.bench.gpus import GpuSpec
from mm_megatron.bench.memory import RankMemory, Workload, estimate, lm_layer_owner, padded_seq
from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.config.parallel_config import ParallelConfig

DEFAULT_EFFICIENCY = 0.5
"""Achievable fraction of the peak for model FLOPs before calibration (about what megatron
reaches on LLM training at this scale)."""

USABLE_MEMORY = 0.9
"""Fraction of device memory a plan may fill (the rest: CUDA context, NCCL, fragmentation)."""

GIB = 2**30


@dataclass
class Plan:
    """One candidate layout and everything the planner worked out for it."""

    par: ParallelConfig
    """TP/PP/CP, SP, virtual stages, uneven first stage."""
    dp: int
    """Data-parallel size."""
    recompute: str | None
    """None, selective or full."""
    distributed_optimizer: bool
    """Optimizer state sharded over DP."""
    memory: list[RankMemory] = field(default_factory=list)
    """Per pipeline rank."""
    times: dict[str, float] = field(default_factory=dict)
    """Seconds per step: compute, bubble, tp, cp, pp, dp communication, total."""
    tokens_per_sec_per_gpu: float = 0.0
    """Predicted throughput."""
    mfu: float = 0.0
    """Predicted model FLOPs utilisation."""
    fits: bool = True
    """Within the usable memory."""
    reason: str = ""
    """Why it does not fit."""

    @property
    def name(self) -> str:
        """Compact layout name, e.g. ``tp2pp2cp1dp2-sp-vp2-rc=sel-do``."""
        p = self.par
        parts = [f"tp{p.tp}pp{p.pp}cp{p.cp}dp{self.dp}"]
        if p.sequence_parallel:
            parts.append("sp")
        if p.virtual_pp:
            parts.append(f"vp{p.virtual_pp}")
        if p.first_stage_lm_layers is not None:
            parts.append(f"first{p.first_stage_lm_layers}")
        if self.recompute:
            parts.append(f"rc={self.recompute[:4]}")
        if self.distributed_optimizer:
            parts.append("do")
        return "-".join(parts)

    @property
    def worst(self) -> RankMemory:
        """The pipeline rank with the most memory."""
        return max(self.memory, key=lambda m: m.total)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def uneven_first_stage(cfg: LlavaConfig, pp: int, vision_cost_layers: float) -> int | None:
    """LM layers for the first stage so that it costs about one even stage, or None."""
    n = cfg.lm.num_layers
    even = n / pp
    want = even - vision_cost_layers
    best = None
    for first in range(1, math.ceil(even)):
        if (n - first) % (pp - 1) == 0 and (best is None or abs(first - want) < abs(best - want)):
            best = first
    return best


def enumerate_layouts(
    cfg: LlavaConfig, gpus: int, gpu: GpuSpec, seq: int, mbs: int, gbs: int, vision_layers: float
) -> list[Plan]:
    """Every valid layout of ``gpus`` ranks for this model and batch."""
    from mm_megatron.parallel.layout import LayoutError, validate_layout

    out = []
    for tp in [d for d in _divisors(gpus) if d <= gpu.gpus_per_node]:
        for pp in _divisors(gpus // tp):
            for cp in _divisors(gpus // (tp * pp)):
                dp = gpus // (tp * pp * cp)
                if gbs % (mbs * dp):
                    continue
                stage_options: list[dict[str, Any]] = [{}]
                if pp > 1:
                    if cfg.lm.num_layers % (pp * 2) == 0:
                        stage_options.append({"virtual_pp": 2})
                    first = uneven_first_stage(cfg, pp, vision_layers)
                    if first is not None and first != cfg.lm.num_layers // pp:
                        stage_options.append({"first_stage_lm_layers": first})
                for sp in [False, True] if tp > 1 else [False]:
                    for extra in stage_options:
                        par = ParallelConfig(tp=tp, pp=pp, cp=cp, sequence_parallel=sp, **extra)
                        try:
                            validate_layout(cfg, par, gpus, seq_len=seq)
                        except LayoutError:
                            continue
                        for rc in (None, "selective", "full"):
                            for do in [False, True] if dp > 1 else [False]:
                                out.append(Plan(par, dp, rc, do))
    return out


def _bandwidths(plan: Plan, gpu: GpuSpec) -> dict[str, float]:
    """Bytes/s of each group: NVLink when its ranks fit one node (order TP, CP, DP, PP)."""
    p, n = plan.par, gpu.gpus_per_node
    span = {
        "tp": p.tp,
        "cp": p.tp * p.cp,
        "dp": p.tp * p.cp * plan.dp,
        "pp": p.tp * p.cp * plan.dp * p.pp,
    }
    return {
        k: 1e9 * (gpu.intra_node_gbps if v <= n else gpu.inter_node_gbps) for k, v in span.items()
    }


@dataclass
class _Costs:
    """Per-micro-batch pieces of the time model."""

    stage_flops: list[float]
    """Hardware FLOPs of each pipeline stage for one micro-batch (recompute included)."""
    model_flops_per_step: float
    """Model FLOPs of one global step (all replicas)."""


def _costs(cfg: LlavaConfig, plan: Plan, w: Workload, gbs: int) -> _Costs:
    from mm_megatron.model.flops import forward_flops, training_multipliers

    fwd = forward_flops(cfg, [w.seq] * w.mbs, w.mbs * w.images * w.tiles_per_image)
    mv, mp, ml = training_multipliers(cfg)
    h, vocab = cfg.lm.hidden_size, cfg.lm.padded_vocab_size(1)
    out_fwd = 2 * h * vocab * w.seq * w.mbs
    layer_fwd = (fwd.lm - out_fwd) / cfg.lm.num_layers
    extra = 0.0
    if plan.recompute == "full":
        extra = layer_fwd
    elif plan.recompute == "selective":
        d_attn = cfg.lm.num_attention_heads * cfg.lm.head_dim
        extra = 2 * d_attn * w.seq**2 * w.mbs
    stage = [0.0] * plan.par.pp
    for r, _ in lm_layer_owner(cfg, plan.par):
        stage[r] += ml * layer_fwd + extra
    stage[0] += mv * fwd.vision + mp * fwd.projector
    stage[-1] += ml * out_fwd
    per_sample = (mv * fwd.vision + mp * fwd.projector + ml * fwd.lm) / w.mbs
    return _Costs(stage_flops=stage, model_flops_per_step=per_sample * gbs)


def step_time(
    cfg: LlavaConfig, plan: Plan, w: Workload, gbs: int, gpu: GpuSpec, efficiency: float
) -> dict[str, float]:
    """Seconds per step by cause (``total`` is their sum)."""
    p, a = plan.par, w.dtype_bytes
    m = gbs // (w.mbs * plan.dp)  # micro-batches per step
    costs = _costs(cfg, plan, w, gbs)
    bw = _bandwidths(plan, gpu)
    rate = gpu.peak_tflops * 1e12 * efficiency
    stage_compute = [f / (p.tp * p.cp) / rate for f in costs.stage_flops]
    s_l = padded_seq(w.seq, p) / p.cp
    layers = [sum(1 for r, _ in lm_layer_owner(cfg, p) if r == k) for k in range(p.pp)]
    lm = cfg.lm
    ring = lambda n: 2 * (n - 1) / n if n > 1 else 0.0  # all-reduce volume factor
    tp_layer = 4 * ring(p.tp) * w.mbs * s_l * lm.hidden_size * a / bw["tp"]
    v = cfg.vision
    tiles = w.mbs * w.images * w.tiles_per_image
    tp_vit = 4 * ring(p.tp) * tiles * v.num_positions * v.hidden_size * a / bw["tp"]
    kv_bytes = w.mbs * w.seq * 2 * lm.kv_groups * lm.head_dim / p.tp * a
    cp_layer = 2 * (p.cp - 1) / p.cp * kv_bytes / bw["cp"] if p.cp > 1 else 0.0
    tp_stage = [k * tp_layer for k in layers]
    tp_stage[0] += v.num_layers_built * tp_vit
    cp_stage = [k * cp_layer for k in layers]
    per_mb = [c + t + x for c, t, x in zip(stage_compute, tp_stage, cp_stage)]
    slowest = max(per_mb)
    vp = p.virtual_pp or 1
    bubble = (p.pp - 1) / vp * slowest
    s_n = s_l / p.tp if p.sequence_parallel else s_l
    pp_time = 2 * (m + p.pp - 1) * w.mbs * s_n * lm.hidden_size * a / bw["pp"] if p.pp > 1 else 0
    worst = plan.worst.state if plan.memory else None
    trained = (worst.grads / 4) if worst else 0.0
    if plan.distributed_optimizer:
        dp_bytes = (plan.dp - 1) / plan.dp * trained * (4 + a)
    else:
        dp_bytes = ring(plan.dp) * trained * 4
    times = {
        "compute": m * max(stage_compute),
        "tp": m * max(tp_stage),
        "cp": m * max(cp_stage),
        "bubble": bubble,
        "pp": pp_time,
        "dp": dp_bytes / bw["dp"] if plan.dp > 1 else 0.0,
    }
    times["total"] = m * slowest + bubble + times["pp"] + times["dp"]
    times["model_flops"] = costs.model_flops_per_step
    return times


def vision_cost_in_layers(cfg: LlavaConfig, w: Workload) -> float:
    """Training cost of the ViT + projector on the first stage, in LM layers."""
    from mm_megatron.model.flops import forward_flops, training_multipliers

    fwd = forward_flops(cfg, [w.seq] * w.mbs, w.mbs * w.images * w.tiles_per_image)
    mv, mp, ml = training_multipliers(cfg)
    out_fwd = 2 * cfg.lm.hidden_size * cfg.lm.padded_vocab_size(1) * w.seq * w.mbs
    layer = ml * (fwd.lm - out_fwd) / cfg.lm.num_layers
    return (mv * fwd.vision + mp * fwd.projector) / layer


def calibrate(
    path: str | Path, cfg: LlavaConfig, params: list, gpu: GpuSpec, dtype_bytes: int
) -> tuple[float, list[str]]:
    """Achievable fraction of peak fitted to a sweep's ``bench.json`` (median over layouts).

    Returns:
        (fraction, one line per measured layout saying what it implied).
    """
    from mm_megatron.bench.sweep import parse_layout

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    s = data.get("settings", {})
    seq = s.get("seq") or None
    notes, fractions = [], []
    for row in data.get("rows", []):
        if row.get("status") != "ok":
            continue
        layout = parse_layout(row["layout"])
        world = row["world_size"]
        dp = world // layout.parallel.model_parallel_size
        gbs = s.get("gbs") or s.get("mbs", 1) * dp
        from mm_megatron.model.image_tokens import representative_image

        img = representative_image(cfg)
        w = Workload(
            seq=seq or 2 * img.tokens,
            mbs=s.get("mbs", 1),
            images=s.get("images", 1),
            tiles_per_image=img.tiles,
            dtype_bytes=dtype_bytes,
            distributed_optimizer=layout.distributed_optimizer,
        )
        plan = Plan(layout.parallel, dp, None, layout.distributed_optimizer)
        m = gbs // (w.mbs * dp)
        plan.memory = estimate(cfg, params, plan.par, dp, w, m)
        at_peak = step_time(cfg, plan, w, gbs, gpu, 1.0)
        comm = at_peak["total"] - (at_peak["compute"] + at_peak["bubble"])
        measured = row["step_time_median_s"]
        compute_part = at_peak["compute"] + at_peak["bubble"]
        if measured <= comm or compute_part <= 0:
            notes.append(f"{row['layout']}: measured {measured:.4g} s <= modelled comm; skipped")
            continue
        frac = compute_part / (measured - comm)
        fractions.append(frac)
        notes.append(
            f"{row['layout']}: measured {measured:.4g} s -> achievable fraction {frac:.4g}"
        )
    if not fractions:
        raise ValueError(f"{path}: no successful layout to calibrate on")
    return min(1.0, statistics.median(fractions)), notes


def plan_layouts(
    cfg: LlavaConfig,
    params: list,
    gpus: int,
    gpu: GpuSpec,
    w: Workload,
    gbs: int,
    efficiency: float = DEFAULT_EFFICIENCY,
) -> list[Plan]:
    """All valid layouts, estimated and ranked (fitting ones first, fastest first)."""
    plans = enumerate_layouts(cfg, gpus, gpu, w.seq, w.mbs, gbs, vision_cost_in_layers(cfg, w))
    usable = gpu.memory_gib * GIB * USABLE_MEMORY
    for plan in plans:
        pw = Workload(
            seq=w.seq,
            mbs=w.mbs,
            images=w.images,
            tiles_per_image=w.tiles_per_image,
            dtype_bytes=w.dtype_bytes,
            recompute=plan.recompute,
            distributed_optimizer=plan.distributed_optimizer,
            optimizer=w.optimizer,
        )
        m = gbs // (w.mbs * plan.dp)
        plan.memory = estimate(cfg, params, plan.par, plan.dp, pw, m)
        plan.times = step_time(cfg, plan, pw, gbs, gpu, efficiency)
        worst = plan.worst
        if worst.total > usable:
            plan.fits = False
            plan.reason = (
                f"needs {worst.total / GIB:.1f} GiB on PP rank {worst.pp_rank} > "
                f"{usable / GIB:.1f} GiB usable ({worst.state.weights / GIB:.1f} weights + "
                f"{worst.state.grads / GIB:.1f} grads + {worst.state.optimizer / GIB:.1f} "
                f"optimizer + {worst.activations / GIB:.1f} activations)"
            )
        total = plan.times["total"]
        plan.tokens_per_sec_per_gpu = gbs * w.seq / total / gpus
        plan.mfu = plan.times["model_flops"] / total / gpus / (gpu.peak_tflops * 1e12)
    plans.sort(key=lambda p: (not p.fits, -p.tokens_per_sec_per_gpu if p.fits else p.worst.total))
    return plans


def format_plans(plans: list[Plan], top: int, header: str) -> str:
    """The ranked table plus, for the top ``top``, the numbers behind each verdict."""
    lines = [header, ""]
    head = (
        f"{'#':>3}  {'layout':<34}{'fits':>5}{'mem GiB':>9}{'step s':>9}{'tok/s/GPU':>11}{'MFU':>7}"
    )
    lines.append(head)
    fitting = [p for p in plans if p.fits]
    shown = fitting[:top] + [p for p in plans if not p.fits][: max(3, top // 3)]
    for i, p in enumerate(shown, 1):
        lines.append(
            f"{i:>3}  {p.name:<34}{'yes' if p.fits else 'NO':>5}{p.worst.total / GIB:>9.1f}"
            f"{p.times['total']:>9.3f}{p.tokens_per_sec_per_gpu:>11.0f}{p.mfu:>7.1%}"
        )
    lines += ["", "numbers behind the verdicts (worst pipeline rank; seconds per step):"]
    for i, p in enumerate(shown, 1):
        wr = p.worst
        t = p.times
        act = wr.activations_per_microbatch
        lines.append(
            f"{i:>3}  {p.name}: rank {wr.pp_rank}: weights {wr.state.weights / GIB:.2f} + grads "
            f"{wr.state.grads / GIB:.2f} + optimizer {wr.state.optimizer / GIB:.2f} + activations "
            f"{sum(act.values()) / GIB:.2f} x {wr.in_flight:g} in flight = {wr.total / GIB:.2f} "
            f"GiB | compute {t['compute']:.3f} bubble {t['bubble']:.3f} tp {t['tp']:.3f} cp "
            f"{t['cp']:.3f} pp {t['pp']:.3f} dp {t['dp']:.3f}"
            + (f" | {p.reason}" if p.reason else "")
        )
    n_fit = len(fitting)
    lines.append("")
    lines.append(f"{len(plans)} valid layouts, {n_fit} fit, {len(plans) - n_fit} do not")
    return "\n".join(lines)
