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
from mm_megatron.convert.errors import ConversionError
from mm_megatron.convert.hf_config import llava_config_from_hf, load_hf_config
from mm_megatron.convert.mapping import build_rules, passthrough_reason
from mm_megatron.convert.safetensors_io import SafetensorsWriter, read_tensor

SOURCE_KIND = "hf-llava"


def plan_import(hf: HFCheckpoint, cfg) -> tuple[list, list[str]]:
    """(rules, passthrough canonical keys), after checking names and shapes against the config."""
    rules = build_rules(cfg)
    used: set[str] = set()
    for rule in rules:
        for key, want in zip(rule.hf, rule.hf_shapes):
            if key not in hf.infos:
                stored = hf.spelling.to_file(key)
                raise ConversionError(
                    f"tensor {stored!r} not found in {hf.dir} (config.json implies it: "
                    f"{_what(cfg)})"
                )
            got = hf.infos[key].shape
            if tuple(got) != tuple(want):
                raise ConversionError(
                    f"tensor {hf.describe(key)} has shape {list(got)}, but config.json implies "
                    f"{list(want)}"
                )
            used.add(key)
    passthrough = []
    for key in hf.infos:
        if key in used:
            continue
        if passthrough_reason(key, cfg) is None:
            raise ConversionError(
                f"unexpected tensor {hf.describe(key)}: not part of a LLaVA model with this "
                f"config.json ({_what(cfg)})"
            )
        passthrough.append(key)
    return rules, passthrough


def _what(cfg) -> str:
    v, lm = cfg.vision, cfg.lm
    return (
        f"{v.style} vision {v.num_layers} layers (using {v.num_layers_built}), {lm.flavor} LM "
        f"{lm.num_layers} layers"
    )


def _choose_dtype(hf: HFCheckpoint, rules, requested: torch.dtype | None) -> torch.dtype:
    if requested is not None:
        return requested
    counts = Counter(hf.infos[k].dtype for r in rules for k in r.hf)
    if len(counts) == 1:
        return next(iter(counts))
    return torch.float32  # mixed: the lossless choice


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
    store_dtype = _choose_dtype(hf, rules, requested)
    hf_dtype = Counter(hf.infos[k].dtype for r in rules for k in r.hf).most_common(1)[0][0]
    source = {
        "kind": SOURCE_KIND,
        "hf_dir": str(hf_dir.absolute()),
        "key_spelling": hf.spelling.to_dict(),
        "sharded": hf.sharded,
        "shards": hf.files,
        "dtype": dtype_name(store_dtype),
        "hf_dtype": dtype_name(hf_dtype),
        "hf_dtypes": {
            hf.file_keys[k]: dtype_name(hf.infos[k].dtype)
            for r in rules
            for k in r.hf
            if hf.infos[k].dtype != hf_dtype
        },
        "passthrough": [hf.file_keys[k] for k in passthrough],
        "notes": notes,
        "transformers_version": getattr(hf_cfg, "transformers_version", None),
    }
    with atomic_output(out_dir, force, inputs=(hf_dir,)) as tmp, single_rank():
        model = meta_model(cfg, store_dtype)
        _check_params(model, rules)
        by_param = {"model." + r.param: r for r in rules}
        shapes = {"model." + n: tuple(p.shape) for n, p in model.named_parameters()}
        total = sum(p.numel() for p in model.parameters()) * _itemsize(store_dtype)
        bar = progress_bar(total, "hf-to-mcore", progress)
        cache: dict[str, torch.Tensor] = {}

        def resolve(view: ChunkView) -> torch.Tensor:
            rule = by_param[view.param_key]
            if rule.row_concat:  # a chunk that is exactly one HF tensor: no cat, no copy
                rows = view.row_range(shapes[view.param_key])
                first = 0
                for key in rule.hf:
                    n = hf.infos[key].shape[0]
                    if rows == (first, first + n):
                        return hf.read(key).to(store_dtype)
                    first += n
            if view.param_key not in cache:
                cache.clear()
                t = rule.to_mcore([hf.read(k) for k in rule.hf]).to(store_dtype).contiguous()
                if tuple(t.shape) != shapes[view.param_key]:
                    raise ConversionError(
                        f"{rule.hf[0]}: converted shape {list(t.shape)} != model parameter "
                        f"{view.param_key} {list(shapes[view.param_key])}"
                    )
                cache[view.param_key] = t
            return view.take(cache[view.param_key])

        release = tmp / model_io.RELEASE
        release.mkdir()
        state = model_io.model_sharded_state_dict(model)
        save_streaming(state, release, resolve, on_write=bar.update)
        cache.clear()
        bar.close()
        _write_passthrough(hf, passthrough, tmp / model_io.PASSTHROUGH)
        files = tmp / model_io.HF_FILES
        files.mkdir()
        for p in non_weight_files(hf_dir):
            shutil.copy2(p, files / p.name)
        model_io.write_run_config(tmp, cfg, source)
        model_io.write_tracker(tmp, model_io.RELEASE)
    return out_dir


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_params(model, rules) -> None:
    params = {n for n, _ in model.named_parameters()}
    ruled = {r.param for r in rules}
    if params != ruled:
        missing = sorted(params - ruled)
        extra = sorted(ruled - params)
        raise RuntimeError(  # a bug in mapping.py, not bad input
            f"conversion rules out of sync with the model: no rule for {missing[:3]}, rules for "
            f"absent parameters {extra[:3]}"
        )


def _write_passthrough(hf: HFCheckpoint, keys: list[str], path: Path) -> None:
    decl = [(hf.file_keys[k], hf.infos[k].dtype, hf.infos[k].shape) for k in keys]
    with SafetensorsWriter({path: decl}) as w:
        for k in keys:
            w.write(hf.file_keys[k], read_tensor(hf.infos[k]))
