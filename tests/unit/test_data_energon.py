"""The energon backend: same batches as the webdataset backend, deterministic, exact resume
through a pickled (checkpointed) state, weighted blending, and `data convert` output that
energon reads.

The first dataset is made here with energon's own tool (`energon prepare`, non-interactive) on
synthetic shards; the second with `mm-megatron data convert` from a LLaVA JSON.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import pickle
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from mm_megatron.data.batch import validate_batch
from mm_megatron.data.config import DataConfig
from mm_megatron.data.energon import (
    NV_META,
    EnergonDataLoader,
    is_energon_dataset,
    write_energon_metadata,
)
from mm_megatron.data.llava_json import main as convert_main
from mm_megatron.data.loader import build_dataloader
from mm_megatron.data.synthetic import write_synthetic_dataset
from mm_megatron.model.image_tokens import ImageTokenCounter

pytest.importorskip("megatron.energon")

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("energon")
    synth = str(root / "synth")
    _synthetic(synth)
    prepare = [
        sys.executable,
        "-m",
        "megatron.energon.cli.main",
        "prepare",
        synth,
        "--non-interactive",
        "--split-parts",
        "train:train-[0-9]+[.]tar",
        "--split-parts",
        "val:val-[0-9]+[.]tar",
        "--sample-type",
        "CrudeWebdataset",
        "--num-workers",
        "1",
        "--no-progress",
    ]
    try:
        subprocess.run(prepare, check=True, capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:  # energon's forked indexer can die and leave it waiting
        subprocess.run(prepare, check=True, capture_output=True, timeout=120)

    # a second dataset, written by `mm-megatron data convert` from a LLaVA JSON
    images = root / "images"
    images.mkdir()
    records = []
    for i in range(8):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (30 * i, 100, 200)).save(buf, format="JPEG")
        (images / f"{i}.jpg").write_bytes(buf.getvalue())
        turns = [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"},
            {"from": "gpt", "value": "a blue square"},
        ]
        records.append({"id": f"conv{i}", "image": f"{i}.jpg", "conversations": turns})
    (root / "llava.json").write_text(json.dumps(records), encoding="utf-8")
    converted = str(root / "converted")
    argv = ["--json", str(root / "llava.json"), "--image-folder", str(images)]
    assert convert_main([*argv, "--out", converted, "--quiet"]) == 0

    blend = root / "blend.yaml"
    blend.write_text(
        "__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n    blend:\n"
        f"      - weight: 3\n        path: {synth}\n      - weight: 1\n        path: {converted}\n",
        encoding="utf-8",
    )
    return {"synth": synth, "converted": converted, "blend": str(blend)}


def _synthetic(out: str) -> None:
    write_synthetic_dataset(
        out,
        n_train=40,
        n_val=10,
        image_size=IMAGE_SIZE,
        shard_size=10,
        seed=5,
        multi_image_fraction=0.2,
        text_only_fraction=0.1,
    )


def test_indexing_forks_nothing_and_matches_energons_own_tool(datasets, tmp_path, monkeypatch):
    """`write_energon_metadata` indexes in this process (a forked energon worker that crashes
    leaves its parent waiting forever); its index equals the one `energon prepare` writes."""

    def no_process(*args, **kwargs):
        raise AssertionError("write_energon_metadata started a process")

    monkeypatch.setattr(multiprocessing.Process, "start", no_process)
    ours = str(tmp_path / "synth")
    _synthetic(ours)
    assert write_energon_metadata(ours) == ["train", "val"]
    assert is_energon_dataset(ours)
    for name in (".info.json", "split.yaml"):
        theirs = (Path(datasets["synth"]) / NV_META / name).read_text(encoding="utf-8")
        assert (Path(ours) / NV_META / name).read_text(encoding="utf-8") == theirs, name

    def rows(root: str) -> list[tuple]:
        with sqlite3.connect(Path(root) / NV_META / "index.sqlite") as db:
            return db.execute("SELECT * FROM samples ORDER BY tar_file_id, sample_index").fetchall()

    assert len(rows(ours)) == 50
    assert rows(ours) == rows(datasets["synth"])


def _config(shards: str, tokenizer: str, **overrides) -> DataConfig:
    fields = {
        "train_shards": shards,
        "val_shards": shards,
        "tokenizer_path": tokenizer,
        "image_size": IMAGE_SIZE,
        "max_seq_len": 512,
        "num_workers": 0,
        "max_bad_fraction": 0.0,
        **overrides,
    }
    return DataConfig(**fields)


def _loader(config: DataConfig, **kw):
    args = {
        "dp_rank": 0,
        "dp_size": 1,
        "micro_batch_size": 4,
        "image_tokens": ImageTokenCounter(8),
        "seed": 11,
        **kw,
    }
    return build_dataloader(config, **args)


def _take(loader, n: int) -> list[dict]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert x["sample_keys"] == y["sample_keys"]
        for key, value in x.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, y[key]), key


def test_detects_energon_datasets(datasets, tmp_path):
    assert is_energon_dataset(datasets["synth"])
    assert is_energon_dataset(datasets["converted"])  # `data convert` wrote .nv-meta
    assert is_energon_dataset(datasets["blend"])
    assert not is_energon_dataset(str(tmp_path))
    assert not is_energon_dataset(os.path.join(datasets["synth"], "train.index.json"))


def test_val_batches_equal_the_webdataset_backend(datasets):
    tokenizer = os.path.join(datasets["synth"], "tokenizer")
    energon = _loader(_config(datasets["synth"], tokenizer), split="val")
    assert isinstance(energon, EnergonDataLoader)
    native_config = _config(os.path.join(datasets["synth"], "val.index.json"), tokenizer)
    native = _loader(native_config, split="val")
    assert not isinstance(native, EnergonDataLoader)
    got, want = list(energon), list(native)
    assert sum(len(b["sample_keys"]) for b in got) == 10  # multi-image and text-only included
    for batch in got:
        validate_batch(batch, energon.image_token_id, image_size=IMAGE_SIZE)
    _assert_same(got, want)


@pytest.mark.parametrize("packing", [False, True])
def test_train_stream_is_deterministic_and_resumes_exactly(datasets, packing):
    tokenizer = os.path.join(datasets["synth"], "tokenizer")
    config = _config(datasets["synth"], tokenizer, packing=packing, max_seq_len=160)
    first = _loader(config)
    head = _take(first, 3)
    state = pickle.loads(pickle.dumps(first.state_dict()))  # as the checkpoint stores it
    tail = _take(first, 3)
    for batch in head + tail:
        validate_batch(batch, first.image_token_id, image_size=IMAGE_SIZE)
    if packing:
        assert any(len(b["sample_keys"]) > b["input_ids"].shape[0] for b in head + tail)
    _assert_same(_take(_loader(config), 6), head + tail)  # same seed -> same stream
    resumed = _loader(config)
    resumed.load_state_dict(state)
    _assert_same(_take(resumed, 3), tail)
    assert resumed.counters == first.counters
    other_seed = _take(_loader(config, seed=12), 3)
    assert [b["sample_keys"] for b in other_seed] != [b["sample_keys"] for b in head]


def test_blend_follows_the_weights_and_is_deterministic(datasets):
    config = _config(datasets["blend"], os.path.join(datasets["synth"], "tokenizer"))
    batches = _take(_loader(config), 50)
    keys = [k for b in batches for k in b["sample_keys"]]
    counts = Counter("conv" if "conv" in k else "synth" for k in keys)
    assert abs(counts["synth"] / len(keys) - 0.75) < 0.1, counts
    again = _take(_loader(config), 50)
    assert [b["sample_keys"] for b in again] == [b["sample_keys"] for b in batches]


def test_dp_ranks_read_different_samples(datasets):
    config = _config(datasets["synth"], os.path.join(datasets["synth"], "tokenizer"))
    ranks = [_take(_loader(config, dp_rank=r, dp_size=2), 2) for r in (0, 1)]
    keys = [{k for b in batches for k in b["sample_keys"]} for batches in ranks]
    assert not keys[0] & keys[1]


def test_resume_at_another_dp_size_is_refused_in_one_line(datasets):
    """Energon keeps its own per-rank state; at another DP size the trainer refuses in one line
    (it used to reach the webdataset path and fail inside it with an AttributeError)."""
    from mm_megatron.train.data_setup import resume_data_stream, stream_states

    config = _config(datasets["synth"], os.path.join(datasets["synth"], "tokenizer"))
    loader = _loader(config, dp_rank=0, dp_size=2)
    assert stream_states(loader, 0, 2) is None  # nothing of energon's goes into data_streams
    saved = {"layout": {"dp": 1}, "job": {"train": {"global_batch_size": 8}}}
    with pytest.raises(
        ValueError, match=r"resumes only at the DP size .* \(DP 1, global batch 8\)"
    ):
        resume_data_stream(loader, None, saved, 8, 2, 3, 24)
