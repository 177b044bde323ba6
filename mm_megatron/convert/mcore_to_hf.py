"""mm_megatron checkpoint -> HF LLaVA directory (safetensors + config + tokenizer/processor).

Reads the dist checkpoint one group of parameters at a time (a transformer layer, the embeddings,
...) with ``dist_checkpointing.load`` into the TP1 layout — whatever TP/PP/vocab padding it was
saved with — splits each parameter back into HF tensors (vocab padding stripped) and writes them
straight to their place in the output safetensors files, whose headers are computed upfront.

Key spelling, shard layout and per-tensor dtypes follow the HF original recorded at import
(``source`` in ``mm_megatron.json``), so ``hf-to-mcore`` then ``mcore-to-hf`` reproduces the input
key set and values exactly. A checkpoint without an HF original (trained from a preset) is written
in the spelling transformers 5.23's ``save_pretrained`` uses, with a config.json synthesised from
the model config.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from mm_megatron.checkpoint import model_io
from mm_megatron.checkpoint.errors import ConversionError
from mm_megatron.checkpoint.safetensors_io import SafetensorsWriter, read_header, read_tensor
from mm_megatron.convert.common import (
    INDEX_FILE,
    SINGLE_FILE,
    atomic_output,
    check_output,
    dtype_name,
    meta_model,
    parse_dtype,
    progress_bar,
    single_rank,
)
from mm_megatron.convert.hf_config import (
    architecture_dict,
    hf_config_from_llava,
    llava_config_from_hf,
    load_hf_config,
)
from mm_megatron.convert.keys import KeySpelling
from mm_megatron.convert.mapping import PARTS, build_rules, groups_in_order

DEFAULT_MAX_SHARD = 50 * 1024**3  # transformers 5.23's save_pretrained default ("50GB")


class GroupLoader:
    """Loads the TP1 tensors of named parameters from a dist checkpoint, a few at a time.

    Each parameter is requested as one plain chunk of its stored global tensor (the layer's slice
    of a stacked ``decoder.layers.*`` key, the real vocab rows of an embedding), whatever chunking
    and vocab padding the saver used. The model's own sharded tensors cannot be used for partial
    loads: megatron's legacy stacked-layer path assumes every layer is requested.
    """

    def __init__(self, cfg, dist_dir: Path, dtype: torch.dtype | None = None):
        self.dist_dir = Path(dist_dir)
        stored = model_io.stored_tensors(self.dist_dir)
        self.dtype = dtype or stored_dtype_of(self.dist_dir)
        model = meta_model(cfg, dtype)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.requests: dict[str, tuple[str, tuple[int, ...], tuple[int, ...], tuple]] = {}
        for key, obj in model.sharded_state_dict(prefix=model_io.MODEL_PREFIX).items():
            name = key[len(model_io.MODEL_PREFIX) :]
            if name not in shapes:
                continue  # _extra_state and other non-parameters
            st = obj.build()[0] if isinstance(obj, ShardedTensorFactory) else obj
            if st.key not in stored:
                raise ConversionError(
                    f"{self.dist_dir} lacks tensor {st.key!r} of the model its "
                    f"{model_io.RUN_CONFIG} describes"
                )
            shape = shapes[name]
            if st.allow_shape_mismatch:  # vocab-padded: take the real rows
                shape = (cfg.lm.vocab_size, *shape[1:])
            prefix = tuple(st.global_offset[: st.prepend_axis_num])
            self.requests[name] = (st.key, stored[st.key][0], shape, prefix)

    def load(self, params: list[str]) -> dict[str, torch.Tensor]:
        """``{param name: TP1 tensor}`` (vocab tensors without padding rows)."""
        sub = {}
        for name in params:
            key, global_shape, shape, prefix = self.requests[name]
            local = (1,) * len(prefix) + shape
            sub[name] = ShardedTensor(
                key=key,
                data=torch.empty(local, dtype=self.dtype),
                dtype=self.dtype,
                local_shape=local,
                global_shape=global_shape,
                global_offset=prefix + (0,) * len(shape),
                axis_fragmentations=None,
            )
        loaded = dist_checkpointing.load(sub, str(self.dist_dir), validate_access_integrity=False)
        return {n: loaded[n].reshape(self.requests[n][2]) for n in params}


def stored_dtype_of(dist_dir: Path) -> torch.dtype:
    """The dtype a dist checkpoint stores its weights in (that of the word embeddings)."""
    stored = model_io.stored_tensors(dist_dir)
    emb = stored.get("model.language_model.embedding.word_embeddings.weight")
    if emb is None:
        raise ConversionError(f"{dist_dir} has no model.language_model.embedding weights")
    return emb[1]


def _output_dtype(key: str, source: dict, stored: torch.dtype, override: torch.dtype | None):
    if override is not None:
        return override
    name = (source.get("hf_dtypes") or {}).get(key) or source.get("hf_dtype")
    return parse_dtype(name) if name else stored


def _shard_layout(keys: list[str], sizes: dict[str, int], source: dict, max_shard: int):
    """``{file name: [keys]}``: the original layout if it covers exactly these keys, else new."""
    shards = source.get("shards")
    if shards and sorted(k for ks in shards.values() for k in ks) == sorted(keys):
        return {f: list(ks) for f, ks in shards.items()}, bool(source.get("sharded"))
    files: list[list[str]] = [[]]
    size = 0
    for k in keys:
        if files[-1] and size + sizes[k] > max_shard:
            files.append([])
            size = 0
        files[-1].append(k)
        size += sizes[k]
    if len(files) == 1:
        return {SINGLE_FILE: files[0]}, False
    n = len(files)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": ks for i, ks in enumerate(files)}, True


@dataclass
class ExportSource:
    """What an export reads: the checkpoint's config, provenance and tensors outside the model."""

    cfg: Any
    """The model config (``LlavaConfig``)."""
    source: dict
    """The run config's ``source`` (HF provenance; ``{}`` for a checkpoint trained from scratch)."""
    dist_dir: Path
    """The dist checkpoint of the chosen iteration."""
    spelling: KeySpelling
    """LLaVA key spelling of the HF original (passthrough keys and dtypes are recorded in it)."""
    passthrough: dict
    """``{file key: TensorInfo}`` of ``hf_passthrough.safetensors``."""
    hf_files: Path
    """The HF original's non-weight files (may not exist)."""
    stored_dtype: torch.dtype
    """The dtype the dist checkpoint holds."""
    override: torch.dtype | None
    """``--dtype``: cast every floating tensor to this."""

    @classmethod
    def open(cls, ckpt_dir: Path, iteration=None, dtype=None) -> ExportSource:
        """Read ``ckpt_dir``'s run config and passthrough header (no weights)."""
        override = dtype if isinstance(dtype, torch.dtype) or dtype is None else parse_dtype(dtype)
        run = model_io.read_run_config(ckpt_dir)
        dist_dir = model_io.dist_checkpoint_dir(ckpt_dir, iteration)
        passthrough_path = ckpt_dir / model_io.PASSTHROUGH
        passthrough = read_header(passthrough_path)[0] if passthrough_path.is_file() else {}
        return cls(
            cfg=run.model,
            source=run.source,
            dist_dir=dist_dir,
            spelling=KeySpelling.from_dict(run.source.get("key_spelling")),
            passthrough=passthrough,
            hf_files=ckpt_dir / model_io.HF_FILES,
            stored_dtype=stored_dtype_of(dist_dir),
            override=override,
        )

    @property
    def default_dtype(self) -> str:
        """Dtype name of tensors the original does not list (its main dtype, else stored)."""
        return self.source.get("hf_dtype") or dtype_name(self.stored_dtype)

    def config_json(self, log) -> tuple[str, bool]:
        """(LLaVA config.json text, generated?): see :func:`_config_json`."""
        return _config_json(self.cfg, self.hf_files, self.default_dtype, self.override, log)


