#!/usr/bin/env python
"""Measure the multimodal data loader's throughput (images/s and samples/s) on this machine.

Writes a synthetic dataset to a temporary directory (or reads `--data`, a directory written by
`mm-megatron data synth`), builds the loader of one data-parallel rank and times `--batches`
batches after `--warmup` batches (worker start-up excluded). Not a test; numbers depend on the
machine's cores.

    .venv/bin/python tools/bench_dataloader.py                       # 64px images -> 64px
    .venv/bin/python tools/bench_dataloader.py --source-size 384 --image-size 336 --workers 2
    .venv/bin/python tools/bench_dataloader.py --data /data/synth --packing --max-seq-len 2048
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from mm_megatron.data.config import DataConfig
from mm_megatron.data.loader import build_dataloader
from mm_megatron.data.synthetic import write_synthetic_dataset
from mm_megatron.model.image_tokens import ImageTokenCounter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="synthetic dataset dir (default: make one)")
    parser.add_argument("--n-train", type=int, default=2000, help="samples when making data")
    parser.add_argument("--source-size", type=int, default=64, help="stored image side")
    parser.add_argument("--image-size", type=int, default=64, help="image side after transform")
    parser.add_argument("--aspect", default="pad", choices=("pad", "resize", "crop"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--tokens-per-image", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--template", default="vicuna_v1")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batches", type=int, default=60)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = os.path.join(tmp, "synth")
            start = time.perf_counter()
            size = args.source_size
            write_synthetic_dataset(data, n_train=args.n_train, n_val=0, image_size=size)
            print(f"wrote {args.n_train} synthetic samples in {time.perf_counter() - start:.1f}s")
        config = DataConfig(
            train_shards=data,
            tokenizer_path=os.path.join(data, "tokenizer"),
            template=args.template,
            image_size=args.image_size,
            image_aspect=args.aspect,
            max_seq_len=args.max_seq_len,
            packing=args.packing,
            num_workers=args.workers,
        )
        loader = build_dataloader(
            config,
            dp_rank=0,
            dp_size=1,
            micro_batch_size=args.micro_batch_size,
            image_tokens=ImageTokenCounter(tokens_per_tile=args.tokens_per_image),
            seed=0,
        )
        batches = iter(loader)
        for _ in range(args.warmup):
            next(batches)
        images = samples = 0
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = next(batches)
            images += batch["images"].shape[0]
            samples += len(batch["sample_keys"])
        elapsed = time.perf_counter() - start
        print(
            f"workers={args.workers} {args.source_size}px->{args.image_size}px "
            f"aspect={args.aspect} packing={args.packing} mbs={args.micro_batch_size}: "
            f"{images / elapsed:.0f} images/s, {samples / elapsed:.0f} samples/s "
            f"({args.batches} batches in {elapsed:.2f}s, {os.cpu_count()} CPUs)"
        )


if __name__ == "__main__":
    main()
