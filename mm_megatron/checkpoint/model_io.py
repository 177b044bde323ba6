"""The mm_megatron checkpoint directory: format, and the save/load helpers everyone uses.

Layout of a checkpoint directory ``DIR`` (converters write it; training loads it as an initial
checkpoint and adds iterations to it)::

    DIR/mm_megatron.json                  run config (see below)
    DIR/latest_checkpointed_iteration.txt "release", or the newest iteration number (Megatron-LM)
    DIR/release/                          megatron-core dist checkpoint (torch_dist) of the weights
    DIR/iter_0000100/                     ... later ones written by training (same format)
    DIR/hf_passthrough.safetensors        converted checkpoints only: HF tensors the model does
                                          not use (e.g. CLIP layers after vision_feature_layer)
    DIR/hf_files/                         converted checkpoints only: config.json, tokenizer and
                                          processor files of the HF original, verbatim

``mm_megatron.json``::

    {"format_version": 1,
     "model": LlavaConfig.to_dict(),
     "source": {...}}     # converters: HF dir, key spelling, dtypes, shard layout; {} otherwise

Inside a dist checkpoint, the state dict is ``{"model": model.sharded_state_dict(prefix="model.")}``
(virtual pipeline chunks: ``"model0"``, ``"model1"``, ...), so tensor keys start with ``model.``
and optimizer state can sit beside them (``save_checkpoint(..., extra=...)``). Keys do not depend
on the layout (megatron's sharded keys use global layer numbers and TP-global shapes), so a
checkpoint saved at one TP x PP loads at any other; the local spec maps its norm names to the TE
ones (``linear_qkv.layer_norm_weight``), so checkpoints are spec-independent.

Vocab padding: embeddings and output layer are stored at whatever padded size the saver had
(``LanguageConfig.padded_vocab_size(tp)``, converters use TP1). megatron marks them
``allow_shape_mismatch``: on load, rows the checkpoint lacks become zeros and extra stored rows
are ignored, so a TP1 checkpoint loads at TP2 (more padding) and back. Real rows never move.

``_extra_state`` entries (TE's FP8 metadata; ``None`` on the local spec) are loaded when present
and silently skipped when the checkpoint lacks them, so a local-spec checkpoint loads into a TE
model and vice versa.

API: :func:`save_checkpoint` / :func:`load_checkpoint` (collective; model + optional ``extra``
sharded state), :func:`model_sharded_state_dict` (the ``{"model": ...}`` dict, for callers that
save optimizer state themselves), :func:`read_run_config` / :func:`write_run_config`,
:func:`read_tracker` / :func:`write_tracker` / :func:`iteration_dirname` /
:func:`dist_checkpoint_dir`, :func:`stored_tensors` (shapes and dtypes, no data read) and
:func:`copy_provenance` (carry a converted checkpoint's HF extras into a new directory, so
``mcore-to-hf`` of a training output reproduces the HF original's layout).

All functions that touch the dist checkpoint are collective: call them on every rank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.convert.errors import ConversionError, MissingFileError

FORMAT_VERSION = 1
RUN_CONFIG = "mm_megatron.json"
TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
PASSTHROUGH = "hf_passthrough.safetensors"
HF_FILES = "hf_files"
MODEL_PREFIX = "model."


class CheckpointFormatError(ConversionError):
    """A directory that is not a (complete) mm_megatron checkpoint."""


@dataclass
class RunConfig:
    """Contents of ``mm_megatron.json``."""

    model: LlavaConfig
    """The model the weights belong to."""
    source: dict[str, Any] = field(default_factory=dict)
    """Where the weights came from (converters fill it; see ``mm_megatron.convert``)."""
    format_version: int = FORMAT_VERSION
    """Layout version of the directory."""


# --- run config and tracker -------------------------------------------------------------------


def write_run_config(ckpt_dir: Path, cfg: LlavaConfig, source: dict | None = None) -> None:
    """Write ``mm_megatron.json``."""
    doc = {"format_version": FORMAT_VERSION, "model": cfg.to_dict(), "source": source or {}}
    (Path(ckpt_dir) / RUN_CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def read_run_config(ckpt_dir: Path) -> RunConfig:
    """Read ``mm_megatron.json`` (CheckpointFormatError names what is wrong)."""
    path = Path(ckpt_dir) / RUN_CONFIG
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist (is {ckpt_dir} an mm_megatron checkpoint?)")
    try:
        doc = json.loads(path.read_text())
        version = int(doc.get("format_version", 0))
    except (json.JSONDecodeError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointFormatError(f"{path} is not valid: {e}") from None
    if version != FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path}: format_version {version} unsupported (this mm_megatron reads "
            f"{FORMAT_VERSION})"
        )
    try:
        model = LlavaConfig.from_dict(doc["model"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointFormatError(f"{path}: bad 'model' section: {e}") from None
    return RunConfig(model=model, source=doc.get("source") or {}, format_version=version)


def iteration_dirname(iteration: int | str) -> str:
    """``release`` or ``iter_0000100`` (Megatron-LM's naming)."""
    if iteration == RELEASE:
        return RELEASE
    return f"iter_{int(iteration):07d}"


def write_tracker(ckpt_dir: Path, iteration: int | str) -> None:
    """Point ``latest_checkpointed_iteration.txt`` at ``iteration``."""
    (Path(ckpt_dir) / TRACKER).write_text(f"{iteration}\n")


def read_tracker(ckpt_dir: Path) -> int | str:
    """The iteration ``latest_checkpointed_iteration.txt`` names (``"release"`` or an int)."""
    path = Path(ckpt_dir) / TRACKER
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist (incomplete or not a checkpoint?)")
    text = path.read_text().strip()
    if text == RELEASE:
        return RELEASE
    try:
        return int(text)
    except ValueError:
        raise CheckpointFormatError(
            f"{path}: expected 'release' or a number, got {text!r}"
        ) from None


def dist_checkpoint_dir(ckpt_dir: Path, iteration: int | str | None = None) -> Path:
    """The dist checkpoint directory of ``iteration`` (default: the tracker's)."""
    ckpt_dir = Path(ckpt_dir)
    it = read_tracker(ckpt_dir) if iteration is None else iteration
    path = ckpt_dir / iteration_dirname(it)
    if not (path / "metadata.json").is_file():
        raise CheckpointFormatError(f"{path} is not a complete dist checkpoint (no metadata.json)")
    return path


def stored_tensors(dist_dir: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (global shape, dtype)}`` of the tensors in a dist checkpoint (no data read)."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(dist_dir)).read_metadata()
    out = {}
    for key, m in md.state_dict_metadata.items():
        if hasattr(m, "chunks"):
            out[key] = (tuple(m.size), m.properties.dtype)
    return out


def _stored_keys(dist_dir: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(dist_dir)).read_metadata().state_dict_metadata)


