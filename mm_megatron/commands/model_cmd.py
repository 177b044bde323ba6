"""``mm-megatron model summary|presets|flops``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="inspect model presets")
    msub = p.add_subparsers(dest="model_command", required=True)
    s = msub.add_parser("summary", help="parameters per component and per-rank shard sizes")
    s.add_argument("--preset", required=True, help="preset name (see `model presets`)")
    s.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    s.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    s.add_argument("--first-stage-lm-layers", type=int, default=None)
    s.set_defaults(func=_summary)
    f = msub.add_parser("flops", help="model FLOPs of one sample, per component")
    f.add_argument("--preset", required=True, help="preset name (see `model presets`)")
    f.add_argument("--images", type=int, default=1, help="images in the sample (default 1)")
    f.add_argument(
        "--text-tokens", type=int, default=448, help="text tokens besides the images (448)"
    )
    f.add_argument(
        "--freeze",
        default=None,
        help="comma-separated frozen parts among vision,projector,lm ('' = none); "
        "default: the preset's",
    )
    f.set_defaults(func=_flops)
    ls = msub.add_parser("presets", help="list the registered presets")
    ls.set_defaults(func=_presets)


def _summary(args: argparse.Namespace) -> int:
    from mm_megatron.config import ParallelConfig, get_preset
    from mm_megatron.model.summary import format_summary

    cfg = get_preset(args.preset)
    par = ParallelConfig(tp=args.tp, pp=args.pp, first_stage_lm_layers=args.first_stage_lm_layers)
    from mm_megatron.parallel.layout import validate_layout
    from mm_megatron.runtime import distributed

    validate_layout(cfg, par)
    with distributed.process_groups():  # the summary builds the TP=PP=1 model on `meta`
        text = format_summary(cfg, par, args.preset)
    print(text)
    return 0


def _presets(args: argparse.Namespace) -> int:
    from mm_megatron.config import list_presets

    for name, desc in list_presets().items():
        print(f"{name:<16} {desc}")
    return 0


def _flops(args: argparse.Namespace) -> int:
    from mm_megatron.config import get_preset
    from mm_megatron.model.flops import PARTS, format_sample_flops

    cfg = get_preset(args.preset)
    if args.images < 0 or args.text_tokens < 0:
        raise ValueError("--images and --text-tokens must be >= 0")
    if args.freeze is not None:
        frozen = {p.strip() for p in args.freeze.split(",") if p.strip()}
        unknown = sorted(frozen - set(PARTS))
        if unknown:
            raise ValueError(f"--freeze: unknown part(s) {unknown}; choose from {list(PARTS)}")
        for part in PARTS:
            setattr(cfg, f"freeze_{part}", part in frozen)
    print(format_sample_flops(cfg, args.images, args.text_tokens, args.preset))
    return 0