Route = Callable[[str], "tuple[str, str] | None"]
"""Canonical HF key -> (output sub-directory, stored key), or None to leave the tensor out."""


def mcore_to_hf(
    ckpt_dir: Path,
    out_dir: Path,
    *,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    iteration: int | str | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD,
    progress: bool = True,
    log=print,
) -> Path:
    """Export an mm_megatron checkpoint directory as an HF LLaVA directory.

    (The vision tower and the LM as their own HF models: :func:`.export_parts.mcore_to_hf_parts`.)

    Args:
        ckpt_dir: checkpoint directory (``mm_megatron.json`` + tracker + dist checkpoint).
        out_dir: output directory (must not exist unless ``force``).
        dtype: cast floating tensors to this; default each tensor's dtype in the HF original
            (or the stored dtype if there is none).
        force: replace an existing ``out_dir``.
        iteration: which saved iteration; default the tracker's.
        max_shard_size: bytes per safetensors file when there is no original layout to follow.
        progress: show a tqdm bar.
        log: where to print one-line notes.

    Returns:
        ``out_dir``.
    """
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    check_output(out_dir, force, (ckpt_dir,))  # fail before any work
    src = ExportSource.open(ckpt_dir, iteration, dtype)
    if src.cfg.vision.hires.enabled:
        raise ValueError(
            f"{ckpt_dir}: vision.style={src.cfg.vision.style!r} (a dual encoder with a "
            "high-resolution tower) has no transformers LLaVA class to export to"
        )
    config_json, generated = src.config_json(log)
    synthetic = _synthetic_tensors(src.cfg) if generated else {}
    with atomic_output(out_dir, force, inputs=(ckpt_dir,)) as tmp, single_rank():
        copy_files(src.hf_files, tmp, lambda name: name != "config.json")
        (tmp / "config.json").write_text(config_json)
        from mm_megatron.convert.processor_files import complete_export

        # tokenizer + processor for any run; before the weights, so a refusal costs nothing
        complete_export(tmp, ckpt_dir, src.cfg, log)
        export_tensors(
            src,
            tmp,
            lambda key: (".", src.spelling.to_file(key)),
            synthetic=synthetic,
            max_shard_size=max_shard_size,
            keep_layout=True,
            progress=progress,
        )
    return out_dir


