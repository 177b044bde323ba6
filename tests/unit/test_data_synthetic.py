"""Synthetic dataset: determinism, layout, dataset_info, and its tokenizer loading offline."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from mm_megatron.data.shards import ShardMembers, resolve_shards
from mm_megatron.data.synthetic import COLOURS, POSITIONS, SHAPES, main, write_synthetic_dataset
from mm_megatron.data.tokenizer import load_tokenizer, prepare_tokenizer


def _digest(directory: str) -> dict[str, str]:
    digests = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synth"))
    write_synthetic_dataset(out, n_train=120, n_val=30, image_size=32, shard_size=50, seed=7)
    return out


def test_same_seed_gives_identical_bytes(synth_dir, tmp_path):
    again = str(tmp_path / "again")
    write_synthetic_dataset(again, n_train=120, n_val=30, image_size=32, shard_size=50, seed=7)
    assert _digest(synth_dir) == _digest(again)
    other = str(tmp_path / "other")
    write_synthetic_dataset(other, n_train=120, n_val=30, image_size=32, shard_size=50, seed=8)
    assert _digest(other)["train-000000.tar"] != _digest(synth_dir)["train-000000.tar"]


def test_layout_and_dataset_info(synth_dir):
    with open(os.path.join(synth_dir, "dataset_info.json")) as f:
        info = json.load(f)
    assert info["splits"]["train"]["num_samples"] == 120
    assert info["splits"]["train"]["num_shards"] == 3
    assert info["splits"]["val"]["num_samples"] == 30
    assert info["image_size"] == 32
    assert info["labels"] == {
        "colours": sorted(COLOURS),
        "shapes": list(SHAPES),
        "positions": sorted(POSITIONS),
    }
    assert info["tokenizer"]["special_tokens"]["<image>"] == 4
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.isfile(os.path.join(synth_dir, "tokenizer", name))
    shards = resolve_shards(synth_dir, "train")
    assert [s.num_samples for s in shards] == [50, 50, 20]
    assert [os.path.basename(s.path) for s in shards] == [f"train-00000{i}.tar" for i in range(3)]
    val_keys = {k for s in resolve_shards(synth_dir, "val") for k in ShardMembers(s.path).keys}
    train_keys = {k for s in shards for k in ShardMembers(s.path).keys}
    assert not val_keys & train_keys


def test_records_follow_the_shard_format(synth_dir):
    kinds = {"text": 0, "single": 0, "multi": 0}
    for shard in resolve_shards(synth_dir, "train"):
        members = ShardMembers(shard.path)
        for key in members.keys:
            record = json.loads(members.read(key, "json"))
            n = len(record["images"])
            placeholders = sum(t["value"].count("<image>") for t in record["conversations"])
            assert placeholders == n
            assert sorted(members.members[key]) == sorted(["json", *[f"{i}.jpg" for i in range(n)]])
            assert record["conversations"][0]["from"] == "human"
            assert record["conversations"][1]["from"] == "gpt"
            kinds["text" if n == 0 else "single" if n == 1 else "multi"] += 1
    assert all(count > 0 for count in kinds.values()), kinds


def test_tokenizer_loads_offline_and_round_trips(synth_dir):
    tokenizer = load_tokenizer(os.path.join(synth_dir, "tokenizer"))
    info = prepare_tokenizer(tokenizer)
    assert not info.added_image_token
    assert (info.image_token_id, info.pad_token_id, info.bos_token_id, info.eos_token_id) == (
        4,
        3,
        1,
        2,
    )
    text = "USER: <image>\nWhat colour is the shape? ASSISTANT: a red star at the top</s>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(4) == 1 and ids.count(2) == 1
    assert tokenizer.decode(ids) == text
    # Text outside the synthetic vocabulary still round-trips (byte-level BPE).
    odd = "Zebra 42 <|eot_id|> ünïcödé"
    assert tokenizer.decode(tokenizer(odd, add_special_tokens=False)["input_ids"]) == odd
    assert len(tokenizer("red", add_special_tokens=False)["input_ids"]) == 1


def test_main_writes_a_dataset(tmp_path, capsys):
    out = str(tmp_path / "cli")
    argv = ["--out", out, "--n-train", "10", "--n-val", "4", "--image-size", "16"]
    assert main([*argv, "--shard-size", "4", "--image-format", "png"]) == 0
    assert "train: 10 samples in 3 shards" in capsys.readouterr().out
    shard = resolve_shards(out, "train")[0]
    members = ShardMembers(shard.path)
    assert all(ext in ("json", "0.png", "1.png") for m in members.members.values() for ext in m)
