"""The loader: valid batches, DP/worker sharding, exact resume, bad-sample counting/threshold."""

from __future__ import annotations

import io
import json
import logging
import os

import pytest
import torch
from PIL import Image

from mm_megatron.data.batch import validate_batch
from mm_megatron.data.config import DataConfig
from mm_megatron.data.loader import TooManyBadSamplesError, build_dataloader
from mm_megatron.data.shards import ShardWriter, encode_sample
from mm_megatron.data.synthetic import write_synthetic_dataset
from mm_megatron.model.image_tokens import ImageTokenCounter

IMAGE_SIZE = 32
TOKENS_PER_IMAGE = 8


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synth"))
    write_synthetic_dataset(
        out,
        n_train=90,
        n_val=25,
        image_size=IMAGE_SIZE,
        shard_size=20,
        seed=5,
        multi_image_fraction=0.15,
        text_only_fraction=0.1,
    )
    return out


def _config(synth_dir: str, **overrides) -> DataConfig:
    fields = {
        "train_shards": synth_dir,
        "val_shards": synth_dir,
        "tokenizer_path": os.path.join(synth_dir, "tokenizer"),
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
        "image_tokens": ImageTokenCounter(TOKENS_PER_IMAGE),
        "seed": 11,
        **kw,
    }
    return build_dataloader(config, **args)


def _take(loader, n: int) -> tuple[list[dict], list[dict]]:
    """First n batches and the loader state after each."""
    batches, states = [], []
    for batch in loader:
        batches.append(batch)
        states.append(loader.state_dict())
        if len(batches) == n:
            break
    return batches, states


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert x["sample_keys"] == y["sample_keys"]
        for key, value in x.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, y[key]), key


def test_batches_follow_the_contract_with_multi_image_and_text_only(synth_dir):
    loader = _loader(_config(synth_dir, pad_to_multiple_of=8), split="val")
    batches = list(loader)
    assert [len(b["sample_keys"]) for b in batches] == [4] * 6 + [1]  # 25 samples, one pass
    per_row = torch.cat([b["num_images"] for b in batches]).tolist()
    assert 0 in per_row and 2 in per_row and 1 in per_row
    for batch in batches:
        validate_batch(batch, loader.image_token_id, image_size=IMAGE_SIZE)
        assert batch["input_ids"].shape[1] % 8 == 0
        assert "seq_lens" not in batch
    assert len({k for b in batches for k in b["sample_keys"]}) == 25
    assert loader.state_dict()["sample_position"] == 25


def test_fixed_pad_to(synth_dir):
    loader = _loader(_config(synth_dir, pad_to=160), split="val")
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 160)
    validate_batch(batch, loader.image_token_id)


def test_dp_ranks_partition_each_epoch(synth_dir):
    config = _config(synth_dir)
    epochs = []
    for epoch in range(2):
        per_rank = []
        for rank in range(4):
            loader = _loader(config, dp_rank=rank, dp_size=4, micro_batch_size=1)
            loader.load_state_dict({"sample_position": epoch * loader.samples_per_epoch})
            batches, _ = _take(loader, loader.samples_per_epoch)
            per_rank.append([k for b in batches for k in b["sample_keys"]])
        assert sorted(len(keys) for keys in per_rank) == [22, 22, 23, 23]
        flat = [k for keys in per_rank for k in keys]
        assert len(flat) == len(set(flat)) == 90  # no overlap, full cover
        epochs.append(per_rank)
    assert epochs[0][0] != epochs[1][0]  # reshuffled per epoch


def test_workers_do_not_change_the_stream(synth_dir):
    reference, _ = _take(_loader(_config(synth_dir)), 8)
    with_workers, _ = _take(_loader(_config(synth_dir, num_workers=2)), 8)
    _assert_same_batches(reference, with_workers)
    # A finite stream whose workers run out at different times keeps its order too.
    val = list(_loader(_config(synth_dir, num_workers=0), split="val", micro_batch_size=3))
    val_workers = list(_loader(_config(synth_dir, num_workers=2), split="val", micro_batch_size=3))
    _assert_same_batches(val, val_workers)