def export_tensors(
    src: ExportSource,
    out_dir: Path,
    route: Route,
    *,
    parts: tuple[str, ...] = PARTS,
    synthetic: dict[str, torch.Tensor] | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD,
    keep_layout: bool = False,
    progress: bool = True,
) -> None:
    """Write the HF tensors of ``parts`` (and the passthrough ones) where ``route`` sends them.

    Streams one rule group (a layer, the embeddings) at a time. Each output sub-directory gets
    one ``model.safetensors`` or, past ``max_shard_size``, shards and an index. Single rank.

    Args:
        src: the checkpoint.
        out_dir: the output root (sub-directories are created).
        route: canonical key -> (sub-directory, stored key) or None (not written).
        parts: which parts' rules to export.
        synthetic: ``{canonical key: tensor}`` HF needs but the checkpoint lacks.
        max_shard_size: bytes per file when no original layout applies.
        keep_layout: follow the HF original's shard layout when it covers the same keys.
        progress: show a tqdm bar.
    """
    rules = build_rules(src.cfg, parts)
    loader = GroupLoader(src.cfg, src.dist_dir, src.stored_dtype)
    plan = _plan_outputs(src, rules, synthetic or {}, loader.dtype)
    dest = {k: r for k in plan if (r := route(k)) is not None}
    sizes = {k: _nbytes(*plan[k]) for k in dest}
    decl: dict[Path, list] = {}
    for sub in sorted({d for d, _ in dest.values()}):
        keys = [k for k in dest if dest[k][0] == sub]
        stored = {dest[k][1]: k for k in keys}
        source = src.source if keep_layout else {}
        layout, sharded = _shard_layout(
            list(stored), {f: sizes[stored[f]] for f in stored}, source, max_shard_size
        )
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
        for fname, fkeys in layout.items():
            decl[out_dir / sub / fname] = [(f, *plan[stored[f]]) for f in fkeys]
        if sharded:
            _write_index(out_dir / sub, layout, {f: sizes[stored[f]] for f in stored})
    bar = progress_bar(sum(sizes.values()), "mcore-to-hf", progress)

    def put(writer, key: str, t: torch.Tensor) -> None:
        if key in dest:
            writer.write(dest[key][1], t.to(plan[key][0]))
            bar.update(sizes[key])

    with SafetensorsWriter(decl) as writer:
        for group in groups_in_order(rules):
            members = [r for r in rules if r.group == group]
            loaded = loader.load([r.param for r in members])
            for rule in members:
                for key, t in zip(rule.hf, rule.to_hf(loaded.pop(rule.param))):
                    put(writer, key, t)
        for fkey, info in src.passthrough.items():
            put(writer, src.spelling.to_canonical(fkey), read_tensor(info))
        for key, t in (synthetic or {}).items():
            put(writer, key, t)
    bar.close()


