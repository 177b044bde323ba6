"""Benchmark the converters on a synthetic checkpoint with llava-1.5-7b's shapes (CPU only).

Writes a random bf16 HF checkpoint shaped like llava-hf/llava-1.5-7b-hf (CLIP-L/336 24 layers,
mlp2x_gelu, Vicuna-7B, vocab 32064; ~14 GB in 3 shards, llava-hf's key spelling), then times
``hf-to-mcore`` and ``mcore-to-hf``, each in a fresh process, and reports GB/s and peak RSS
(``getrusage`` of the step's process and of any children it started). ``--check`` then compares
every exported tensor with the input (bit-exact). ``--scale`` shrinks the LM and ViT depth for a
quick run (``--scale 0.25`` = 8 LM layers). ``--assemble`` instead writes the two parts
(CLIP-L/336 ``CLIPVisionModel``, 24 layers; Vicuna-7B-shaped ``LlamaForCausalLM``, vocab 32000,
with a 32000-token tokenizer) and times ``convert assemble`` (adds ``<image>`` and ``<pad>``).

    .venv/bin/python tools/bench_convert.py --workdir /tmp/bench7b --check
    .venv/bin/python tools/bench_convert.py --workdir /tmp/bench7b --scale 0.25 --keep
    .venv/bin/python tools/bench_convert.py --workdir /tmp/bench7b --assemble

Needs ~3x the checkpoint size of free disk under ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def llava_7b_hf_config(scale: float = 1.0):
    """transformers LlavaConfig of llava-1.5-7b (layers scaled by ``scale``)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=max(2, round(24 * scale)),
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=max(1, round(32 * scale)),
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=32000,
        image_seq_length=576,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