# --- model state ------------------------------------------------------------------------------


def _chunks(model) -> list:
    return list(model) if isinstance(model, list | tuple) else [model]


def model_sharded_state_dict(model) -> dict[str, dict]:
    """``{"model": sd}`` (or ``{"model0": sd0, ...}`` for virtual pipeline chunks)."""
    chunks = _chunks(model)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(prefix=MODEL_PREFIX)}
    return {f"model{i}": c.sharded_state_dict(prefix=MODEL_PREFIX) for i, c in enumerate(chunks)}


def save_checkpoint(
    model,
    ckpt_dir: Path,
    cfg: LlavaConfig,
    *,
    iteration: int | str = RELEASE,
    source: dict | None = None,
    extra: dict | None = None,
    provenance_from: Path | None = None,
) -> Path:
    """Save the model (and ``extra`` sharded state, e.g. the optimizer's) as ``iteration``.

    Collective. Rank 0 writes ``mm_megatron.json`` and, last, the tracker file.

    Args:
        model: the model or its list of virtual-pipeline chunks.
        ckpt_dir: checkpoint directory (created if needed; may already hold iterations).
        cfg: the model config (written to ``mm_megatron.json``).
        iteration: ``"release"`` or the iteration number.
        source: run-config ``source``; default: keep the one already in ``ckpt_dir`` or
            ``provenance_from``.
        extra: more sharded state to save beside the model (keys must not start with ``model``).
        provenance_from: the checkpoint training started from, when saving to a different
            directory: its ``source``, ``hf_passthrough.safetensors`` and ``hf_files/`` are copied
            (once), so ``mcore-to-hf`` can still reproduce the HF original's extras.

    Returns:
        The dist checkpoint directory written.
    """
    ckpt_dir = Path(ckpt_dir)
    out = ckpt_dir / iteration_dirname(iteration)
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier()
    state = model_sharded_state_dict(model)
    if extra:
        state.update(extra)
    dist_checkpointing.save(state, str(out))
    if _rank() == 0:
        if source is None and (ckpt_dir / RUN_CONFIG).is_file():
            source = read_run_config(ckpt_dir).source
        if provenance_from is not None and Path(provenance_from).absolute() != ckpt_dir.absolute():
            source = copy_provenance(Path(provenance_from), ckpt_dir, source)
        write_run_config(ckpt_dir, cfg, source)
        write_tracker(ckpt_dir, iteration)
    _barrier()
    return out


