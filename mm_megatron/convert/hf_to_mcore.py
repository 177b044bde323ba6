"""HF LLaVA (safetensors) -> mm_megatron checkpoint (megatron-core torch_dist), streaming.

Steps: map ``config.json`` to our ``LlavaConfig`` (errors for anything unsupported); index and
validate every safetensors header; check each tensor's shape against the config and that every
tensor has a use (a megatron parameter or a known-unused passthrough); build the TP1/PP1 model on
the meta device; stream its dist checkpoint with
:func:`~mm_megatron.checkpoint.streaming.save_streaming`, reading and transforming the HF tensors
of one parameter at a time. Peak memory is a few tensors (the largest is the vocab embedding),
independent of the model size.

Output layout: see :mod:`mm_megatron.checkpoint.model_io`. Written to a temp dir renamed into
place at the end; ``force`` replaces an existing output.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import torch

from mm_megatron.checkpoint import model_io
from mm_megatron.checkpoint.errors import ConversionError
from mm_megatron.checkpoint.safetensors_io import SafetensorsWriter
from mm_megatron.checkpoint.streaming import ChunkView, save_streaming
from mm_megatron.convert.common import (
    HFCheckpoint,
    atomic_output,
    check_output,
    dtype_name,
    meta_model,
    non_weight_files,
    parse_dtype,
    progress_bar,
    single_rank,
)
from mm_megatron.convert.hf_config import llava_config_from_hf, load_hf_config
from mm_megatron.convert.mapping import PARTS, build_rules, passthrough_reason

SOURCE_KIND = "hf-llava"


def plan_import(src, cfg, parts: tuple[str, ...] = PARTS, config: str = "config.json"):
    """(rules, passthrough canonical keys), after checking names and shapes against the config.

    Args:
        src: the tensors (an :class:`~mm_megatron.convert.common.HFCheckpoint` or anything with
            its ``infos``/``describe``/``where``).
        cfg: our model config.
        parts: the parts whose rules apply (see :func:`~mm_megatron.convert.mapping.build_rules`).
        config: the file the config came from, for messages.
    """
    rules = build_rules(cfg, parts)
    used: set[str] = set()
    for rule in rules:
        for key, want in zip(rule.hf, rule.hf_shapes):
            if key not in src.infos:
                raise ConversionError(f"{src.where(key)} ({config} implies it: {_what(cfg)})")
            got = src.infos[key].shape
            if tuple(got) != tuple(want):
                raise ConversionError(
                    f"tensor {src.describe(key)} has shape {list(got)}, but {config} implies "
                    f"{list(want)}"
                )
            used.add(key)
    passthrough = []
    for key in src.infos:
        if key in used:
            continue
        if passthrough_reason(key, cfg) is None:
            raise ConversionError(
                f"unexpected tensor {src.describe(key)}: not part of a LLaVA model with this "
                f"{config} ({_what(cfg)})"
            )
        passthrough.append(key)
    return rules, passthrough


def _what(cfg) -> str:
    v, lm = cfg.vision, cfg.lm
    return (
        f"{v.style} vision {v.num_layers} layers (using {v.num_layers_built}), {lm.flavor} LM "
        f"{lm.num_layers} layers"
    )


def choose_dtype(src, rules, requested: torch.dtype | None) -> torch.dtype:
    """``requested``, else the tensors' one dtype (fp32, the lossless choice, if mixed)."""
    if requested is not None:
        return requested
    counts = Counter(src.infos[k].dtype for r in rules for k in r.hf)
    if len(counts) == 1:
        return next(iter(counts))
    return torch.float32


def dtype_record(src, rules, file_key) -> dict:
    """``hf_dtype`` (the most common) and ``hf_dtypes`` (the exceptions, by file key)."""
    hf_dtype = Counter(src.infos[k].dtype for r in rules for k in r.hf).most_common(1)[0][0]
    exceptions = {
        file_key(k): dtype_name(src.infos[k].dtype)
        for r in rules
        for k in r.hf
        if src.infos[k].dtype != hf_dtype
    }
    return {"hf_dtype": dtype_name(hf_dtype), "hf_dtypes": exceptions}