@pytest.mark.parametrize("packing", [False, True])
def test_resume_at_position_matches_uninterrupted(synth_dir, packing):
    config = _config(synth_dir, packing=packing, max_seq_len=200)
    # 30 batches cross at least one epoch boundary (90 samples per epoch).
    full, states = _take(_loader(config), 30)
    for cut in (3, 17):
        position = states[cut - 1]["sample_position"]
        resumed, _ = _take(_loader(config, start_sample=position), 30 - cut)
        _assert_same_batches(full[cut:], resumed)
    # load_state_dict, with workers this time, gives the same continuation.
    loader = _loader(_config(synth_dir, packing=packing, max_seq_len=200, num_workers=2))
    loader.load_state_dict(states[9])
    resumed, resumed_states = _take(loader, 6)
    _assert_same_batches(full[10:16], resumed)
    assert resumed_states == states[10:16]  # positions and counters


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def _write_dataset_with_bad_samples(out: str) -> dict[str, str]:
    """20 good samples plus one of each kind of bad sample; returns key -> expected reason."""
    turns = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "green"}]
    record = {"id": "x", "conversations": turns, "images": ["a.jpg"]}
    good = encode_sample("good", record, [("jpg", _jpeg())])
    bad = {
        "brokenjson": ({**good, "json": b"{not json"}, "broken_json"),
        "corrupt": ({**good, "0.jpg": b"\xff\xd8\xff garbage"}, "corrupt_image"),
        "truncated": ({**good, "0.jpg": _jpeg()[:60]}, "corrupt_image"),
        "noimage": ({k: v for k, v in good.items() if k != "0.jpg"}, "missing_image"),
        "empty": (
            {**good, "json": json.dumps({"id": "e", "conversations": [], "images": []}).encode()},
            "empty_conversation",
        ),
        "mismatch": (
            {**good, "json": json.dumps({**record, "images": ["a.jpg", "b.jpg"]}).encode()},
            "placeholder_mismatch",
        ),
        "toolong": (
            {
                **good,
                "json": json.dumps(
                    {**record, "conversations": [turns[0], {"from": "gpt", "value": "red " * 300}]}
                ).encode(),
            },
            "too_long",
        ),
    }
    expected = {}
    with ShardWriter(out, "val", samples_per_shard=9) as writer:
        for i in range(20):
            writer.write({**good, "__key__": f"good{i:02d}"})
            if i % 3 == 0 and bad:
                key, (sample, reason) = bad.popitem()
                writer.write({**sample, "__key__": key})
                expected[key] = reason
    return expected


def test_bad_samples_are_skipped_counted_and_logged(synth_dir, tmp_path, caplog):
    out = str(tmp_path / "bad")
    expected = _write_dataset_with_bad_samples(out)
    assert len(expected) == 7
    config = _config(synth_dir, val_shards=out, max_seq_len=256, max_bad_fraction=0.5)
    loader = _loader(config, split="val")
    with caplog.at_level(logging.WARNING, logger="mm_megatron.data.loader"):
        batches = list(loader)
    keys = [k for b in batches for k in b["sample_keys"]]
    assert keys == [f"good{i:02d}" for i in range(20)]
    for batch in batches:
        validate_batch(batch, loader.image_token_id, image_size=IMAGE_SIZE)
    counters = loader.counters
    assert (counters.samples_read, counters.samples_bad) == (27, 7)
    reasons: dict[str, int] = {}
    for reason in expected.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    assert counters.bad_by_reason == reasons
    for key, reason in expected.items():
        assert any(
            key in r.message and reason in r.message and "val-0000" in r.message
            for r in caplog.records
        ), key


