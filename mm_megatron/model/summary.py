"""Parameter counts per component and per-rank shard sizes for a preset under a TP/PP layout.

The model is built once at TP=PP=1 on the ``meta`` device (no memory, no init), so even the 13B
preset summarises in seconds on a laptop. Per-rank sizes then follow megatron's rules: weights
marked ``tensor_model_parallel`` split over TP along ``partition_dim``; the vocab is re-padded to
a multiple of ``make_vocab_size_divisible_by * TP``; LM layers split over PP stages (uneven first
/ last stage honoured); the first stage also holds the embedding, vision encoder and projector,
the last the final norm and output layer (plus a copy of tied embeddings when PP > 1).

Not here: starting process groups (the caller holds megatron's TP=PP=1 state while this builds;
``mm-megatron model summary`` does it in ``commands/model_cmd.py``) or the stage-split arithmetic
(``mm_megatron.parallel.layout.stage_layers``, shared with the layout check).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.config.parallel_config import ParallelConfig
from mm_megatron.model.image_tokens import representative_image
from mm_megatron.parallel.layout import stage_layers

_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.")
_VOCAB = ("language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight")


@dataclass
class ParamInfo:
    """One parameter of the TP=1 model."""

    name: str
    shape: tuple[int, ...]
    tp_split: bool
    trainable: bool

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _component(name: str) -> str:
    if name.startswith("vision_model."):
        return "vision encoder"
    if name.startswith("vision_projection."):
        return "projector"
    return "language model"


def collect_params(cfg: LlavaConfig) -> list[ParamInfo]:
    """Build the TP=PP=1 model on the meta device and list its parameters.

    Needs megatron's parallel state at TP=PP=CP=1, which the caller sets up (e.g. ``with
    mm_megatron.runtime.distributed.process_groups(): ...``); this module starts nothing.
    """
    from mm_megatron.model.build import build_llava_model

    with torch.device("meta"):
        model = build_llava_model(cfg, ParallelConfig())
    return [
        ParamInfo(
            n,
            tuple(p.shape),
            bool(getattr(p, "tensor_model_parallel", False)),
            p.requires_grad,
        )
        for n, p in model.named_parameters()
    ]


def shard_numel(p: ParamInfo, cfg: LlavaConfig, tp: int) -> int:
    """Elements of ``p`` one TP rank holds."""
    if p.name in _VOCAB:
        return cfg.lm.padded_vocab_size(tp) * cfg.lm.hidden_size // tp
    return p.numel // tp if p.tp_split else p.numel


def per_stage(cfg: LlavaConfig, params: list[ParamInfo], par: ParallelConfig) -> list[int]:
    """Parameters held by one rank of each pipeline stage."""
    layers = stage_layers(cfg.lm.num_layers, par)
    bounds = [sum(layers[:i]) for i in range(len(layers) + 1)]
    out = [0] * par.pp
    for p in params:
        n = shard_numel(p, cfg, par.tp)
        m = _LAYER.match(p.name)
        if m:
            idx = int(m.group(1))
            stage = next(s for s in range(par.pp) if bounds[s] <= idx < bounds[s + 1])
            out[stage] += n
        elif p.name.startswith(("language_model.decoder.final_layernorm", "language_model.output")):
            out[-1] += n
        else:
            out[0] += n
            if p.name == _VOCAB[0] and cfg.lm.tie_embeddings and par.pp > 1:
                out[-1] += n  # tied output layer keeps its own copy on the last stage
    return out


def format_summary(cfg: LlavaConfig, par: ParallelConfig, name: str = "") -> str:
    """A human-readable table (what ``mm-megatron model summary`` prints); needs the parallel
    state :func:`collect_params` needs."""
    params = collect_params(cfg)
    by_comp: dict[str, list[int]] = {}
    for p in params:
        c = by_comp.setdefault(_component(p.name), [0, 0])
        c[0] += p.numel
        c[1] += p.numel if p.trainable else 0
    total = sum(v[0] for v in by_comp.values())
    img = representative_image(cfg)
    lines = [
        f"model {name or '(custom)'}: vision {cfg.vision.style} {cfg.vision.image_size}px/"
        f"{cfg.vision.patch_size} ({cfg.vision.num_layers_built} of {cfg.vision.num_layers} layers "
        f"built), projector {cfg.projector.type}, LM {cfg.lm.flavor} L{cfg.lm.num_layers} "
        f"h{cfg.lm.hidden_size} heads {cfg.lm.num_attention_heads}/{cfg.lm.kv_groups}",
        f"tokens per image: {img.tokens} (a {img.side} px image, tiling {cfg.tiling.type}: "
        f"{img.tiles} tile(s)); vocab {cfg.lm.vocab_size} (padded "
        f"{cfg.lm.padded_vocab_size(1)} at TP=1, {cfg.lm.padded_vocab_size(par.tp)} at "
        f"TP={par.tp})",
        "",
        f"{'component':<16}{'parameters':>16}{'trainable':>16}",
    ]
    for comp in ("vision encoder", "projector", "language model"):
        n, t = by_comp.get(comp, [0, 0])
        lines.append(f"{comp:<16}{n:>16,}{t:>16,}")
    lines.append(f"{'total':<16}{total:>16,}{sum(v[1] for v in by_comp.values()):>16,}")
    lines += ["", f"per-rank shards at TP={par.tp} PP={par.pp} (one rank of each stage):"]
    layers = stage_layers(cfg.lm.num_layers, par)
    for s, n in enumerate(per_stage(cfg, params, par)):
        lines.append(
            f"  stage {s}: {layers[s]:>3} LM layers{' + vision + projector' if s == 0 else ''}"
            f"{'':<3}{n:>15,} params  {2 * n / 2**30:8.2f} GiB bf16 weights"
        )
    return "\n".join(lines)
