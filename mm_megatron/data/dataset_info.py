"""A data directory describes itself: `dataset_info.json` carries its splits, template, tokenizer.

What this file does: `record_split` adds a split (and optionally the chat template) to a
directory's `dataset_info.json` (the converter calls it; the synthetic writer writes the same
keys); `read_dataset_info` finds that file for a `data.train_shards` value (a directory, an index
file or shard paths inside the directory); `apply_dataset_info` fills the data config's unset
fields from it: the template (`data.template` left unset), the validation split
(`data.val_shards` unset) and the tokenizer (`data.tokenizer_path` unset and the directory holds
one). So `--data-path DIR` trains exactly as the embedded default does on the same data.

The file's keys: `splits: {name: {index, num_samples, ...}}`, `template`, `tokenizer: {path}`,
`labels` (synthetic data only). Unknown keys are ignored.

What it does not do: read shards, or override a value the user set.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from mm_megatron.data.config import DEFAULT_TEMPLATE, DataConfig

DATASET_INFO = "dataset_info.json"
"""Name of the description file inside a data directory."""


def _directory(train_shards: str) -> Path:
    first = Path(train_shards.split(",")[0].strip())
    return first if first.is_dir() else first.parent


def read_dataset_info(train_shards: str | None) -> tuple[Path | None, dict[str, Any]]:
    """(directory, content) of the `dataset_info.json` beside `train_shards`, or (None, {}).

    Raises:
        ValueError: the file exists but is not a JSON object (names the file).
    """
    if not train_shards:
        return None, {}
    directory = _directory(train_shards)
    path = directory / DATASET_INFO
    if not path.is_file():
        return None, {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the dataset description: {e}") from e
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return directory, info


def record_split(
    out_dir: str | os.PathLike,
    split: str,
    index_name: str,
    num_samples: int,
    *,
    num_shards: int,
    template: str | None = None,
) -> None:
    """Add (or replace) `split` in `out_dir/dataset_info.json`; set `template` when given."""
    path = Path(out_dir) / DATASET_INFO
    info: dict[str, Any] = {}
    if path.is_file():
        info = json.loads(path.read_text(encoding="utf-8"))
    info.setdefault("splits", {})[split] = {
        "index": index_name,
        "num_samples": num_samples,
        "num_shards": num_shards,
    }
    if template is not None:
        info["template"] = template
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def apply_dataset_info(
    config: DataConfig, directory: Path | None, info: dict[str, Any]
) -> tuple[DataConfig, list[str]]:
    """`config` with its unset template / val split / tokenizer taken from the dataset.

    Returns:
        (the completed config, one line per value taken from the dataset, for the run's log).
    """
    notes: list[str] = []
    changes: dict[str, Any] = {}
    if config.template is None:
        template = info.get("template")
        changes["template"] = template or DEFAULT_TEMPLATE
        if template:
            notes.append(f"template {template} (from {directory / DATASET_INFO})")
    if directory is not None and config.val_shards is None:
        val = (info.get("splits") or {}).get("val") or {}
        if val.get("index") and val.get("num_samples", 1) > 0:
            changes["val_shards"] = str(directory / val["index"])
            notes.append(f"validation split {changes['val_shards']}")
    tokenizer = (info.get("tokenizer") or {}).get("path")
    found = directory is not None and bool(tokenizer) and (directory / tokenizer).is_dir()
    if config.tokenizer_path is None and found:
        changes["tokenizer_path"] = str(directory / tokenizer)
        notes.append(f"tokenizer {changes['tokenizer_path']}")
    return replace(config, **changes), notes
