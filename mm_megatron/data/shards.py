"""The on-disk sample format: webdataset tar shards plus a small index file.

Format (written by `convert.py` and `synthetic.py`, read by `reader.py`):

- Shards are plain (uncompressed) tar files named `<prefix>-000000.tar`, `<prefix>-000001.tar`, ...
  Each sample is the group of tar members sharing a `__key__` (webdataset's convention: the
  member name up to the first dot of its base name). Keys contain only `[A-Za-z0-9_-]`.
- Per sample:
  - `<key>.json`: the LLaVA record, UTF-8 JSON:
    `{"id": str, "conversations": [{"from": "human"|"gpt", "value": str}, ...],
    "images": [original file name, ...]}`. Each image is one `<image>` placeholder in the human
    turns, in order; `images` is `[]` for text-only samples.
  - `<key>.0.jpg`, `<key>.1.png`, ...: the encoded bytes of image i of `images` (extension jpg,
    png or webp; the original bytes, not re-encoded, whenever pillow recognised the format).
- `<prefix>.index.json` next to the shards: `{"format": "mm_megatron-wds-v1", "prefix": ...,
  "num_samples": N, "shards": [{"file": "<prefix>-000000.tar", "num_samples": n,
  "num_bytes": b}, ...]}`. The reader takes per-shard sample counts from it; without it, it counts
  by scanning the tar headers.

What this file does: key naming, the rotating `ShardWriter`, resolving a shard specification to
files with sample counts (`resolve_shards`), and random access to one sample's members inside a
shard (`ShardMembers`).

What it does not do: decode images or tokenize (`samples.py`), or order samples (`reader.py`).
Remote URLs (`pipe:`, `s3://`) are not supported; shards must be local (or mounted) files.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Any, BinaryIO

from webdataset import TarWriter
from webdataset.tariterators import base_plus_ext

FORMAT_NAME = "mm_megatron-wds-v1"
"""Value of `format` in index files."""

IMAGE_EXTENSIONS = ("jpg", "png", "webp", "jpeg")
"""Image member extensions the reader looks for, in this order."""

FIXED_MTIME = 1_700_000_000
"""Member mtime written into shards, so equal content gives byte-identical tar files."""


def sample_key(index: int, record_id: Any) -> str:
    """A tar-safe, unique key: the record's position, then its id with odd characters replaced.

    Args:
        index: Position of the record in its source (makes the key unique).
        record_id: The record's `id` (kept for readable error messages), cut to 80 characters.
    """
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", str(record_id))[:80]
    return f"{index:09d}_{safe}" if safe else f"{index:09d}"


def shard_name(prefix: str, shard_index: int) -> str:
    """File name of shard number `shard_index`, e.g. `train-000003.tar`."""
    return f"{prefix}-{shard_index:06d}.tar"


def encode_sample(key: str, record: dict[str, Any], images: list[tuple[str, bytes]]) -> dict:
    """Build the dict `webdataset.TarWriter.write` takes for one sample.

    Args:
        key: The sample key (see `sample_key`).
        record: `{"id", "conversations", "images"}` as described in the module docstring.
        images: (extension, encoded bytes) of each image, in placeholder order.
    """
    if len(images) != len(record.get("images", [])):
        raise ValueError(
            f"{key}: {len(images)} image payloads for record images {record['images']}"
        )
    sample: dict[str, Any] = {
        "__key__": key,
        "json": json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }
    for i, (ext, data) in enumerate(images):
        sample[f"{i}.{ext}"] = data
    return sample


class ShardWriter:
    """Writes samples into `<prefix>-NNNNNN.tar` shards, starting a new shard when full.

    A shard is full at `samples_per_shard` samples or when the next sample would push it past
    `max_shard_bytes` (payload + tar headers). `close()` writes `<prefix>.index.json`.
    """

    def __init__(
        self,
        out_dir: str,
        prefix: str,
        *,
        samples_per_shard: int = 1000,
        max_shard_bytes: int | None = None,
    ):
        """Args:
        out_dir: Directory to write shards into (created if missing).
        prefix: Shard name prefix, e.g. `train`.
        samples_per_shard: Most samples in one shard.
        max_shard_bytes: Most bytes in one shard (None: no byte limit). A single sample larger
            than this still gets a shard of its own.
        """
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[dict[str, Any]] = []
        self._writer: TarWriter | None = None
        self._count = 0
        self._bytes = 0

    @staticmethod
    def _sample_bytes(sample: dict) -> int:
        members = [v for k, v in sample.items() if not k.startswith("_")]
        return sum(512 + -(-len(v) // 512) * 512 for v in members)

    def _finish_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self.shards[-1].update(num_samples=self._count, num_bytes=self._bytes + 1024)
            self._writer = None

    def write(self, sample: dict) -> None:
        """Append one sample (a dict from `encode_sample`)."""
        size = self._sample_bytes(sample)
        full = self._count >= self.samples_per_shard or (
            self.max_shard_bytes is not None
            and self._count > 0
            and self._bytes + size > self.max_shard_bytes
        )
        if self._writer is None or full:
            self._finish_shard()
            name = shard_name(self.prefix, len(self.shards))
            self._writer = TarWriter(os.path.join(self.out_dir, name), mtime=FIXED_MTIME)
            self.shards.append({"file": name, "num_samples": 0, "num_bytes": 0})
            self._count = self._bytes = 0
        self._writer.write(sample)
        self._count += 1
        self._bytes += size

    @property
    def index_path(self) -> str:
        """Where `close()` writes the index file."""
        return os.path.join(self.out_dir, f"{self.prefix}.index.json")

    def close(self) -> list[str]:
        """Finish the last shard, write the index file; return the shard paths."""
        self._finish_shard()
        index = {
            "format": FORMAT_NAME,
            "prefix": self.prefix,
            "num_samples": sum(s["num_samples"] for s in self.shards),
            "shards": self.shards,
        }
        with open(self.index_path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=1)
            f.write("\n")
        return [os.path.join(self.out_dir, s["file"]) for s in self.shards]

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class ShardInfo:
    """One shard file and how many samples it holds."""

    path: str
    """Path of the tar file."""

    num_samples: int
    """Samples (distinct keys) in the shard."""


def _expand_braces(pattern: str) -> list[str]:
    """Expand `{000..012}` ranges (zero padding kept) and `{a,b}` lists, as webdataset does."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        lo, hi = range_match.groups()
        width = len(lo)
        options = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [p for opt in options for p in _expand_braces(head + opt + tail)]


