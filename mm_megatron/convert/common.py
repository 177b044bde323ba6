"""Pieces both conversion directions share: the HF checkpoint reader, the meta model, atomic output.

* :class:`HFCheckpoint` indexes an HF directory (``model.safetensors`` or sharded with
  ``model.safetensors.index.json``), validates every header up front (missing shards, truncated
  files, index/file disagreements) and reads tensors one at a time by canonical key; a
  :class:`Naming` maps stored keys to canonical ones (a LLaVA spelling, or one part's prefix).
* :func:`meta_model` builds the TP1/PP1 model on the ``meta`` device: its ``sharded_state_dict``
  is the exact checkpoint layout megatron expects, at no memory cost.
* :func:`atomic_output` writes into a temp dir next to the target and renames it into place only
  when everything succeeded, so a failed or killed conversion never leaves a complete-looking
  output; an existing target is refused unless ``force``.
* :func:`single_rank` provides the one-process gloo group + megatron state converters need.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch

from mm_megatron.checkpoint.errors import (
    ConversionError,
    CorruptFileError,
    MissingFileError,
    OutputExistsError,
)
from mm_megatron.checkpoint.safetensors_io import TensorInfo, read_header, read_tensor
from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.convert.keys import detect_spelling

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
WEIGHT_INDEXES = (INDEX_FILE, "pytorch_model.bin.index.json")

DTYPE_BY_NAME = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling HF configs use)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``bf16|fp32|fp16`` (or torch names) -> dtype; None passes through."""
    if name is None:
        return None
    if name not in DTYPE_BY_NAME:
        raise ConversionError(f"unknown dtype {name!r} (bf16|fp32|fp16)")
    return DTYPE_BY_NAME[name]


class Naming(Protocol):
    """How a checkpoint's stored keys relate to canonical (LLaVA, new-spelling) keys."""

    def to_canonical(self, key: str) -> str | None:
        """Stored key -> canonical key, or None for a tensor that is not part of a LLaVA."""

    def to_file(self, canonical: str) -> str:
        """Canonical key -> stored key."""


class HFCheckpoint:
    """An HF checkpoint directory's weights, indexed and validated (nothing read yet).

    Args:
        hf_dir: the directory (``model.safetensors`` or an index plus shards).
        naming: ``naming(stored keys)`` gives how stored keys map to canonical ones; default:
            detect the LLaVA key spelling (see :mod:`mm_megatron.convert.keys`). Stored keys it
            maps to None are listed in ``dropped`` and never read.

    Attributes:
        files: ``{file name: [keys in file order]}``.
        sharded: whether an index file lists the shards.
        spelling: the naming in use.
        infos: ``{canonical key: TensorInfo}``.
        file_keys: ``{canonical key: key as stored}``.
        dropped: stored keys with no canonical key (e.g. the text half of a ``CLIPModel``).
    """

    def __init__(self, hf_dir: Path, naming: Callable[[list[str]], Naming] | None = None):
        self.dir = Path(hf_dir)
        self.files: dict[str, list[str]] = {}
        raw: dict[str, TensorInfo] = {}
        self.sharded = False
        for fname, listed in self._weight_files().items():
            infos, _ = read_header(self.dir / fname)
            if listed is not None:
                self._check_index(fname, listed, infos)
            for k, info in infos.items():
                if k in raw:
                    raise CorruptFileError(f"tensor {k!r} stored twice ({fname})")
                raw[k] = info
            self.files[fname] = list(infos)
        self.spelling = naming(list(raw)) if naming else detect_spelling(raw, where=str(self.dir))
        canonical = {k: self.spelling.to_canonical(k) for k in raw}
        self.dropped = [k for k, c in canonical.items() if c is None]
        self.infos = {c: raw[k] for k, c in canonical.items() if c is not None}
        self.file_keys = {c: k for k, c in canonical.items() if c is not None}

    def _weight_files(self) -> dict[str, list[str] | None]:
        """``{file name: keys the index places in it (None without an index)}``."""
        index_path = self.dir / INDEX_FILE
        if index_path.is_file():
            self.sharded = True
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorruptFileError(f"{index_path} is not a valid index: {e}") from None
            by_file: dict[str, list[str]] = {}
            for key, fname in weight_map.items():
                by_file.setdefault(fname, []).append(key)
            for fname, keys in by_file.items():
                if not (self.dir / fname).is_file():
                    raise MissingFileError(
                        f"missing shard {self.dir / fname} (listed in {INDEX_FILE} for "
                        f"{len(keys)} tensor(s), e.g. {keys[0]!r})"
                    )
            return by_file
        if (self.dir / SINGLE_FILE).is_file():
            return {SINGLE_FILE: None}
        found = sorted(p.name for p in self.dir.glob("*") if p.suffix in WEIGHT_SUFFIXES)
        hint = f" (found {', '.join(found)}; only safetensors are supported)" if found else ""
        raise MissingFileError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.dir}{hint}")

    def _check_index(self, fname: str, listed: list[str], infos: dict) -> None:
        absent = [k for k in listed if k not in infos]
        if absent:
            raise CorruptFileError(
                f"{self.dir / fname} lacks tensor {absent[0]!r} that {INDEX_FILE} places in it"
            )
        extra = [k for k in infos if k not in set(listed)]
        if extra:
            raise CorruptFileError(
                f"{self.dir / fname} holds tensor {extra[0]!r} that {INDEX_FILE} does not list"
            )

    def read(self, key: str) -> torch.Tensor:
        """Tensor by canonical key."""
        return read_tensor(self.infos[key])

    def describe(self, key: str) -> str:
        """``'stored key' in file.safetensors`` for messages."""
        info = self.infos[key]
        return f"{self.file_keys[key]!r} in {info.path.name}"

    def where(self, key: str) -> str:
        """Where a canonical key that is absent would be stored, for messages."""
        return f"tensor {self.spelling.to_file(key)!r} not found in {self.dir}"


