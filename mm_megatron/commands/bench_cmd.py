"""``mm-megatron bench``: throughput sweep over parallel layouts (one torchrun job per layout).

    mm-megatron bench --preset debug-tiny --layouts tp1pp1cp1,tp2pp1cp1,tp1pp2cp1,tp1pp1cp2
    mm-megatron bench --preset ref-1.4b --layouts tp1pp1cp1,tp2pp1cp1-sp,tp1pp2cp1 --nproc 8 \\
        --seq 1024 --mbs 8 --gbs 64 --spec te --out bench-ref

This module only parses; `mm_megatron.bench.sweep` does the work.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="throughput sweep over parallel layouts")
    p.add_argument("--preset", required=True, help="model preset")
    p.add_argument(
        "--layouts",
        required=True,
        help="comma-separated tp<N>pp<N>cp<N>[-sp][-vp<N>][-do], e.g. tp1pp1cp1,tp2pp1cp1-sp",
    )
    p.add_argument("--nproc", type=int, default=None, help="ranks per job (default TP*PP*CP)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per layout (5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (2)")
    p.add_argument("--seq", type=int, default=None, help="expanded sequence length")
    p.add_argument("--mbs", type=int, default=1, help="micro-batch size (1)")
    p.add_argument("--gbs", type=int, default=None, help="global batch size (mbs x DP)")
    p.add_argument("--images", type=int, default=1, help="images per sample (1)")
    p.add_argument("--spec", choices=("local", "te"), default="local")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for MFU")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per layout (600)")
    p.add_argument("--out", default="bench-out", help="output directory (bench-out)")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
        help="dotted job override for every layout (repeatable)",
    )  # fmt: skip
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mm_megatron.bench.sweep import SweepSettings, format_table, run_sweep

    for name in ("steps", "mbs", "images", "nproc", "gbs", "seq"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    settings = SweepSettings(
        preset=args.preset,
        nproc=args.nproc,
        steps=args.steps,
        warmup=max(0, args.warmup),
        seq=args.seq,
        mbs=args.mbs,
        gbs=args.gbs,
        images=args.images,
        spec=args.spec,
        precision=args.precision,
        peak_tflops=args.peak_tflops,
        timeout=args.timeout,
        overrides=args.overrides,
    )
    layouts = [x for x in args.layouts.split(",") if x.strip()]
    out = Path(args.out)
    rows = run_sweep(settings, layouts, out)
    print(format_table(rows))
    print(f"wrote {out / 'bench.csv'}, {out / 'bench.json'}, {out / 'bench.png'}")
    return 0
