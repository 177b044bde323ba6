"""LLaVA-style JSON + an image folder -> webdataset shards (the format of `shards.py`).

What this file does: reads a LLaVA JSON list (or JSONL) of records
`{"id", "image": str | [str] | "images": [str], "conversations": [{"from", "value"}]}`, checks each
record and writes the good ones into `<prefix>-NNNNNN.tar` shards (rotating by sample count and/or
bytes) with a `<prefix>.index.json`, and records the split (and the chat template, when given) in
the directory's `dataset_info.json`, so training on the directory finds them. Bad records are
skipped, never written, and reported by reason with their ids (on stdout and in
`<prefix>.bad_records.json`):

- `broken_json`: a JSONL line that does not parse (its line number is the id)
- `broken_record`: not a dict, or turns/images of the wrong type
- `empty_conversation`: no turns, or no assistant turn
- `placeholder_mismatch`: number of `<image>` placeholders != number of images
- `missing_image`: an image file does not exist
- `unreadable_image`: pillow cannot decode an image (only checked with `verify_images`)

Image bytes are copied unchanged when pillow recognises them as JPEG, PNG or WebP; other formats
are re-encoded as PNG. A tqdm bar shows progress; `num_workers` > 0 checks and reads records in a
process pool (output order stays the input order). `mm-megatron data convert` and
`tools/llava_to_wds.py` call `main(argv)`, which also indexes the output directory for
megatron-energon (`energon.write_energon_metadata`; `--no-energon` skips it), so the same shards
load through energon's loader too.

What it does not do: download images, resize them, or split train/val (convert each split's JSON).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import Pool
from typing import Any

from PIL import Image
from tqdm import tqdm

from mm_megatron.data.dataset_info import record_split
from mm_megatron.data.shards import ShardWriter, encode_sample, sample_key
from mm_megatron.data.templates import TEMPLATE_NAMES

CONVERT_BAD_REASONS = (
    "broken_json",
    "broken_record",
    "empty_conversation",
    "placeholder_mismatch",
    "missing_image",
    "unreadable_image",
)
"""Reasons a record is skipped."""

_PIL_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_SUFFIX_EXT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


class _BadRecord(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class ConvertReport:
    """Outcome of a conversion."""

    num_records: int = 0
    """Records read from the JSON."""

    num_written: int = 0
    """Records written to shards."""

    bad: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """reason -> [{"index", "id", "detail"}] of the skipped records."""

    shards: list[str] = field(default_factory=list)
    """Paths of the shards written."""

    index_path: str = ""
    """Path of the `<prefix>.index.json` written."""

    @property
    def num_bad(self) -> int:
        """Records skipped."""
        return sum(len(v) for v in self.bad.values())

    def summary(self, max_ids: int = 10) -> str:
        """A human-readable report, listing up to `max_ids` record ids per reason."""
        lines = [
            f"records: {self.num_records}, written: {self.num_written}, skipped: {self.num_bad}, "
            f"shards: {len(self.shards)} ({self.index_path})"
        ]
        for reason in sorted(self.bad):
            entries = self.bad[reason]
            ids = ", ".join(str(e["id"]) for e in entries[:max_ids])
            more = f" (+{len(entries) - max_ids} more)" if len(entries) > max_ids else ""
            lines.append(f"  {reason}: {len(entries)} [{ids}{more}]")
        return "\n".join(lines)


@dataclass(frozen=True)
class BrokenLine:
    """A JSONL line that does not parse; it becomes a `broken_json` bad record."""

    line: int
    """1-based line number in the file."""
    error: str
    """The parser's message."""


