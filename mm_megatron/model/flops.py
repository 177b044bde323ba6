"""Model FLOPs of a LLaVA step: each component states its own forward FLOPs; this sums them.

What this file does: asks the three parts for their forward FLOPs, where each is defined —
``VisionEncoder.forward_flops`` (`model/vision.py`), the projector class registered under
``projector.type`` (``forward_flops`` / ``num_output_tokens``, `model/projector.py`) and
`model/language.py` for the LM — and applies the training multiplier of each part from the
freeze flags (backward = 2x forward when weight gradients are computed, 1x when only input
gradients are):

- a trained part costs 3x its forward;
- a frozen part that must pass input gradients to a trained part before it costs 2x;
- a frozen part with nothing trainable before it (the ViT in stage 1) costs 1x.

Counts use real (unpadded, image-expanded) lengths; packed sub-sequences count one by one.
Recomputation is not counted: these are model FLOPs, not hardware FLOPs. A new encoder or
projector adds its count where it is defined; nothing here names a component type.

Used by the trainer's log line, `mm-megatron bench`, the planner, the reference benchmark and
`mm-megatron model flops`. What it does not do: time anything, or know the parallel layout
(divide by the world size for per-GPU numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mm_megatron.config.model_config import LlavaConfig

PARTS = ("vision", "projector", "lm")
"""Components in data-flow order (the order the multiplier rule reads)."""


def vision_forward_flops(cfg: LlavaConfig, num_tiles: int) -> int:
    """Forward FLOPs of the vision encoder over ``num_tiles`` encoder passes (its statement)."""
    from mm_megatron.model.vision import vision_encoder_class

    return vision_encoder_class(cfg.vision.style).forward_flops(cfg.vision, num_tiles)


def projector_forward_flops(cfg: LlavaConfig, num_tiles: int) -> int:
    """Forward FLOPs of the projector over ``num_tiles`` tiles (its registered class's count)."""
    from mm_megatron.model.projector import projector_class
    from mm_megatron.model.vision import vision_encoder_class

    cls = projector_class(cfg.projector.type)
    tokens_in = cfg.vision.num_output_tokens
    per_image = cls.forward_flops(
        cfg.projector, cfg.vision.feature_width, cfg.lm.hidden_size, tokens_in
    )
    # an encoder's connector parts (MGM's mining), if it states any, train with the projector
    connector = getattr(vision_encoder_class(cfg.vision.style), "connector_forward_flops", None)
    extra = connector(cfg.vision, num_tiles) if connector else 0
    return num_tiles * per_image + extra


def lm_forward_flops(cfg: LlavaConfig, seq_lens: Sequence[int], vocab: int | None = None) -> int:
    """Forward FLOPs of the LM over real expanded (sub-)sequence lengths."""
    from mm_megatron.model.language import lm_forward_flops as lm_flops

    return lm_flops(cfg.lm, seq_lens, vocab)


def training_multipliers(cfg: LlavaConfig) -> tuple[int, int, int]:
    """(vision, projector, LM) cost of one training step in units of their forward pass."""
    trained = (not cfg.freeze_vision, not cfg.freeze_projector, not cfg.freeze_lm)
    out = []
    for i, is_trained in enumerate(trained):
        if is_trained:
            out.append(3)
        elif any(trained[:i]):
            out.append(2)  # frozen, but gradients must flow through it to an earlier part
        else:
            out.append(1)  # frozen front part: forward only
    return out[0], out[1], out[2]


@dataclass
class StepFlops:
    """Model FLOPs of one step per part, already multiplied for training."""

    vision: int
    """ViT FLOPs."""
    projector: int
    """Projector FLOPs."""
    lm: int
    """LM FLOPs."""

    @property
    def total(self) -> int:
        """All parts."""
        return self.vision + self.projector + self.lm


def forward_flops(
    cfg: LlavaConfig, seq_lens: Sequence[int], num_tiles: int, *, vocab: int | None = None
) -> StepFlops:
    """Forward FLOPs per part over a step's sequences and encoder tiles."""
    return StepFlops(
        vision=vision_forward_flops(cfg, num_tiles),
        projector=projector_forward_flops(cfg, num_tiles),
        lm=lm_forward_flops(cfg, seq_lens, vocab),
    )


def train_step_flops(
    cfg: LlavaConfig,
    seq_lens: Sequence[int],
    num_tiles: int,
    *,
    vocab: int | None = None,
    training: bool = True,
) -> StepFlops:
    """Model FLOPs of a training (or, with ``training=False``, forward-only) step.

    Args:
        cfg: The model (its freeze flags decide the multipliers).
        seq_lens: Real expanded lengths of every (sub-)sequence in the step.
        num_tiles: Encoder passes in the step (the batches' ``num_tiles`` summed; one per image
            without a tiling scheme).
        vocab: Output-layer rows (default: the padded vocab at TP=1).
        training: Count the backward passes too.
    """
    fwd = forward_flops(cfg, seq_lens, num_tiles, vocab=vocab)
    mv, mp, ml = training_multipliers(cfg) if training else (1, 1, 1)
    return StepFlops(vision=mv * fwd.vision, projector=mp * fwd.projector, lm=ml * fwd.lm)


def sample_seq_len(cfg: LlavaConfig, images: int, text_tokens: int) -> int:
    """Expanded length of a sample with ``images`` representative images and ``text_tokens``
    other tokens (`image_tokens.representative_image`: the model's own tiling and count)."""
    from mm_megatron.model.image_tokens import representative_image

    return text_tokens + images * representative_image(cfg).tokens


def format_sample_flops(cfg: LlavaConfig, images: int, text_tokens: int, name: str = "") -> str:
    """The table `mm-megatron model flops` prints: per-sample FLOPs per component."""
    from mm_megatron.model.image_tokens import representative_image

    img = representative_image(cfg)
    s = sample_seq_len(cfg, images, text_tokens)
    fwd = forward_flops(cfg, [s], images * img.tiles)
    train = train_step_flops(cfg, [s], images * img.tiles)
    mults = training_multipliers(cfg)
    flags = (cfg.freeze_vision, cfg.freeze_projector, cfg.freeze_lm)
    frozen = [p for p, f in zip(PARTS, flags) if f]
    lines = [
        f"model {name or '(custom)'}: {images} image(s) of {img.side} px ({img.tiles} tile(s)) x "
        f"{img.tokens} tokens + "
        f"{text_tokens} text tokens = sequence {s}; frozen: {', '.join(frozen) or 'nothing'}",
        "",
        f"{'component':<12}{'forward FLOPs':>18}{'x':>4}{'training FLOPs':>18}{'share':>8}",
    ]
    for part, mult in zip(PARTS, mults):
        f, t = getattr(fwd, part), getattr(train, part)
        share = 100.0 * t / train.total if train.total else 0.0
        lines.append(f"{part:<12}{f:>18.4e}{mult:>4}{t:>18.4e}{share:>7.1f}%")
    lines.append(f"{'total':<12}{fwd.total:>18.4e}{'':>4}{train.total:>18.4e}{100.0:>7.1f}%")
    lines.append(
        f"per token: forward {fwd.total / s:.4e}, training {train.total / s:.4e} FLOPs ({s} tokens)"
    )
    return "\n".join(lines)
