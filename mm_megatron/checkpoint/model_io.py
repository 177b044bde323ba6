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
and other state can sit beside them (``save_checkpoint(..., extra=...)``: training adds its
optimizer, RNG, data and train state, see ``mm_megatron.train.checkpointing``). Keys do not depend
on the layout (megatron's sharded keys use global layer numbers and TP-global shapes), so a
checkpoint saved at one TP x PP loads at any other; the local spec maps its norm names to the TE
ones (``linear_qkv.layer_norm_weight``), so checkpoints are spec-independent.

Atomic saves: every rank writes into ``DIR/.tmp_<name>``; when all are done (megatron has written
``metadata.json``), rank 0 publishes it (:func:`publish_checkpoint`): renames it to ``<name>``,
replaces ``mm_megatron.json`` and then the tracker file through temporary files, and deletes
iterations beyond the newest ``keep_last``. A kill at any moment leaves the tracker pointing at a
complete checkpoint; :func:`clean_stale` removes what a killed save left behind. With
``async_save`` the write runs in megatron's background process and publishing is the request's
finalize step. :func:`latest_iteration` follows the tracker, falling back to the newest complete
``iter_*`` directory. Before publishing, ``integrity.json`` records every file's size and SHA-256
(`mm_megatron.checkpoint.integrity`, checked at resume); a failed synchronous write removes the
temporary directory and raises one line (``no space left on device ... DIR`` for a full disk).

Vocab padding: embeddings and output layer are stored at whatever padded size the saver had
(``LanguageConfig.padded_vocab_size(tp)``, converters use TP1). megatron marks them
``allow_shape_mismatch``: on load, rows the checkpoint lacks become zeros and extra stored rows
are ignored, so a TP1 checkpoint loads at TP2 (more padding) and back. Real rows never move.

``_extra_state`` entries (TE's FP8 metadata; ``None`` on the local spec) are loaded when present
and silently skipped when the checkpoint lacks them, so a local-spec checkpoint loads into a TE
model and vice versa.

API: :func:`save_checkpoint` / :func:`load_checkpoint` (collective; model + optional ``extra``
sharded state), :func:`model_sharded_state_dict` (the ``{"model": ...}`` dict),
:func:`read_run_config` / :func:`write_run_config`, :func:`read_tracker` / :func:`write_tracker` /
:func:`iteration_dirname` / :func:`dist_checkpoint_dir` / :func:`complete_iterations` /
:func:`latest_iteration`, :func:`check_model_matches` (a directory holds the configured model),
:func:`stored_tensors` (shapes and dtypes, no data read) and :func:`copy_provenance` (carry a
converted checkpoint's HF extras into a new directory, so ``mcore-to-hf`` of a training output
reproduces the HF original's layout).

All functions that touch the dist checkpoint are collective: call them on every rank.

What it does not do: decide what training state to save or when (``mm_megatron.train``), or
convert formats (``mm_megatron.convert``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from mm_megatron.checkpoint import integrity
from mm_megatron.checkpoint.errors import ConversionError, MissingFileError
from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.runtime.distributed import barrier, rank

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RUN_CONFIG = "mm_megatron.json"
TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
PASSTHROUGH = "hf_passthrough.safetensors"
HF_FILES = "hf_files"
MODEL_PREFIX = "model."
_ITER_DIR = re.compile(r"^iter_(\d{7})$")
_STALE_PREFIXES = (".tmp_", ".old_")
_ARCH_IGNORE = ("freeze_vision", "freeze_projector", "freeze_lm", "init_method_std", "spec")


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
        model_doc = dict(doc["model"])
        # NOTE: files written before ProjectorConfig.extra was removed carry it, always empty.
        if (
            isinstance(model_doc.get("projector"), dict)
            and model_doc["projector"].get("extra") == {}
        ):
            model_doc["projector"] = {
                k: v for k, v in model_doc["projector"].items() if k != "extra"
            }
        model = LlavaConfig.from_dict(model_doc)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointFormatError(f"{path}: bad 'model' section: {e}") from None
    return RunConfig(model=model, source=doc.get("source") or {}, format_version=version)


def iteration_dirname(iteration: int | str) -> str:
    """``release`` or ``iter_0000100`` (Megatron-LM's naming)."""
    if iteration == RELEASE:
        return RELEASE
    return f"iter_{int(iteration):07d}"


def write_tracker(ckpt_dir: Path, iteration: int | str) -> None:
    """Point ``latest_checkpointed_iteration.txt`` at ``iteration`` (atomically)."""
    _atomic_write(Path(ckpt_dir) / TRACKER, f"{iteration}\n")


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


def complete_iterations(ckpt_dir: Path) -> list[int]:
    """Iterations with a complete dist checkpoint in `ckpt_dir`, ascending."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for child in ckpt_dir.iterdir():
        m = _ITER_DIR.match(child.name)
        if m and (child / "metadata.json").is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def latest_iteration(ckpt_dir: str | Path) -> int | str | None:
    """The checkpoint to resume from: the tracker's, else the newest complete one, else None.

    Returns:
        An iteration number, ``"release"`` (a weights-only checkpoint) or None.
    """
    ckpt_dir = Path(ckpt_dir)
    tracker = ckpt_dir / TRACKER
    if tracker.is_file():
        try:
            it = read_tracker(ckpt_dir)
            dist_checkpoint_dir(ckpt_dir, it)
            return it
        except (ValueError, OSError) as e:
            log.warning("%s: %s; falling back to the newest complete checkpoint", tracker, e)
    done = complete_iterations(ckpt_dir)
    return done[-1] if done else None


def clean_stale(ckpt_dir: str | Path) -> None:
    """Remove the directories a killed save left behind (rank 0 works; call before saving)."""
    ckpt_dir = Path(ckpt_dir)
    if rank() != 0 or not ckpt_dir.is_dir():
        return
    for child in ckpt_dir.iterdir():
        if child.is_dir() and child.name.startswith(_STALE_PREFIXES):
            log.warning("removing incomplete checkpoint %s", child)
            shutil.rmtree(child, ignore_errors=True)


def architecture_mismatch(a: LlavaConfig, b: LlavaConfig) -> list[str]:
    """Dotted keys where two model configs differ in architecture (freezing and spec ignored)."""
    fa, fb = _flat(a.to_dict()), _flat(b.to_dict())
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def check_model_matches(ckpt_dir: str | Path, model: LlavaConfig) -> None:
    """ValueError when `ckpt_dir`'s model differs from `model` (beyond freezing and spec)."""
    saved = read_run_config(Path(ckpt_dir)).model
    diff = architecture_mismatch(saved, model)
    if diff:
        fs, fm = _flat(saved.to_dict()), _flat(model.to_dict())
        shown = ", ".join(f"{k}: {fs.get(k)!r} vs {fm.get(k)!r}" for k in diff[:4])
        raise ValueError(
            f"{ckpt_dir} holds a different model ({shown}); use the matching --preset / "
            "--model.* overrides"
        )


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if k in _ARCH_IGNORE:
            continue
        if isinstance(v, dict) and k != "rope_scaling":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
    extra: dict | None = None,
    files: dict[str, str] | None = None,
    provenance_from: Path | None = None,
    keep_last: int = 0,
    async_save: bool = False,
):
    """Save the model (and ``extra`` state) as checkpoint ``iteration``, atomically; collective.

    Args:
        model: the model or its list of virtual-pipeline chunks.
        ckpt_dir: checkpoint directory (created if needed; may already hold iterations).
        cfg: the model config (written to ``mm_megatron.json``).
        iteration: ``"release"`` or the iteration number.
        extra: more state beside the model (keys must not start with ``model``): sharded
            objects are saved per rank, anything else once as common state.
        files: ``{name: text}`` rank 0 writes into the iteration directory.
        provenance_from: the checkpoint training started from, when saving to a different
            directory: its ``source``, ``hf_passthrough.safetensors`` and ``hf_files/`` are copied
            (once), so ``mcore-to-hf`` can still reproduce the HF original's extras.
        keep_last: iterations to keep after this one is published (0: all).
        async_save: write in megatron's background process.

    Returns:
        The published directory; with ``async_save``, megatron's ``AsyncRequest`` instead
        (schedule it on an ``AsyncCallsQueue``; publishing is its finalize step).
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / iteration_dirname(iteration)
    tmp = ckpt_dir / f".tmp_{final.name}"
    if rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    state = model_sharded_state_dict(model)
    state.update(extra or {})
    publish = functools.partial(
        publish_checkpoint,
        tmp,
        cfg,
        iteration,
        files=files,
        provenance_from=provenance_from,
        keep_last=keep_last,
    )
    if not async_save:
        try:
            dist_checkpointing.save(state, str(tmp))
            publish()
        except BaseException as e:  # NOTE: torch's CheckpointException is no Exception
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            if rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            latest = latest_iteration(ckpt_dir)
            raise integrity.explain_save_failure(e, tmp, iteration, latest) from e
        return final
    request = dist_checkpointing.save(
        state, str(tmp), async_sharded_save=True, async_strategy="mcore"
    )
    request.finalize_fns.append(publish)
    return request


def publish_checkpoint(
    tmp: Path,
    cfg: LlavaConfig,
    iteration: int | str,
    *,
    files: dict[str, str] | None = None,
    provenance_from: Path | None = None,
    keep_last: int = 0,
) -> None:
    """Turn the written ``DIR/.tmp_<name>`` into checkpoint ``iteration`` (rank 0); collective.

    Order: files and run config into the temporary directory, rename it (replacing an older save
    of the same iteration), then the top-level run config and, last, the tracker; then prune.
    """
    ckpt_dir, final = tmp.parent, tmp.parent / iteration_dirname(iteration)
    if rank() == 0:
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        write_run_config(tmp, cfg, _source(ckpt_dir, provenance_from))
        integrity.write_record(tmp)  # sizes + checksums, checked at resume
        if final.exists():  # re-saving an iteration (e.g. after a resume)
            old = final.with_name(f".old_{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        _atomic_write(ckpt_dir / RUN_CONFIG, (final / RUN_CONFIG).read_text())
        write_tracker(ckpt_dir, iteration)
        if keep_last > 0 and iteration != RELEASE:
            done = [it for it in complete_iterations(ckpt_dir) if it <= int(iteration)]
            for it in done[:-keep_last]:
                shutil.rmtree(ckpt_dir / iteration_dirname(it), ignore_errors=True)
    barrier()


def _source(ckpt_dir: Path, provenance_from: Path | None) -> dict:
    """The ``source`` to write: kept from ``ckpt_dir``, else carried from ``provenance_from``."""
    source = read_run_config(ckpt_dir).source if (ckpt_dir / RUN_CONFIG).is_file() else None
    if provenance_from is not None and Path(provenance_from).absolute() != ckpt_dir.absolute():
        source = copy_provenance(Path(provenance_from), ckpt_dir, source or None)
    return source or {}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_provenance(src: Path, dst: Path, source: dict | None = None) -> dict:
    """Carry a converted checkpoint's HF provenance into another checkpoint directory.

    Copies ``hf_passthrough.safetensors`` and ``hf_files/`` from ``src`` to ``dst`` (if ``dst``
    lacks them) and returns the ``source`` to write into ``dst``'s run config (``source`` if
    given, else ``src``'s). Training that loads a converted checkpoint and saves elsewhere calls
    this once (rank 0) so ``mcore-to-hf`` on its output still reproduces the HF original's key
    spelling, unused tensors and tokenizer/processor files.
    """
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