def hf_to_mcore(
    hf_dir: Path,
    out_dir: Path,
    *,
    spec: str = "local",
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    make_vocab_size_divisible_by: int = 64,
    progress: bool = True,
    log=print,
) -> Path:
    """Convert an HF LLaVA checkpoint directory to an mm_megatron checkpoint directory.

    Args:
        hf_dir: directory with ``config.json`` and safetensors weights.
        out_dir: output directory (must not exist unless ``force``).
        spec: ``local`` or ``te``, recorded in the run config (the weights are identical).
        dtype: storage dtype (``bf16``/``fp32``/``fp16``); default the HF tensors' own dtype
            (fp32 if they are mixed), which keeps round trips bit-exact.
        force: replace an existing ``out_dir``.
        make_vocab_size_divisible_by: megatron vocab padding multiple (x TP).
        progress: show a tqdm bar.
        log: where to print one-line notes.

    Returns:
        ``out_dir``.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_output(out_dir, force, (hf_dir,))  # fail before any work
    requested = dtype if isinstance(dtype, torch.dtype) or dtype is None else parse_dtype(dtype)
    hf_cfg = load_hf_config(hf_dir)
    cfg, notes = llava_config_from_hf(
        hf_cfg, spec=spec, make_vocab_size_divisible_by=make_vocab_size_divisible_by
    )
    for note in notes:
        log(f"note: {note}")
    hf = HFCheckpoint(hf_dir)
    rules, passthrough = plan_import(hf, cfg)
    store_dtype = choose_dtype(hf, rules, requested)
    source = {
        "kind": SOURCE_KIND,
        "hf_dir": str(hf_dir.absolute()),
        "key_spelling": hf.spelling.to_dict(),
        "sharded": hf.sharded,
        "shards": hf.files,
        "dtype": dtype_name(store_dtype),
        **dtype_record(hf, rules, lambda k: hf.file_keys[k]),
        "passthrough": [hf.file_keys[k] for k in passthrough],
        "notes": notes,
        "transformers_version": getattr(hf_cfg, "transformers_version", None),
    }
    with atomic_output(out_dir, force, inputs=(hf_dir,)) as tmp, single_rank():
        write_weights(tmp, hf, cfg, rules, store_dtype, progress=progress)
        write_passthrough(hf, passthrough, tmp / model_io.PASSTHROUGH, hf.file_keys.__getitem__)
        files = tmp / model_io.HF_FILES
        files.mkdir()
        for p in non_weight_files(hf_dir):
            shutil.copy2(p, files / p.name)
        model_io.write_run_config(tmp, cfg, source)
        model_io.write_tracker(tmp, model_io.RELEASE)
    return out_dir


def write_weights(
    ckpt_dir: Path,
    src,
    cfg,
    rules,
    store_dtype: torch.dtype,
    *,
    fixed: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    desc: str = "hf-to-mcore",
) -> None:
    """Stream the model's release dist checkpoint into ``ckpt_dir/release``; single rank.

    Args:
        ckpt_dir: the checkpoint directory being written.
        src: the HF tensors (see :func:`plan_import`).
        cfg: the model config.
        rules: the rules that build parameters from ``src``.
        store_dtype: dtype of every stored tensor.
        fixed: ``{parameter name: tensor}`` for parameters no rule covers (a fresh projector).
        progress: show a tqdm bar.
        desc: its label.
    """
    fixed = fixed or {}
    model = meta_model(cfg, store_dtype)
    _check_params(model, rules, fixed)
    by_param = {"model." + r.param: r for r in rules}
    shapes = {"model." + n: tuple(p.shape) for n, p in model.named_parameters()}
    total = sum(p.numel() for p in model.parameters()) * _itemsize(store_dtype)
    bar = progress_bar(total, desc, progress)
    cache: dict[str, torch.Tensor] = {}

    def build(key: str) -> torch.Tensor:
        if key[len("model.") :] in fixed:
            return fixed[key[len("model.") :]].to(store_dtype).contiguous()
        rule = by_param[key]
        t = rule.to_mcore([src.read(k) for k in rule.hf]).to(store_dtype).contiguous()
        if tuple(t.shape) != shapes[key]:
            raise ConversionError(
                f"{rule.hf[0]}: converted shape {list(t.shape)} != model parameter "
                f"{key} {list(shapes[key])}"
            )
        return t

    def resolve(view: ChunkView) -> torch.Tensor:
        rule = by_param.get(view.param_key)
        if rule is not None and rule.row_concat:  # a chunk that is one HF tensor: no cat/copy
            rows = view.row_range(shapes[view.param_key])
            first = 0
            for key in rule.hf:
                n = src.infos[key].shape[0]
                if rows == (first, first + n):
                    return src.read(key).to(store_dtype)
                first += n
        if view.param_key not in cache:
            cache.clear()
            cache[view.param_key] = build(view.param_key)
        return view.take(cache[view.param_key])

    release = ckpt_dir / model_io.RELEASE
    release.mkdir()
    save_streaming(model_io.model_sharded_state_dict(model), release, resolve, on_write=bar.update)
    cache.clear()
    bar.close()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_params(model, rules, fixed: dict) -> None:
    params = {n for n, _ in model.named_parameters()}
    ruled = {r.param for r in rules} | set(fixed)
    if params != ruled:
        missing = sorted(params - ruled)
        extra = sorted(ruled - params)
        raise RuntimeError(  # a bug in mapping.py, not bad input
            f"conversion rules out of sync with the model: no rule for {missing[:3]}, rules for "
            f"absent parameters {extra[:3]}"
        )


def write_passthrough(src, keys: list[str], path: Path, file_key) -> None:
    """Write the tensors ``keys`` (canonical) of ``src`` to ``path`` under ``file_key(key)``."""
    decl = [(file_key(k), src.infos[k].dtype, src.infos[k].shape) for k in keys]
    with SafetensorsWriter({path: decl}) as w:
        for k in keys:
            w.write(file_key(k), src.read(k))