def load_records(path: str) -> list[Any]:
    """Records of a LLaVA JSON file (a list) or a JSONL file (one record per line).

    A JSONL line that does not parse is returned as a `BrokenLine` (skipped and counted later);
    a JSON list that does not parse is an error naming the file and position.
    """
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            records: list[Any] = []
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    records.append(BrokenLine(number, f"{e.msg} at column {e.colno}"))
            return records
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}") from e
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def _check_record(record: Any) -> tuple[list[dict], list[str]]:
    """Validate the record's structure; return (conversations, image names)."""
    if isinstance(record, BrokenLine):
        raise _BadRecord("broken_json", f"line {record.line}: {record.error}")
    if not isinstance(record, dict):
        raise _BadRecord("broken_record", f"record is a {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise _BadRecord("broken_record", "`conversations` is missing or not a list")
    if not turns:
        raise _BadRecord("empty_conversation", "`conversations` is empty")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise _BadRecord("broken_record", f"turn {i} is not {{from, value: str}}")
        if turn.get("from") not in ("human", "user", "gpt", "assistant", "system"):
            raise _BadRecord("broken_record", f"turn {i} has role {turn.get('from')!r}")
    if not any(t["from"] in ("gpt", "assistant") for t in turns):
        raise _BadRecord("empty_conversation", "no assistant turn")
    if "images" in record:
        images = record["images"]
    elif "image" in record:  # LLaVA-style datasets write a list here for multi-image records
        image = record["image"]
        images = image if isinstance(image, list) else [image]
    else:
        images = []
    if not isinstance(images, list) or not all(isinstance(x, str) and x for x in images):
        raise _BadRecord("broken_record", f"images must be non-empty strings: {images!r}")
    placeholders = sum(t["value"].count("<image>") for t in turns)
    if placeholders != len(images):
        raise _BadRecord(
            "placeholder_mismatch", f"{placeholders} placeholders for {len(images)} images"
        )
    return turns, images


def _read_image(image_folder: str, name: str, verify: bool) -> tuple[str, bytes]:
    path = os.path.join(image_folder, name)
    if not os.path.isfile(path):
        raise _BadRecord("missing_image", f"{path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    ext = _SUFFIX_EXT.get(os.path.splitext(name)[1].lower())
    if not verify and ext is not None:
        return ext, data
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            ext = _PIL_FORMAT_EXT.get(img.format or "")
            if ext is None:
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="PNG")
                return "png", buf.getvalue()
    except Exception as e:  # pillow raises many types for broken files
        raise _BadRecord("unreadable_image", f"{path}: {type(e).__name__}: {e}") from e
    return ext, data


def prepare_record(args: tuple[int, Any, str, bool]) -> tuple[int, Any, dict | None, str, str]:
    """Check one record and load its images (runs in pool workers).

    Args:
        args: (index in the JSON, record, image folder, verify images).

    Returns:
        (index, record id, webdataset sample or None, bad reason, detail).
    """
    index, record, image_folder, verify = args
    record_id = record.get("id", index) if isinstance(record, dict) else index
    if isinstance(record, BrokenLine):
        record_id = f"line {record.line}"
    try:
        turns, names = _check_record(record)
        payload = [_read_image(image_folder, name, verify) for name in names]
    except _BadRecord as e:
        return index, record_id, None, e.reason, e.detail
    stored = {"id": str(record_id), "conversations": turns, "images": names}
    return index, record_id, encode_sample(sample_key(index, record_id), stored, payload), "", ""


def convert_llava_json(
    json_path: str,
    image_folder: str,
    out_dir: str,
    *,
    prefix: str = "train",
    samples_per_shard: int = 1000,
    max_shard_bytes: int | None = None,
    verify_images: bool = True,
    num_workers: int = 0,
    limit: int | None = None,
    show_progress: bool = True,
    template: str | None = None,
) -> ConvertReport:
    """Convert a LLaVA JSON file and its images into webdataset shards.

    Args:
        json_path: LLaVA JSON (list) or JSONL file.
        image_folder: Folder the records' image paths are relative to.
        out_dir: Where shards, the index and the bad-record report go.
        prefix: Shard name prefix (`train` -> `train-000000.tar`).
        samples_per_shard: Most samples per shard.
        max_shard_bytes: Most bytes per shard (None: no limit).
        verify_images: Decode every image fully to catch corrupt files.
        num_workers: Processes that check records and read images (0: this process).
        limit: Convert only the first `limit` records.
        show_progress: Show a tqdm progress bar.
        template: Chat template to record in `dataset_info.json` (training then uses it when
            `data.template` is not set).
    """
    records = load_records(json_path)
    if limit is not None:
        records = records[:limit]
    report = ConvertReport(num_records=len(records))
    tasks = ((i, r, image_folder, verify_images) for i, r in enumerate(records))
    pool = Pool(num_workers) if num_workers > 0 else None
    results: Iterator = (
        pool.imap(prepare_record, tasks, chunksize=16) if pool else map(prepare_record, tasks)
    )
    writer = ShardWriter(
        out_dir, prefix, samples_per_shard=samples_per_shard, max_shard_bytes=max_shard_bytes
    )
    try:
        for index, record_id, sample, reason, detail in tqdm(
            results, total=len(records), desc=f"convert {prefix}", disable=not show_progress
        ):
            if sample is None:
                entry = {"index": index, "id": record_id, "detail": detail}
                report.bad.setdefault(reason, []).append(entry)
                continue
            writer.write(sample)
            report.num_written += 1
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        report.shards = writer.close()
    report.index_path = writer.index_path
    record_split(
        out_dir,
        "val" if prefix in ("val", "validation") else prefix,
        os.path.basename(writer.index_path),
        report.num_written,
        num_shards=len(report.shards),
        template=template,
    )
    with open(os.path.join(out_dir, f"{prefix}.bad_records.json"), "w", encoding="utf-8") as f:
        json.dump(report.bad, f, indent=1, default=str)
        f.write("\n")
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line: `mm-megatron data convert --json F --image-folder D --out O`.

    Returns 0 when at least one record was written, 1 otherwise.
    """
    parser = argparse.ArgumentParser(
        prog="mm-megatron data convert",
        description="Convert LLaVA-style JSON + images into webdataset shards.",
    )
    parser.add_argument("--json", required=True, help="LLaVA JSON list or JSONL file")
    parser.add_argument("--image-folder", required=True, help="folder image paths are relative to")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--prefix", default="train", help="shard name prefix (default train)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-shard-bytes", type=int, default=None)
    parser.add_argument(
        "--no-verify", action="store_true", help="do not decode images (faster, trusts files)"
    )
    parser.add_argument("--workers", type=int, default=0, help="processes reading images")
    parser.add_argument("--limit", type=int, default=None, help="convert the first N records")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-energon", action="store_true", help="skip the megatron-energon index (.nv-meta/)"
    )
    parser.add_argument(
        "--template",
        choices=TEMPLATE_NAMES,
        default=None,
        help="chat template recorded in dataset_info.json (training uses it by default)",
    )
    args = parser.parse_args(argv)
    report = convert_llava_json(
        args.json,
        args.image_folder,
        args.out,
        prefix=args.prefix,
        samples_per_shard=args.samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        verify_images=not args.no_verify,
        num_workers=args.workers,
        limit=args.limit,
        show_progress=not args.quiet,
        template=args.template,
    )
    print(report.summary())
    if report.num_written and not args.no_energon:
        from mm_megatron.data.energon import write_energon_metadata

        splits = write_energon_metadata(args.out)
        print(f"energon: {args.out}/.nv-meta indexed (splits: {', '.join(splits)})")
    if report.num_bad:
        print(f"full list: {os.path.join(args.out, args.prefix + '.bad_records.json')}")
    return 0 if report.num_written else 1


if __name__ == "__main__":
    sys.exit(main())
