"""Packing: rows never exceed the capacity, every sample is kept once, output is deterministic."""

from __future__ import annotations

import os
import random

import pytest
import torch

from mm_megatron.data.batch import expanded_length, validate_batch
from mm_megatron.data.config import DataConfig
from mm_megatron.data.loader import build_dataloader
from mm_megatron.data.packing import KnapsackBatcher, greedy_knapsack
from mm_megatron.data.synthetic import write_synthetic_dataset
from mm_megatron.model.image_tokens import ImageTokenCounter


@pytest.mark.parametrize("seed", range(5))
def test_greedy_knapsack_keeps_everything_within_capacity(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 100) for _ in range(200)]
    rows = greedy_knapsack(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert all(row == sorted(row) for row in rows)
    assert rows == greedy_knapsack(lengths, 128)
    # Best-fit decreasing stays close to the lower bound on the number of rows.
    assert len(rows) <= 1.25 * sum(lengths) / 128 + 1


def test_greedy_knapsack_row_limit_and_errors():
    assert greedy_knapsack([60, 60, 60], 100, max_rows=2) is None
    assert greedy_knapsack([60, 40, 60, 40], 100, max_rows=2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError):
        greedy_knapsack([101], 100)


def test_knapsack_batcher_batches_are_contiguous_and_full():
    rng = random.Random(0)
    lengths = [rng.randint(5, 90) for _ in range(300)]
    batches, batcher, start = [], KnapsackBatcher(100, 4), 0
    for i, n in enumerate(lengths):
        if not batcher.try_add(n):
            batches.append([[start + j for j in row] for row in batcher.rows()])
            batcher.reset()
            start = i
            assert batcher.try_add(n)
    batches.append([[start + j for j in row] for row in batcher.rows()])
    flat = [i for batch in batches for row in batch for i in row]
    assert sorted(flat) == list(range(300))
    for batch in batches:
        assert len(batch) <= 4
        assert all(sum(lengths[i] for i in row) <= 100 for row in batch)
        members = sorted(i for row in batch for i in row)
        assert members == list(range(members[0], members[-1] + 1))  # a contiguous run
    fill = sum(lengths) / (100 * 4 * len(batches))
    assert fill > 0.8


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synth"))
    write_synthetic_dataset(out, n_train=10, n_val=60, image_size=16, shard_size=25, seed=2)
    return out


@pytest.mark.parametrize("tokens_per_image", [1, 24])
def test_loader_packs_within_max_seq_len_and_keeps_all_samples(synth_dir, tokens_per_image):
    max_seq_len = 160
    config = DataConfig(
        val_shards=synth_dir,
        tokenizer_path=os.path.join(synth_dir, "tokenizer"),
        image_size=16,
        max_seq_len=max_seq_len,
        packing=True,
        num_workers=0,
        max_bad_fraction=0.0,
    )
    loader = build_dataloader(
        config,
        dp_rank=0,
        dp_size=1,
        micro_batch_size=3,
        image_tokens=ImageTokenCounter(tokens_per_image),
        seed=0,
        split="val",
    )
    image_id = loader.image_token_id
    keys = []
    packed_rows = 0
    for batch in loader:
        validate_batch(batch, image_id, image_size=16)
        assert batch["input_ids"].shape[0] <= 3
        for row, lengths in enumerate(batch["seq_lens"].tolist()):
            start, total = 0, 0
            for n in (n for n in lengths if n):
                part = batch["input_ids"][row, start : start + n]
                total += expanded_length(n, [tokens_per_image] * int((part == image_id).sum()))
                start += n
            assert total <= max_seq_len
            packed_rows += sum(1 for n in lengths if n) > 1
        keys.extend(batch["sample_keys"])
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 60
    assert packed_rows > 0
    assert loader.counters.samples_bad == 0


def test_packed_labels_never_cross_a_boundary(synth_dir):
    config = DataConfig(
        val_shards=synth_dir,
        tokenizer_path=os.path.join(synth_dir, "tokenizer"),
        image_size=16,
        max_seq_len=400,
        packing=True,
        num_workers=0,
        template="chatml",
    )
    loader = build_dataloader(
        config,
        dp_rank=0,
        dp_size=1,
        micro_batch_size=2,
        image_tokens=ImageTokenCounter(4),
        seed=0,
        split="val",
    )
    batch = next(iter(loader))
    validate_batch(batch, loader.image_token_id)
    starts = torch.cumsum(batch["seq_lens"], dim=1)[:, :-1]
    for row in range(starts.shape[0]):
        for s in starts[row].tolist():
            if s < batch["labels"].shape[1]:
                assert batch["labels"][row, s] == -100
