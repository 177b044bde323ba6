"""``mm-megatron generate``: answer a prompt about images with a trained or converted checkpoint.

Commands::

    mm-megatron generate --ckpt runs/debug-tiny/checkpoints --image cat.png --prompt "What is it?"
    mm-megatron generate --ckpt ckpt/llava7b --image a.jpg --image b.jpg \\
        --prompt "<image> vs <image>: what differs?" --max-new-tokens 100 --temperature 0.7
    mm-megatron generate --ckpt runs/debug-tiny/checkpoints --batch-file images.jsonl --out a.jsonl

The checkpoint (any layout; training output or converter output) loads on one CPU or GPU with the
run's own chat template, tokenizer and image preprocessing (`mm_megatron.infer.loading`); the
answer streams to stdout as it is generated, with a KV cache (`mm_megatron.infer.generate`).

``--batch-file``: one sample per line, either a JSON object ``{"image": PATH | [PATH, ...],
"prompt": TEXT}`` (prompt optional) or a bare image path; the answers go to ``--out`` (or stdout)
as JSON lines ``{"image", "prompt", "answer"}``. Image paths are relative to the batch file.

This module only parses arguments and prints; it does not build models or tokenize.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_PROMPT = "Describe the image briefly."
"""Prompt used when none is given."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate answers about images with a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (training or converter)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--prompt", default=None, help=f"user prompt (default {DEFAULT_PROMPT!r})")
    p.add_argument("--batch-file", default=None, help="JSONL of {image, prompt} or image paths")
    p.add_argument("--out", default=None, help="with --batch-file: write answers here")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iteration", default=None, help="checkpoint iteration (default newest)")
    p.add_argument("--template", default=None, help="override the run's chat template")
    p.add_argument("--tokenizer", default=None, help="override the run's tokenizer directory")
    p.set_defaults(func=_run)


def _read_batch(path: Path) -> list[tuple[list[str], str]]:
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number}: not valid JSON: {e.msg}") from None
            images = record.get("image", record.get("images", []))
            images = images if isinstance(images, list) else [images]
            prompt = record.get("prompt") or DEFAULT_PROMPT
        else:
            images, prompt = [line.strip()], DEFAULT_PROMPT
        items.append(([str(path.parent / i) for i in images], prompt))
    return items


def _load_images(paths: list[str], transform, model, tokenizer_info):
    from mm_megatron.data.image import ImageDecodeError, decode_image
    from mm_megatron.infer.generate import model_image_inputs

    decoded = []
    for p in paths:
        try:
            decoded.append(decode_image(Path(p).read_bytes()))
        except OSError as e:
            raise FileNotFoundError(f"--image {p}: {e.strerror or e}") from None
        except ImageDecodeError as e:
            raise ValueError(f"--image {p}: not a readable image ({e})") from None
    # [tiles, 3, H, W], per-placeholder facts
    return model_image_inputs(model, transform, decoded, tokenizer_info)


def _run(args: argparse.Namespace) -> int:
    if args.batch_file is None and not args.image and args.prompt is None:
        raise ValueError("give --image and/or --prompt, or --batch-file")
    from mm_megatron.infer.generate import Generator, build_prompt
    from mm_megatron.infer.loading import load_for_inference
    from mm_megatron.runtime import distributed

    iteration = args.iteration
    if iteration is not None and iteration != "release":
        iteration = int(iteration)
    try:
        bundle = load_for_inference(
            args.ckpt, iteration=iteration, template=args.template, tokenizer=args.tokenizer
        )
        generator = Generator(bundle.model, bundle.tokenizer, bundle.template)
        if args.batch_file is not None:
            items = _read_batch(Path(args.batch_file))
        else:
            items = [(list(args.image), args.prompt or DEFAULT_PROMPT)]
        out = open(args.out, "w", encoding="utf-8") if args.out else None  # noqa: SIM115
        try:
            for paths, prompt in items:
                images, extras = _load_images(
                    paths, bundle.transform, bundle.model, bundle.tokenizer
                )
                ids = build_prompt(
                    bundle.tokenizer, bundle.template, prompt, len(paths), bundle.system_prompt
                )
                stream = None
                if args.batch_file is None:
                    stream = lambda text: print(text, end="", flush=True)  # noqa: E731
                result = generator.generate(
                    images,
                    ids,
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    seed=args.seed,
                    on_text=stream,
                    image_inputs=extras,
                )
                if args.batch_file is None:
                    print(flush=True)
                    continue
                line = json.dumps({"image": paths, "prompt": prompt, "answer": result.text})
                print(line, file=out or sys.stdout, flush=True)
        finally:
            if out is not None:
                out.close()
    finally:
        distributed.destroy()
    return 0
