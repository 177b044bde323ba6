"""``mm-megatron plan``: rank parallel layouts for N GPUs by estimated memory and step time.

    mm-megatron plan --preset llava-1.5-7b --gpus 8 --gpu h100-80gb
    mm-megatron plan --preset ref-1.4b --gpus 16 --gpu h200 --seq 2048 --mbs 2 --gbs 256 --top 5
    mm-megatron plan --preset ref-1.4b --gpus 8 --gpu h100-80gb --calibrate bench-out/bench.json

This module only parses; `mm_megatron.bench.planner` does the work.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from mm_megatron.bench.gpus import GPUS

    p = sub.add_parser("plan", help="rank parallel layouts by estimated memory and step time")
    p.add_argument("--preset", required=True, help="model preset")
    p.add_argument("--gpus", type=int, required=True, help="world size")
    p.add_argument("--gpu", required=True, choices=sorted(GPUS), help="GPU type")
    p.add_argument("--seq", type=int, default=None, help="expanded sequence length (image + 448)")
    p.add_argument("--mbs", type=int, default=1, help="micro-batch size (1)")
    p.add_argument("--gbs", type=int, default=256, help="global batch size (256)")
    p.add_argument("--images", type=int, default=1, help="images per sample (1)")
    p.add_argument("--top", type=int, default=10, help="fitting layouts to show (10)")
    p.add_argument("--efficiency", type=float, default=None, help="achievable fraction of peak")
    p.add_argument("--calibrate", default=None, help="a sweep's bench.json to fit the fraction on")
    p.add_argument("--json", default=None, help="also write every plan to this JSON file")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json
    import time

    start = time.perf_counter()
    from mm_megatron.bench.gpus import gpu_spec
    from mm_megatron.bench.memory import Workload, model_params
    from mm_megatron.bench.planner import (
        DEFAULT_EFFICIENCY,
        calibrate,
        format_plans,
        plan_layouts,
    )
    from mm_megatron.config import get_preset
    from mm_megatron.model.image_tokens import representative_image

    for name in ("gpus", "mbs", "gbs", "images", "top"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    cfg = get_preset(args.preset)
    gpu = gpu_spec(args.gpu)
    img = representative_image(cfg)  # tiled and counted by the model's own scheme
    seq = args.seq or args.images * img.tokens + 448
    w = Workload(
        seq=seq, mbs=args.mbs, images=args.images, tiles_per_image=img.tiles, dtype_bytes=2
    )
    params = model_params(cfg)
    efficiency, source = args.efficiency or DEFAULT_EFFICIENCY, "default"
    if args.efficiency:
        source = "--efficiency"
    if args.calibrate:
        efficiency, notes = calibrate(args.calibrate, cfg, params, gpu, 2)
        source = f"calibrated on {args.calibrate}"
        for line in notes:
            print(f"[calibrate] {line}")
    plans = plan_layouts(cfg, params, args.gpus, gpu, w, args.gbs, efficiency)
    header = (
        f"plan: {args.preset} on {args.gpus} x {gpu.name} ({gpu.memory_gib:.0f} GiB, "
        f"{gpu.peak_tflops:.0f} TFLOP/s bf16) | seq {seq}, micro-batch {args.mbs}, global batch "
        f"{args.gbs}, bf16 + fp32 Adam | achievable fraction of peak {efficiency:.2f} ({source})"
    )
    print(format_plans(plans, args.top, header))
    if args.json:
        rows = [
            {
                "layout": p.name,
                "fits": p.fits,
                "reason": p.reason,
                "memory_gib": p.worst.total / 2**30,
                "times_s": p.times,
                "tokens_per_sec_per_gpu": p.tokens_per_sec_per_gpu,
                "mfu": p.mfu,
            }
            for p in plans
        ]
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"header": header, "plans": rows}, fh, indent=1)
    print(f"planned in {time.perf_counter() - start:.1f} s")
    return 0