def test_truncated_shard_keeps_its_readable_samples(synth_dir, tmp_path):
    out = tmp_path / "cut"
    out.mkdir()
    src = os.path.join(synth_dir, "val-000000.tar")
    with open(src, "rb") as f:
        data = f.read()
    (out / "val-000000.tar").write_bytes(data[: len(data) // 2])
    index = {
        "format": "mm_megatron-wds-v1",
        "prefix": "val",
        "num_samples": 20,
        "shards": [{"file": "val-000000.tar", "num_samples": 20}],
    }
    (out / "val.index.json").write_text(json.dumps(index))
    loader = _loader(_config(synth_dir, val_shards=str(out), max_bad_fraction=1.0), split="val")
    good = sum(len(b["sample_keys"]) for b in loader)
    assert 5 < good < 15
    assert loader.counters.bad_by_reason == {"unreadable_shard": 20 - good}


def test_bad_fraction_threshold_raises(synth_dir, tmp_path):
    out = str(tmp_path / "bad")
    _write_dataset_with_bad_samples(out)
    strict = _config(synth_dir, val_shards=out, max_seq_len=256, max_bad_fraction=0.1)
    with pytest.raises(TooManyBadSamplesError, match="bad_by_reason|by reason"):
        list(
            _loader(
                _config(synth_dir, **{**strict.__dict__, "min_samples_for_bad_check": 5}),
                split="val",
            )
        )
    # Below the minimum sample count the fraction is not checked.
    lenient = _config(synth_dir, **{**strict.__dict__, "min_samples_for_bad_check": 1000})
    assert sum(len(b["sample_keys"]) for b in _loader(lenient, split="val")) == 20


def test_config_errors_are_clear(synth_dir):
    with pytest.raises(ValueError, match="template"):
        _loader(_config(synth_dir, template="alpaca"))
    with pytest.raises(ValueError, match="dp_rank"):
        _loader(_config(synth_dir), dp_rank=2, dp_size=2)
    with pytest.raises(FileNotFoundError):
        _loader(_config(synth_dir, train_shards=os.path.join(synth_dir, "nope-*.tar")))


@pytest.mark.parametrize("new_dp", [1, 3])
def test_packed_stream_with_bad_samples_resumes_at_another_dp_exactly_once(
    synth_dir, tmp_path, new_dp
):
    """Issue 19 item 9 with packing and bad samples: the DP ranks run unevenly ahead (a packed
    row holds several samples; a bad sample is skipped), yet a resume at another DP size reads
    every good sample of the epoch exactly once and carries the bad-sample counts over."""
    from mm_megatron.train.data_setup import resume_data_stream

    out = str(tmp_path / "bad")
    bad = _write_dataset_with_bad_samples(out)
    config = _config(synth_dir, val_shards=out, packing=True, max_seq_len=160, max_bad_fraction=1)

    def loaders(dp: int) -> list:
        return [
            _loader(config, split="val", dp_rank=r, dp_size=dp, micro_batch_size=2, block=6 // dp)
            for r in range(dp)
        ]

    before, streams = [], []
    for loader in loaders(2):  # one step of DP=2: one packed batch per rank
        batch = next(iter(loader))
        before += batch["sample_keys"]
        streams.append(loader.state_dict())
    positions = [s["sample_position"] for s in streams]
    assert len(before) > 6 and positions[0] != positions[1]  # packed past the step, unevenly
    saved = {
        "layout": {"dp": 2},
        "job": {"train": {"global_batch_size": 6}},
        "data_streams": streams,
    }
    after, bad_seen = [], 0
    for loader in loaders(new_dp):
        notes = resume_data_stream(loader, None, saved, 6, new_dp, 1, 6)
        assert f"data-parallel size changed from 2 to {new_dp}" in notes[-1]
        after += [k for batch in loader for k in batch["sample_keys"]]
        bad_seen += loader.counters.samples_bad
    keys = before + after
    assert len(keys) == len(set(keys)) == 20, sorted(keys)  # every good sample exactly once
    assert bad_seen == len(bad)  # the 7 bad samples: counted before (carried over) or after
