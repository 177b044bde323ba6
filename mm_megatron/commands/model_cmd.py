"""``mm-megatron model summary|presets``."""

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