def copy_provenance(src: Path, dst: Path, source: dict | None = None) -> dict:
    """Carry a converted checkpoint's HF provenance into another checkpoint directory.

    Copies ``hf_passthrough.safetensors`` and ``hf_files/`` from ``src`` to ``dst`` (if ``dst``
    lacks them) and returns the ``source`` to write into ``dst``'s run config (``source`` if
    given, else ``src``'s). Training that loads a converted checkpoint and saves elsewhere calls
    this once (rank 0) so ``mcore-to-hf`` on its output still reproduces the HF original's key
    spelling, unused tensors and tokenizer/processor files.
    """
    import shutil

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)

    if (src / PASSTHROUGH).is_file() and not (dst / PASSTHROUGH).exists():
        shutil.copy2(src / PASSTHROUGH, dst / PASSTHROUGH)
    if (src / HF_FILES).is_dir() and not (dst / HF_FILES).exists():
        shutil.copytree(src / HF_FILES, dst / HF_FILES)
    if source is None and (src / RUN_CONFIG).is_file():
        source = read_run_config(src).source
    return source or {}


def load_checkpoint(
    model, ckpt_dir: Path, *, iteration: int | str | None = None, extra: dict | None = None
) -> dict:
    """Load model weights (any layout) and optionally ``extra`` sharded state; collective.

    Args:
        model: the model or its list of virtual-pipeline chunks (built for this rank's layout).
        ckpt_dir: checkpoint directory (with ``mm_megatron.json`` and the tracker).
        iteration: which iteration; default the tracker's.
        extra: more sharded state to load (e.g. the optimizer's), same keys as at save.

    Returns:
        The loaded ``extra`` entries (``{}`` if none).
    """
    dist_dir = dist_checkpoint_dir(ckpt_dir, iteration)
    state = model_sharded_state_dict(model)
    if extra:
        state.update(extra)
    available = _stored_keys(dist_dir)
    skipped = _drop_missing_extra_state(state, available)
    missing = sorted({st.key for st in _sharded_tensors(state) if st.key not in available})
    if missing:
        raise CheckpointFormatError(
            f"{dist_dir} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]!r} "
            "(was it saved for a different model config?)"
        )
    loaded = dist_checkpointing.load(state, str(dist_dir))
    chunks = _chunks(model)
    names = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for name, chunk in zip(names, chunks):
        current = chunk.state_dict()
        weights = {k[len(MODEL_PREFIX) :]: v for k, v in loaded[name].items()}
        for k in skipped.get(name, ()):  # keep the module's own (fresh) extra state
            key = k[len(MODEL_PREFIX) :]
            if key in current:
                weights[key] = current[key]
        chunk.load_state_dict(weights, strict=True)
    return {k: v for k, v in loaded.items() if k not in names}


def _sharded_tensors(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _sharded_tensors(v)
    elif isinstance(node, list | tuple):
        for v in node:
            yield from _sharded_tensors(v)
    elif isinstance(node, ShardedTensor):
        yield node


def _drop_missing_extra_state(state: dict, available: set[str]) -> dict[str, list[str]]:
    """Remove ``_extra_state`` objects the checkpoint lacks; returns {top key: [dict keys]}."""
    skipped: dict[str, list[str]] = {}
    for top, sd in state.items():
        if not isinstance(sd, dict):
            continue
        for k in list(sd):
            v = sd[k]
            if (
                isinstance(v, ShardedObject)
                and v.key.endswith("_extra_state")
                and v.unique_key not in available
            ):
                del sd[k]
                skipped.setdefault(top, []).append(k)
    return skipped


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
