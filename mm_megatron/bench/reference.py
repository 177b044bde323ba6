"""The single-GPU reference benchmark: our LLaVA against HF's and megatron's, side by side.

    python -m mm_megatron.bench.reference --out ref-bench           # ref-1.4b on one GPU
    python -m mm_megatron.bench.reference --dry-run --out ref-dry   # tiny shapes on the CPU

Rows, each trained for ``--warmup`` + ``--steps`` optimizer steps on the same synthetic batch
shape (``--seq`` = image tokens + text, ``--mbs`` rows; ref-1.4b: 576 + 448 = 1024, micro-batch
8), random init, bf16 on CUDA (fp32 in the dry run), fused AdamW:

- ``mm_megatron te`` / ``mm_megatron local``: our model, optimizer and step (`train.components`,
  `parallel.schedule`), the two specs;
- ``megatron LLaVAModel (te)``: megatron-core's own multimodal model on TE specs;
- ``hf sdpa`` / ``hf sdpa + compile``: transformers' ``LlavaForConditionalGeneration``
  (``attn_implementation="sdpa"``, bf16 weights, ``torch.optim.AdamW(fused=True)``), plain and
  wrapped in ``torch.compile``.

Every row's model TFLOP/s comes from the same FLOPs module (`flops.py`) and the same arithmetic
(`throughput.py`); the frozen ViT of the preset is frozen in every row. Reported per row:
median step time, tokens/s, model TFLOP/s, peak memory (``torch.cuda.max_memory_allocated``;
process peak RSS on the CPU), and ratios to the ``hf sdpa`` row. A row that cannot run here
(no CUDA or no Transformer Engine) is reported as skipped with the reason; one that fails is
reported with its error; neither stops the others. The dry run (tiny debug-tiny-sized model,
CPU) exercises every CPU-capable row and is tested.

What it does not do: multi-GPU layouts (`sweep.py`) or profiling (tools/gpu_check.sh does).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROWS = ("mm_megatron te", "mm_megatron local", "megatron LLaVAModel (te)", "hf sdpa",
        "hf sdpa + compile")  # fmt: skip
"""Row names, in report order."""

BASELINE = "hf sdpa"
"""The row the ratios divide by."""


def _cuda() -> bool:
    from mm_megatron.runtime import cpu_runtime

    return cpu_runtime.cuda_in_use()


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _peak_mib() -> float:
    if _cuda():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_memory() -> None:
    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def time_steps(step: Callable[[], None], warmup: int, steps: int) -> list[float]:
    """Wall time of ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + steps):
        _sync()
        start = time.perf_counter()
        step()
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def profile_steps(step: Callable[[], None], steps: int, top: int = 25) -> dict[str, Any]:
    """Top kernels (CUDA time; CPU time without CUDA) of ``steps`` calls under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if _cuda() else [])
    step()  # warm-up outside the trace
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync()
    key = "cuda_time_total" if _cuda() else "cpu_time_total"
    events = prof.key_averages()
    table = events.table(sort_by=key, row_limit=top)
    attr = "device_time_total" if _cuda() else "cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, attr, 0.0), reverse=True)[:top]
    return {
        "sort_by": key,
        "table": table,
        "top": [{"name": e.key, "time_us": getattr(e, attr, 0.0), "calls": e.count} for e in rows],
    }


def reference_config(dry_run: bool):
    """ref-1.4b, or in the dry run a debug-tiny-sized model with the same structure."""
    from mm_megatron.config import get_preset

    cfg = get_preset("debug-tiny" if dry_run else "ref-1.4b")
    cfg.freeze_vision = True  # ref-1.4b's stage-2 setting, in every row
    return cfg


# --- rows ---------------------------------------------------------------------------------------


def _mm_megatron_step(cfg, spec: str, batch: dict, dtype: torch.dtype):
    from mm_megatron.parallel.schedule import forward_backward
    from mm_megatron.train.components import build_model, build_optimizer, optimizer_step
    from mm_megatron.train.config import load_job_config

    cfg.set_spec(spec)
    job = load_job_config(overrides={"train": {"micro_batch_size": batch["input_ids"].shape[0]}},
                          base_model=cfg)  # fmt: skip
    chunks = build_model(job, dtype)
    optimizer = build_optimizer(job, chunks, dtype)

    def step():
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(chunks, [batch])
        optimizer_step(optimizer, 1.0)

    return step


def _megatron_llava_step(cfg, batch: dict, dtype: torch.dtype):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
        get_mlp_module_spec,
    )
    from megatron.core.models.multimodal.llava_model import LLaVAModel
    from megatron.core.models.vision.vit_layer_specs import (
        get_vit_layer_with_transformer_engine_spec,
    )

    from mm_megatron.config import ParallelConfig
    from mm_megatron.model.transformer_configs import (
        lm_transformer_config,
        projector_transformer_config,
        vision_transformer_config,
    )

    par = ParallelConfig()
    lm_cfg = lm_transformer_config(cfg, par, dtype)
    vit_cfg = vision_transformer_config(cfg, par, dtype)
    vit_cfg.vision_model_type = "clip"
    proj_cfg = projector_transformer_config(cfg, par, dtype)
    v = cfg.vision
    model = LLaVAModel(
        language_transformer_config=lm_cfg,
        language_transformer_layer_spec=get_gpt_layer_with_transformer_engine_spec(),
        language_vocab_size=cfg.lm.padded_vocab_size(1),
        language_max_sequence_length=cfg.lm.max_position_embeddings,
        vision_transformer_config=vit_cfg,
        vision_transformer_layer_spec=get_vit_layer_with_transformer_engine_spec(),
        drop_vision_class_token=v.drop_class_token,
        vision_projection_config=proj_cfg,
        vision_projection_layer_spec=get_mlp_module_spec(use_te=True).submodules,
        language_position_embedding_type="rope",
        language_rotary_base=int(cfg.lm.rope_theta),
        img_h=v.image_size,
        img_w=v.image_size,
        patch_dim=v.patch_size,
        image_token_index=cfg.image_token_id,
    ).cuda()
    model.vision_model.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    ids, labels = batch["input_ids"], batch["labels"]
    loss_mask = (labels != -100).float()

    def step():
        opt.zero_grad(set_to_none=True)
        loss, mask = model(batch["images"].to(dtype), ids, None, None, labels=labels,
                           loss_mask=loss_mask)  # fmt: skip
        ((loss.float() * mask).sum() / mask.sum()).backward()
        opt.step()

    return step


def _hf_step(cfg, batch: dict, dtype: torch.dtype, compile_model: bool):
    from transformers import LlavaConfig as HFLlavaConfig
    from transformers import LlavaForConditionalGeneration

    from mm_megatron.convert.hf_config import hf_config_from_llava
    from mm_megatron.model.image_tokens import image_token_count

    hf_cfg = HFLlavaConfig.from_dict(hf_config_from_llava(cfg))
    device = "cuda" if _cuda() else "cpu"
    model = LlavaForConditionalGeneration._from_config(hf_cfg, attn_implementation="sdpa")
    model = model.to(device=device, dtype=dtype)
    model.model.vision_tower.requires_grad_(False)
    model.train()
    # HF expects every placeholder already expanded to the image's token count
    n = image_token_count(cfg)
    ids, labels = batch["input_ids"], batch["labels"]
    first, rest = ids[:, :1], ids[:, 2:]
    img = torch.full((ids.shape[0], n), cfg.image_token_id, dtype=ids.dtype, device=ids.device)
    hf_ids = torch.cat([first, img, rest], dim=1)  # [b, seq]
    hf_labels = torch.cat([labels[:, :1], torch.full_like(img, -100), labels[:, 2:]], dim=1)
    pixels = batch["images"].to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")
    fwd = torch.compile(model) if compile_model else model

    def step():
        opt.zero_grad(set_to_none=True)
        out = fwd(input_ids=hf_ids, pixel_values=pixels, labels=hf_labels)
        out.loss.backward()
        opt.step()

    return step


def _skip_reason(name: str, dry_run: bool) -> str | None:
    from mm_megatron.model.specs import have_te

    if "te" in name.split() or "(te)" in name:
        if not _cuda():
            return "needs CUDA and Transformer Engine"
        if not have_te():
            return "needs Transformer Engine (pip install 'mm_megatron[te]')"
    if "compile" in name and not _cuda():
        return "CUDA only (on the CPU torch.compile's build time dominates the dry run)"
    return None


def run_reference(
    *, dry_run: bool, seq: int | None, mbs: int | None, steps: int, warmup: int,
    rows: tuple[str, ...] = ROWS, profile: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run the rows; returns ``{"settings": ..., "rows": [...]}``."""
    from mm_megatron.bench.batches import synthetic_batch
    from mm_megatron.bench.gpus import detect_peak_tflops
    from mm_megatron.config import ParallelConfig
    from mm_megatron.model.flops import train_step_flops
    from mm_megatron.model.image_tokens import image_token_count
    from mm_megatron.runtime import distributed
    from mm_megatron.train.throughput import StepTimes, mfu, throughput

    cfg0 = reference_config(dry_run)
    seq = seq or (2 * image_token_count(cfg0) if dry_run else 1024)
    mbs = mbs or (2 if dry_run else 8)
    dtype = torch.bfloat16 if _cuda() else torch.float32
    peak = detect_peak_tflops()
    flops = train_step_flops(cfg0, [seq] * mbs, mbs).total
    distributed.initialize(ParallelConfig(), seed=1234)
    device = "cuda" if _cuda() else "cpu"
    batch = synthetic_batch(cfg0, seq, mbs, generator=torch.Generator().manual_seed(0),
                            device=device)  # fmt: skip
    out = []
    try:
        for name in rows:
            row: dict[str, Any] = {"row": name}
            reason = _skip_reason(name, dry_run)
            if reason:
                out.append({**row, "status": "skipped", "reason": reason})
                print(f"[reference] {name}: skipped ({reason})", flush=True)
                continue
            cfg = reference_config(dry_run)
            _reset_memory()
            try:
                if name.startswith("mm_megatron"):
                    step = _mm_megatron_step(cfg, name.split()[-1], batch, dtype)
                elif name.startswith("megatron"):
                    step = _megatron_llava_step(cfg, batch, dtype)
                else:
                    step = _hf_step(cfg, batch, dtype, compile_model="compile" in name)
                times = time_steps(step, warmup, steps)
                if name == profile:
                    row["profile"] = profile_steps(step, min(steps, 3))
            except Exception as e:  # noqa: BLE001 - a failing row is reported, the rest run
                msg = f"{type(e).__name__}: {e}".splitlines()[0]
                out.append({**row, "status": "failed", "reason": msg})
                print(f"[reference] {name}: FAILED ({msg})", flush=True)
                continue
            finally:
                step = None
            med = StepTimes.of(times).median
            rates = throughput(tokens=mbs * seq, flops=flops, seconds=med, world_size=1,
                               samples=mbs)  # fmt: skip
            row.update(
                status="ok",
                step_time_median_s=med,
                tokens_per_sec=rates.tokens_per_sec_per_gpu,
                tflops=rates.tflops_per_gpu,
                mfu=mfu(rates.tflops_per_gpu, peak),
                peak_memory_mib=_peak_mib(),
            )
            out.append(row)
            print(f"[reference] {name}: {rates.tflops_per_gpu:.4g} TFLOP/s, "
                  f"{rates.tokens_per_sec_per_gpu:.1f} tokens/s", flush=True)  # fmt: skip
    finally:
        distributed.destroy()
    base = next((r for r in out if r["row"] == BASELINE and r["status"] == "ok"), None)
    for r in out:
        if base and r["status"] == "ok":
            r["ratio_to_hf"] = r["tflops"] / base["tflops"]
    settings = {"preset": "debug-tiny" if dry_run else "ref-1.4b", "dry_run": dry_run,
                "seq": seq, "mbs": mbs, "steps": steps, "warmup": warmup,
                "dtype": str(dtype).removeprefix("torch."), "device": device,
                "model_flops_per_step": flops, "peak_tflops": peak}  # fmt: skip
    return {"settings": settings, "rows": out}


