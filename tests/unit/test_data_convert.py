"""LLaVA JSON -> webdataset: good records are written and readable, bad ones reported by reason."""

from __future__ import annotations

import io
import json
import os
import runpy
import sys

import pytest
from PIL import Image

from mm_megatron.data.batch import validate_batch
from mm_megatron.data.config import DataConfig
from mm_megatron.data.llava_json import convert_llava_json, main
from mm_megatron.data.loader import build_dataloader
from mm_megatron.data.shards import ShardMembers, resolve_shards
from mm_megatron.data.synthetic import write_synthetic_dataset
from mm_megatron.model.image_tokens import ImageTokenCounter

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _turns(question: str, answer: str = "red") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> dict:
    """An image folder and a LLaVA JSON mixing good and deliberately bad records."""
    root = tmp_path_factory.mktemp("llava")
    images = root / "images"
    (images / "coco").mkdir(parents=True)
    jpeg = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 30, 30)).save(jpeg, format="JPEG")
    (images / "coco" / "a.jpg").write_bytes(jpeg.getvalue())
    Image.new("RGB", (20, 40), (30, 30, 200)).save(images / "b.png")
    Image.new("RGB", (16, 16), (30, 200, 30)).save(images / "c.bmp")  # re-encoded as png
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (images / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    records = [
        {"id": "good-single", "image": "coco/a.jpg", "conversations": _turns("<image>\nColour?")},
        {
            "id": "good-multi",
            "images": ["coco/a.jpg", "b.png"],
            "conversations": _turns("<image>\n<image>\nSame colour?", "no"),
        },
        {"id": "good-text", "conversations": _turns("Opposite of left?", "right")},
        {"id": "good-bmp", "image": "c.bmp", "conversations": _turns("<image> colour?", "green")},
        {"id": "missing", "image": "nope.jpg", "conversations": _turns("<image>\nColour?")},
        {"id": "corrupt", "image": "corrupt.jpg", "conversations": _turns("<image>\nColour?")},
        {"id": "truncated", "image": "truncated.jpg", "conversations": _turns("<image>\nC?")},
        {"id": "mismatch", "image": "coco/a.jpg", "conversations": _turns("Colour?")},
        {"id": "too-many", "conversations": _turns("<image>\nColour?")},
        {"id": "empty", "image": "coco/a.jpg", "conversations": []},
        {"id": "no-answer", "conversations": [{"from": "human", "value": "hello"}]},
        {"id": "broken", "conversations": "hello"},
        "not even a dict",
    ]
    json_path = root / "llava.json"
    json_path.write_text(json.dumps(records))
    return {"root": root, "json": str(json_path), "images": str(images)}


EXPECTED_BAD = {
    "missing_image": ["missing"],
    "unreadable_image": ["corrupt", "truncated"],
    "placeholder_mismatch": ["mismatch", "too-many"],
    "empty_conversation": ["empty", "no-answer"],
    "broken_record": ["broken", 12],
}


def test_convert_skips_and_reports_bad_records(llava, tmp_path):
    out = str(tmp_path / "wds")
    report = convert_llava_json(
        llava["json"], llava["images"], out, samples_per_shard=3, show_progress=False
    )
    assert report.num_records == 13
    assert report.num_written == 4
    assert {reason: [e["id"] for e in v] for reason, v in report.bad.items()} == EXPECTED_BAD
    summary = report.summary()
    assert "skipped: 9" in summary and "unreadable_image: 2 [corrupt, truncated]" in summary
    with open(os.path.join(out, "train.bad_records.json")) as f:
        saved = json.load(f)
    assert sorted(saved) == sorted(EXPECTED_BAD)
    assert [os.path.basename(p) for p in report.shards] == ["train-000000.tar", "train-000001.tar"]

    shards = resolve_shards(out, "train")
    assert [s.num_samples for s in shards] == [3, 1]
    stored = {}
    for shard in shards:
        members = ShardMembers(shard.path)
        for key in members.keys:
            stored[json.loads(members.read(key, "json"))["id"]] = sorted(members.members[key])
    assert stored == {
        "good-single": ["0.jpg", "json"],
        "good-multi": ["0.jpg", "1.png", "json"],
        "good-text": ["json"],
        "good-bmp": ["0.png", "json"],
    }


def test_converted_shards_read_back_as_valid_batches(llava, tmp_path):
    out = str(tmp_path / "wds")
    convert_llava_json(llava["json"], llava["images"], out, show_progress=False, num_workers=2)
    tok_dir = str(tmp_path / "synth")
    write_synthetic_dataset(tok_dir, n_train=20, n_val=0, image_size=16, shard_size=20)
    config = DataConfig(
        val_shards=os.path.join(out, "train.index.json"),
        tokenizer_path=os.path.join(tok_dir, "tokenizer"),
        image_size=24,
        num_workers=0,
        max_bad_fraction=0.0,
    )
    loader = build_dataloader(
        config,
        dp_rank=0,
        dp_size=1,
        micro_batch_size=8,
        image_tokens=ImageTokenCounter(4),
        seed=0,
        split="val",
    )
    batches = list(loader)
    assert len(batches) == 1
    batch = batches[0]
    validate_batch(batch, loader.image_token_id, image_size=24)
    assert batch["num_images"].tolist() == [1, 2, 0, 1]
    assert [key.split("_", 1)[1] for key in batch["sample_keys"]] == [
        "good-single",
        "good-multi",
        "good-text",
        "good-bmp",
    ]
    assert loader.counters.samples_bad == 0


def test_byte_limit_rotates_shards(llava, tmp_path):
    out = str(tmp_path / "wds")
    report = convert_llava_json(
        llava["json"],
        llava["images"],
        out,
        prefix="val",
        samples_per_shard=100,
        max_shard_bytes=2048,
        show_progress=False,
    )
    assert len(report.shards) >= 3
    assert sum(s.num_samples for s in resolve_shards(out, "val")) == 4
    for path in report.shards[:-1]:
        assert os.path.getsize(path) <= 2048 + 10240  # tar end-of-archive padding


def test_main_and_tool_script(llava, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "cli")
    argv = ["--json", llava["json"], "--image-folder", llava["images"], "--out", out, "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "written: 4, skipped: 9" in printed and "train.bad_records.json" in printed
    script_out = str(tmp_path / "script")
    script_argv = [*argv[:-2], script_out, "--quiet", "--prefix", "val"]
    monkeypatch.setattr(sys, "argv", ["llava_to_wds.py", *script_argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(REPO, "tools", "llava_to_wds.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert os.path.isfile(os.path.join(script_out, "val-000000.tar"))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert main(["--json", str(empty), "--image-folder", llava["images"], "--out", out]) == 1
