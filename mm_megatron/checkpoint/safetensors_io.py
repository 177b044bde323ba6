"""Streaming safetensors I/O: read one tensor at a time, write files whose layout is fixed upfront.

Why not ``safetensors.safe_open``: it memory-maps the file, and every page it touches counts in
the process's resident set, so converting a 14 GB checkpoint would report ~14 GB RSS. Here each
tensor is read with plain ``readinto`` into a fresh buffer and dropped after use, so peak memory is
a few tensors. The format (https://github.com/huggingface/safetensors#format): 8-byte little-endian
header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {...}}``, then the data section; offsets are relative to the data section.

Reading validates everything a truncated or corrupt file can get wrong (header length, JSON,
offsets past the end of the file, byte counts that disagree with shape x dtype) and names the
file and tensor. Writing computes the header from the declared tensors first, so tensors can then
be written in any order (each lands at its own offset).

Not here: the index file (``model.safetensors.index.json``) and key naming (see
:mod:`mm_megatron.convert.common` and :mod:`mm_megatron.convert.keys`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mm_megatron.checkpoint.errors import CorruptFileError, MissingFileError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    """Tensor name as stored."""
    path: Path
    """The file."""
    dtype: torch.dtype
    """Element type."""
    shape: tuple[int, ...]
    """Shape."""
    begin: int
    """Absolute byte offset of the data in the file."""
    nbytes: int
    """Byte count."""


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header.

    Returns:
        ({name: TensorInfo}, the ``__metadata__`` dict).

    Raises:
        MissingFileError: the file does not exist.
        CorruptFileError: truncated or malformed file (message names the file and tensor).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"safetensors file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptFileError(f"truncated safetensors file {path}: {size} bytes, no header")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CorruptFileError(
                f"truncated or corrupt safetensors file {path}: header claims {n} bytes but the "
                f"file has {size}"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptFileError(f"corrupt safetensors header in {path}: {e}") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"corrupt safetensors header in {path}: not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_size = size - data_start
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(
                f"corrupt safetensors header in {path}: bad entry for tensor {name!r} "
                f"(dtype {entry.get('dtype') if isinstance(entry, dict) else entry!r})"
            ) from None
        numel = 1
        for s in shape:
            numel *= s
        want = numel * _itemsize(dtype)
        if end - begin != want or begin < 0:
            raise CorruptFileError(
                f"corrupt safetensors file {path}: tensor {name!r} has {end - begin} bytes but "
                f"shape {list(shape)} x {entry['dtype']} needs {want}"
            )
        if end > data_size:
            raise CorruptFileError(
                f"truncated safetensors file {path}: tensor {name!r} needs bytes "
                f"[{begin}, {end}) of the data section but the file holds only {data_size}"
            )
        out[name] = TensorInfo(name, path, dtype, shape, data_start + begin, want)
    return out, meta


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor into fresh (non-mapped) memory."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    with open(info.path, "rb") as f:
        f.seek(info.begin)
        got = f.readinto(memoryview(buf.numpy()))
    if got != info.nbytes:
        raise CorruptFileError(
            f"truncated safetensors file {info.path}: tensor {info.name!r} short read "
            f"({got} of {info.nbytes} bytes)"
        )
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    return buf.view(info.dtype).reshape(info.shape)


@dataclass
class _PlannedFile:
    path: Path
    entries: dict[
        str, tuple[torch.dtype, tuple[int, ...], int]
    ]  # name -> (dtype, shape, abs offset)
    written: set[str]


class SafetensorsWriter:
    """Write safetensors files whose tensors are declared upfront; tensors then arrive in any order.

    Args:
        files: ``{path: [(name, dtype, shape), ...]}`` in the order tensors should be laid out.
        metadata: the ``__metadata__`` dict (default ``{"format": "pt"}``, as transformers wants).

    Use as a context manager; ``close()`` checks every declared tensor was written.
    """

    def __init__(
        self,
        files: dict[Path, Sequence[tuple[str, torch.dtype, Sequence[int]]]],
        metadata: dict[str, str] | None = None,
    ):
        self._files: dict[Path, _PlannedFile] = {}
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        meta = {"format": "pt"} if metadata is None else dict(metadata)
        for path, tensors in files.items():
            path = Path(path)
            header: dict[str, object] = {"__metadata__": meta}
            offset = 0
            rel: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
            for name, dtype, shape in tensors:
                if name in self._where:
                    raise ValueError(f"tensor {name!r} declared twice")
                shape = tuple(int(s) for s in shape)
                numel = 1
                for s in shape:
                    numel *= s
                nbytes = numel * _itemsize(dtype)
                header[name] = {
                    "dtype": DTYPE_NAMES[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                rel[name] = (dtype, shape, offset)
                offset += nbytes
                self._where[name] = path
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # data section 8-byte aligned, as safetensors does
            start = 8 + len(blob)
            entries = {k: (d, s, start + o) for k, (d, s, o) in rel.items()}
            f = open(path, "wb")  # noqa: SIM115 - closed in close()
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            f.truncate(start + offset)  # full size now; a crash leaves a file that fails checks
            self._handles[path] = f
            self._files[path] = _PlannedFile(path, entries, set())

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(check=exc_type is None)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write tensor ``name`` (dtype and shape must match the declaration)."""
        path = self._where.get(name)
        if path is None:
            raise KeyError(f"tensor {name!r} was not declared")
        planned = self._files[path]
        dtype, shape, offset = planned.entries[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"tensor {name!r}: got {tensor.dtype} {list(tensor.shape)}, declared {dtype} "
                f"{list(shape)}"
            )
        f = self._handles[path]
        f.seek(offset)
        if tensor.numel():
            f.write(memoryview(_as_bytes(tensor).numpy()))
        planned.written.add(name)

    def close(self, check: bool = True) -> None:
        """Close the files; with ``check``, raise if a declared tensor was never written."""
        for f in self._handles.values():
            f.close()
        self._handles.clear()
        if check:
            for planned in self._files.values():
                missing = set(planned.entries) - planned.written
                if missing:
                    raise RuntimeError(
                        f"{planned.path}: {len(missing)} declared tensor(s) never written, e.g. "
                        f"{sorted(missing)[0]!r}"
                    )


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8)


def index_files(paths: Iterable[Path]) -> dict[str, TensorInfo]:
    """Headers of several files merged into ``{name: TensorInfo}`` (duplicate names are errors)."""
    out: dict[str, TensorInfo] = {}
    for p in paths:
        infos, _ = read_header(p)
        for name, info in infos.items():
            if name in out:
                raise CorruptFileError(
                    f"tensor {name!r} appears in both {out[name].path.name} and {p.name}"
                )
            out[name] = info
    return out