def _plan_outputs(src: ExportSource, rules, synthetic: dict, stored: torch.dtype) -> dict:
    """``{canonical key: (output dtype, shape)}`` of every tensor an export can write."""
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for rule in rules:
        for key, shape in zip(rule.hf, rule.hf_shapes):
            fkey = src.spelling.to_file(key)
            out[key] = (_output_dtype(fkey, src.source, stored, src.override), shape)
    for fkey, info in src.passthrough.items():
        cast = src.override if src.override is not None and info.dtype.is_floating_point else None
        out[src.spelling.to_canonical(fkey)] = (cast or info.dtype, info.shape)
    for key, t in synthetic.items():
        out[key] = (src.override or stored, tuple(t.shape))
    return out


def _write_index(out_dir: Path, layout: dict[str, list[str]], sizes: dict[str, int]) -> None:
    index = {
        "metadata": {"total_size": sum(sizes.values())},
        "weight_map": {k: f for f, keys in layout.items() for k in sorted(keys)},
    }
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def copy_files(src_dir: Path, dst_dir: Path, keep: Callable[[str], bool]) -> None:
    """Copy the top-level files of ``src_dir`` whose name ``keep`` accepts (if it exists)."""
    if src_dir.is_dir():
        for p in sorted(src_dir.iterdir()):
            if p.is_file() and keep(p.name):
                shutil.copy2(p, dst_dir / p.name)


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n


def _config_json(cfg, hf_files: Path, default: str, override, log) -> tuple[str, bool]:
    """(config.json text, generated?): the original if it still describes ``cfg``, else new."""
    original = hf_files / "config.json"
    dtype = dtype_name(override) if override is not None else default
    if original.is_file():
        theirs, _ = llava_config_from_hf(load_hf_config(hf_files))
        if architecture_dict(theirs) == architecture_dict(cfg):
            text = original.read_text()
            if override is None:
                return text, False
            doc = json.loads(text)
            key = "torch_dtype" if "torch_dtype" in doc and "dtype" not in doc else "dtype"
            doc[key] = dtype
            return json.dumps(doc, indent=2, sort_keys=True) + "\n", False
        log("note: the model config differs from the original config.json; writing a new one")
    return json.dumps(hf_config_from_llava(cfg, dtype), indent=2, sort_keys=True) + "\n", True


def _synthetic_tensors(cfg) -> dict[str, torch.Tensor]:
    """Weights HF's vision tower has but our model never had (identity post-LayerNorm)."""
    if cfg.vision.style not in ("clip", "siglip"):
        return {}  # InternViT: HF's tower has exactly our weights
    h = cfg.vision.hidden_size
    return {
        "model.vision_tower.post_layernorm.weight": torch.ones(h),
        "model.vision_tower.post_layernorm.bias": torch.zeros(h),
    }