def _read_index(path: str) -> list[ShardInfo]:
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    if index.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not an index file of format {FORMAT_NAME}")
    base = os.path.dirname(path)
    return [
        ShardInfo(os.path.join(base, s["file"]), int(s["num_samples"])) for s in index["shards"]
    ]


def _known_counts(directory: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for index_path in sorted(glob.glob(os.path.join(directory, "*.index.json"))):
        try:
            for info in _read_index(index_path):
                counts[os.path.abspath(info.path)] = info.num_samples
        except (OSError, ValueError, KeyError):
            continue
    return counts


def resolve_shards(spec: str, split: str = "train") -> list[ShardInfo]:
    """Turn a shard specification into shard files with sample counts.

    Args:
        spec: An index file, a directory holding `<split>.index.json`, a glob, a brace range, a
            single .tar, or a comma-separated list of these.
        split: Index name looked for when `spec` is a directory.

    Raises:
        FileNotFoundError: when nothing matches.
    """
    shards: list[ShardInfo] = []
    counts_by_dir: dict[str, dict[str, int]] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if os.path.isdir(part):
            part = os.path.join(part, f"{split}.index.json")
            if not os.path.exists(part):
                raise FileNotFoundError(f"{part} not found (a shard directory needs an index)")
        if part.endswith(".json"):
            shards.extend(_read_index(part))
            continue
        paths: list[str] = []
        for pattern in _expand_braces(part):
            paths.extend(sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"shard {path} (from {spec!r}) does not exist")
            directory = os.path.dirname(path) or "."
            if directory not in counts_by_dir:
                counts_by_dir[directory] = _known_counts(directory)
            count = counts_by_dir[directory].get(os.path.abspath(path))
            if count is None:
                members = ShardMembers(path)
                count = len(members.keys)
                members.close()
            shards.append(ShardInfo(path, count))
    if not shards:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return shards


class ShardMembers:
    """Random access to the samples of one tar shard, reading only the headers up front."""

    def __init__(self, path: str):
        """Args:
        path: The tar file. Raises OSError/tarfile.TarError when it cannot be read.
        """
        self.path = path
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 (kept open for random access)
        self.members: dict[str, dict[str, tarfile.TarInfo]] = {}
        """key -> {extension: TarInfo}."""
        self.keys: list[str] = []
        """Keys in the order of their first member in the tar."""
        self.error: str | None = None
        """Why the header scan stopped early (a truncated shard keeps the samples before it)."""
        try:
            tar = tarfile.open(fileobj=self._file, mode="r:")  # noqa: SIM115 (closed below)
        except Exception:
            self._file.close()
            raise
        with tar:  # closing the TarFile leaves our file open
            while True:
                try:
                    info = tar.next()
                except tarfile.TarError as e:
                    self.error = f"{type(e).__name__}: {e}"
                    if self.keys:  # the last sample before the damage may be incomplete
                        del self.members[self.keys.pop()]
                    break
                if info is None:
                    break
                key, ext = base_plus_ext(info.name) if info.isfile() else (None, None)
                if key is None:
                    continue
                if key not in self.members:
                    self.members[key] = {}
                    self.keys.append(key)
                self.members[key][ext] = info

    def read(self, key: str, ext: str) -> bytes:
        """Bytes of member `<key>.<ext>`; KeyError when it does not exist."""
        info = self.members[key][ext]
        self._file.seek(info.offset_data)
        data = self._file.read(info.size)
        if len(data) != info.size:
            raise OSError(f"{self.path}: {key}.{ext} is truncated")
        return data

    def close(self) -> None:
        """Close the underlying file."""
        self._file.close()