def non_weight_files(hf_dir: Path) -> list[Path]:
    """Top-level files of an HF dir other than weights (config, tokenizer, processor, ...)."""
    out = []
    for p in sorted(Path(hf_dir).iterdir()):
        if p.is_file() and p.suffix not in WEIGHT_SUFFIXES and p.name not in WEIGHT_INDEXES:
            out.append(p)
    return out


@contextlib.contextmanager
def single_rank() -> Iterator[None]:
    """One-process gloo group + megatron parallel state (reused if already TP=PP=1)."""
    from megatron.core import parallel_state

    from mm_megatron.config.parallel_config import ParallelConfig
    from mm_megatron.runtime import distributed

    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() != 1
            or parallel_state.get_pipeline_model_parallel_world_size() != 1
        ):
            raise RuntimeError("converters need TP=PP=1 parallel state (or none)")
        yield
        return
    distributed.initialize(ParallelConfig())
    try:
        yield
    finally:
        distributed.destroy()


def meta_model(cfg: LlavaConfig, dtype: torch.dtype):
    """The TP1/PP1 model on the meta device (local spec: same sharded keys as TE)."""
    from mm_megatron.model.build import build_llava_model

    cfg = copy.deepcopy(cfg)
    cfg.set_spec("local")
    with torch.device("meta"):
        return build_llava_model(cfg, dtype=dtype)


def check_output(target: Path, force: bool = False, inputs: tuple[Path, ...] = ()) -> Path:
    """Absolute ``target`` if it may be written (see :func:`atomic_output`); raises otherwise."""
    target = Path(target).absolute()
    for src in inputs:
        src = Path(src).absolute()
        if target == src or src in target.parents:
            raise ConversionError(f"output {target} would overwrite the input {src}")
    if target.exists() or target.is_symlink():
        if not force:
            raise OutputExistsError(f"output {target} exists; pass --force to overwrite it")
        if not target.is_dir():
            raise OutputExistsError(f"output {target} exists and is not a directory")
    return target


@contextlib.contextmanager
def atomic_output(target: Path, force: bool = False, *, inputs: tuple[Path, ...] = ()):
    """Yield a temp dir next to ``target``; rename it to ``target`` only if the block succeeds.

    The temp dir is ``.NAME.tmp-XXXX`` in the target's parent (same filesystem, so the final
    rename is atomic). With ``force`` an existing target is moved aside and deleted after the
    rename.

    Raises:
        OutputExistsError: ``target`` exists and ``force`` is False.
        ConversionError: ``target`` is one of ``inputs`` (or inside one).
    """
    target = check_output(target, force, inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm byte counter (disabled -> a no-op object with ``update``/``close``)."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        dynamic_ncols=True,
    )