def synthesize(out: Path, scale: float, shard_bytes: int = 5 * 10**9) -> int:
    """Write a random bf16 HF checkpoint; returns its tensor bytes."""

    from mm_megatron.convert.hf_config import llava_config_from_hf
    from mm_megatron.convert.keys import KeySpelling
    from mm_megatron.convert.mapping import build_rules

    hf_cfg = llava_7b_hf_config(scale)
    cfg, _ = llava_config_from_hf(hf_cfg)
    spelling = KeySpelling("legacy", vision_model_level=True)  # as llava-hf publishes
    shapes = {}
    for rule in build_rules(cfg):
        shapes.update(zip(rule.hf, rule.hf_shapes))
    hv, fv = cfg.vision.hidden_size, cfg.vision.ffn_hidden_size
    unused = {"model.vision_tower.post_layernorm.weight": (hv,)}
    unused["model.vision_tower.post_layernorm.bias"] = (hv,)
    for i in range(cfg.vision.num_layers_built, cfg.vision.num_layers):
        p = f"model.vision_tower.encoder.layers.{i}."
        for m, w in (("self_attn.q_proj", (hv, hv)), ("self_attn.k_proj", (hv, hv)),
                     ("self_attn.v_proj", (hv, hv)), ("self_attn.out_proj", (hv, hv)),
                     ("mlp.fc1", (fv, hv)), ("mlp.fc2", (hv, fv))):  # fmt: skip
            unused[p + m + ".weight"], unused[p + m + ".bias"] = w, w[:1]
        for n in ("layer_norm1", "layer_norm2"):
            unused[p + n + ".weight"] = unused[p + n + ".bias"] = (hv,)
    shapes.update(unused)
    nbytes = _write_random(out, {spelling.to_file(k): v for k, v in shapes.items()}, shard_bytes)
    doc = hf_cfg.to_dict()
    doc["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(doc, indent=2))
    return nbytes


def _write_random(out: Path, shapes: dict[str, tuple], shard_bytes: int) -> int:
    """Random bf16 tensors ``{key: shape}`` as safetensors shards + index; returns bytes."""
    import torch

    from mm_megatron.checkpoint.safetensors_io import SafetensorsWriter

    files: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for key, shape in shapes.items():
        n = 2
        for s in shape:
            n *= s
        if files[-1] and size + n > shard_bytes:
            files.append([])
            size = 0
        files[-1].append((key, shape))
        size += n
    out.mkdir(parents=True)
    total = len(files)
    names = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    decl = {out / f: [(k, torch.bfloat16, s) for k, s in keys] for f, keys in zip(names, files)}
    # Random values, generated once and tiled (randn for 7B values would dominate the run);
    # each tensor starts at a different offset of the block so no two tensors are equal.
    gen = torch.Generator().manual_seed(0)
    block = (0.02 * torch.randn(2**25 + 2**20, generator=gen)).to(torch.bfloat16)  # 66 MB
    nbytes = 0
    with SafetensorsWriter(decl) as w:
        for j, keys in enumerate(files):
            for i, (key, shape) in enumerate(keys):
                t = torch.empty(shape, dtype=torch.bfloat16).view(-1)
                start = (i * 7919 + j * 104729) % 2**20
                for lo in range(0, t.numel(), 2**25):
                    n = min(2**25, t.numel() - lo)
                    t[lo : lo + n] = block[start : start + n]
                w.write(key, t.view(shape))
                nbytes += t.numel() * 2
    weight_map = {k: f for f, keys in zip(names, files) for k, _ in keys}
    index = {"metadata": {"total_size": nbytes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return nbytes


def synthesize_parts(out: Path, scale: float, shard_bytes: int = 5 * 10**9) -> int:
    """Write a CLIP-L/336 ``CLIPVisionModel`` (``out/vision``) and a Vicuna-7B-shaped
    ``LlamaForCausalLM`` with a 32000-token tokenizer (``out/lm``), random bf16; returns bytes."""
    from mm_megatron.convert.hf_config import llava_config_from_hf
    from mm_megatron.convert.keys import LMPartNaming, VisionPartNaming
    from mm_megatron.convert.mapping import build_rules
    from mm_megatron.convert.tiny_models import tiny_tokenizer

    hf_cfg = llava_7b_hf_config(scale)
    cfg, _ = llava_config_from_hf(hf_cfg)
    hf_cfg.text_config.vocab_size = cfg.lm.vocab_size = 32000  # Vicuna's own vocabulary
    cfg.vision.feature_layer = -1  # every layer is a real tensor of the tower
    shapes = {}
    for rule in build_rules(cfg, ("lm", "vision")):
        shapes.update(zip(rule.hf, rule.hf_shapes))
    hv = cfg.vision.hidden_size
    shapes["model.vision_tower.post_layernorm.weight"] = (hv,)
    shapes["model.vision_tower.post_layernorm.bias"] = (hv,)
    vision_naming, lm_naming = VisionPartNaming("vision_model."), LMPartNaming()
    vision = {vision_naming.to_file(k): s for k, s in shapes.items() if "vision_tower" in k}
    lm = {lm_naming.to_file(k): s for k, s in shapes.items() if "vision_tower" not in k}
    nbytes = _write_random(out / "vision", vision, shard_bytes)
    nbytes += _write_random(out / "lm", lm, shard_bytes)
    for sub, conf, arch in (
        ("vision", hf_cfg.vision_config, "CLIPVisionModel"),
        ("lm", hf_cfg.text_config, "LlamaForCausalLM"),
    ):
        doc = conf.to_dict()
        doc.update(architectures=[arch], dtype="bfloat16")
        (out / sub / "config.json").write_text(json.dumps(doc, indent=2))
    names = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok = tiny_tokenizer(32000, {0: "<unk>", 1: "<s>", 2: "</s>"}, **names)
    tok.save_pretrained(out / "lm")
    return nbytes


def _step(argv: list[str]) -> None:
    """Run one conversion in this process; print JSON timing + peak RSS on the last line."""
    import warnings

    warnings.filterwarnings("ignore")
    kind, src, dst = argv
    import mm_megatron.convert.assemble  # noqa: F401 - imports outside the timed region
    import mm_megatron.convert.mcore_to_hf  # noqa: F401

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = r0.ru_utime + r0.ru_stime
    t0 = time.perf_counter()
    if kind == "hf-to-mcore":
        from mm_megatron.convert.hf_to_mcore import hf_to_mcore

        hf_to_mcore(src, dst, progress=False, log=lambda s: None)
    elif kind == "assemble":
        from mm_megatron.convert.assemble import assemble

        assemble(Path(src) / "vision", Path(src) / "lm", dst, progress=False, log=lambda s: None)
    else:
        from mm_megatron.convert.mcore_to_hf import mcore_to_hf

        mcore_to_hf(src, dst, progress=False, log=lambda s: None)
    wall = time.perf_counter() - t0
    me = resource.getrusage(resource.RUSAGE_SELF)
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    out = {"wall_s": wall, "cpu_s": me.ru_utime + me.ru_stime - cpu0}
    out.update(peak_rss=me.ru_maxrss * 1024, children_peak_rss=child_rss)
    print(json.dumps(out))


def _run_step(kind: str, src: Path, dst: Path) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, __file__, "_step", kind, str(src), str(dst)],
        capture_output=True,
        text=True,
    )
    if res.returncode:
        sys.exit(f"{kind} failed:\n{res.stderr[-4000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = time.perf_counter() - t0
    return out


def _check(a: Path, b: Path) -> int:
    from mm_megatron.checkpoint.safetensors_io import index_files, read_tensor

    x = index_files(sorted(a.glob("*.safetensors")))
    y = index_files(sorted(b.glob("*.safetensors")))
    if set(x) != set(y):
        sys.exit(f"key sets differ: {sorted(set(x) ^ set(y))[:5]}")
    import torch

    for k in x:
        if not torch.equal(read_tensor(x[k]), read_tensor(y[k])):
            sys.exit(f"tensor {k} differs")
    return len(x)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_step":
        _step(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/mm_megatron_bench", help="scratch directory")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the layers to keep")
    ap.add_argument("--check", action="store_true", help="compare every tensor after the trip")
    ap.add_argument("--keep", action="store_true", help="keep the workdir afterwards")
    ap.add_argument(
        "--assemble",
        action="store_true",
        help="instead: time `convert assemble` of a CLIP-L/336 + Vicuna-7B-shaped pair",
    )
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    hf, mc, back = work / "hf", work / "mcore", work / "hf_back"
    if args.assemble:
        return _bench_assemble(work, args)
    try:
        t0 = time.perf_counter()
        nbytes = synthesize(hf, args.scale)
        print(f"synthesised {nbytes / 1e9:.2f} GB bf16 in {time.perf_counter() - t0:.0f} s ({hf})")
        rows = []
        for kind, src, dst in (("hf-to-mcore", hf, mc), ("mcore-to-hf", mc, back)):
            r = _run_step(kind, src, dst)
            rows.append((kind, r))
            print(
                f"{kind:<12} {r['wall_s']:7.1f} s  {nbytes / 1e9 / r['wall_s']:5.2f} GB/s  "
                f"(CPU {r['cpu_s']:.0f} s)  peak RSS {r['peak_rss'] / 2**30:5.2f} GiB (children "
                f"{r['children_peak_rss'] / 2**30:.2f} GiB)  process {r['process_wall_s']:.1f} s"
            )
        if args.check:
            t0 = time.perf_counter()
            n = _check(hf, back)
            print(f"round trip bit-exact: {n} tensors ({time.perf_counter() - t0:.0f} s)")
        print(json.dumps({"bytes": nbytes, "scale": args.scale, "steps": dict(rows)}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _bench_assemble(work: Path, args) -> int:
    parts, out = work / "parts", work / "assembled"
    try:
        t0 = time.perf_counter()
        nbytes = synthesize_parts(parts, args.scale)
        print(f"synthesised {nbytes / 1e9:.2f} GB bf16 in {time.perf_counter() - t0:.0f} s")
        r = _run_step("assemble", parts, out)
        print(
            f"assemble     {r['wall_s']:7.1f} s  {nbytes / 1e9 / r['wall_s']:5.2f} GB/s  "
            f"(CPU {r['cpu_s']:.0f} s)  peak RSS {r['peak_rss'] / 2**30:5.2f} GiB (children "
            f"{r['children_peak_rss'] / 2**30:.2f} GiB)  process {r['process_wall_s']:.1f} s"
        )
        print(json.dumps({"bytes": nbytes, "scale": args.scale, "assemble": r}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