def format_reference(result: dict[str, Any]) -> str:
    """The side-by-side table."""
    s = result["settings"]
    lines = [
        f"reference benchmark: {s['preset']} seq {s['seq']} x micro-batch {s['mbs']} "
        f"({s['dtype']}, {s['device']}{', DRY RUN' if s['dry_run'] else ''})",
        f"{'row':<28}{'status':>8}{'step s':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>7}"
        f"{'peak MiB':>10}{'vs HF':>7}",
    ]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['row']:<28}{r['status']:>8}  {r['reason']}")
            continue
        m = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        ratio = f"{r['ratio_to_hf']:.2f}" if "ratio_to_hf" in r else "-"
        lines.append(
            f"{r['row']:<28}{'ok':>8}{r['step_time_median_s']:>10.4f}{r['tokens_per_sec']:>12.1f}"
            f"{r['tflops']:>10.4g}{m:>7}{r['peak_memory_mib']:>10.0f}{ratio:>7}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m mm_megatron.bench.reference")
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU")
    p.add_argument("--seq", type=int, default=None, help="expanded sequence (1024; dry: 32)")
    p.add_argument("--mbs", type=int, default=None, help="micro-batch size (8; dry: 2)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (3)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of the rows")
    p.add_argument("--profile", default=None, help="also profile this row (top kernels)")
    p.add_argument("--out", default=None, help="directory for reference.json")
    args = p.parse_args(argv)
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        print(f"reference: error: unknown row(s) {unknown}; choose from {list(ROWS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    result = run_reference(dry_run=args.dry_run, seq=args.seq, mbs=args.mbs, steps=args.steps,
                           warmup=args.warmup, rows=rows, profile=args.profile)  # fmt: skip
    print(format_reference(result))
    for r in result["rows"]:
        if "profile" in r:
            print(f"top kernels of {r['row']} ({r['profile']['sort_by']}):")
            print(r["profile"]["table"])
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "reference.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
