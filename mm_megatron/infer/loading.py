"""Load any mm_megatron checkpoint on one device for inference, with the run's own data settings.

What this file does: `load_for_inference(DIR)` reads the model config (`mm_megatron.json`), builds
the model at TP = PP = CP = 1 in the dtype the weights were stored in, loads the newest (or a
given) iteration (dist checkpoints are layout-independent, so a run saved at TP2 x PP2 or by the
converter loads the same way) and finds what the run trained with: its chat template, tokenizer
and image settings from the training state of that iteration (``train_state.json``; the trainer
records the resolved data config there), else, for converter outputs, the HF tokenizer files in
``DIR/hf_files`` with the model's image settings and the `vicuna_v1` template (LLaVA-1.5's).
Explicit `template` / `tokenizer` arguments win.

It sets up a single-process megatron parallel state when none exists (call
`mm_megatron.runtime.distributed.destroy()` when done, or use it inside a training run, where the
state already exists and nothing is initialised here).

What it does not do: generate (`generate.py`) or touch multi-rank layouts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mm_megatron.checkpoint import model_io
from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.data.config import DataConfig
from mm_megatron.data.image import ImageTransform

TRAIN_STATE_JSON = "train_state.json"
"""The training state beside each iteration's dist checkpoint (written by the trainer)."""

CONVERTED_TEMPLATE = "vicuna_v1"
"""Template assumed for converter outputs (llava-hf LLaVA-1.5 checkpoints)."""


@dataclass
class InferenceBundle:
    """What generation needs, loaded."""

    model: Any
    """The `LlavaModel` (eval mode)."""
    model_config: LlavaConfig
    """Its config."""
    tokenizer: Any
    """`TokenizerInfo`."""
    template: str
    """Chat template."""
    transform: ImageTransform
    """The run's image preprocessing."""
    iteration: int | str
    """Iteration loaded."""
    system_prompt: str | None = None
    """The run's system prompt override, if any."""


def run_data_config(ckpt_dir: Path, iteration: int | str, model: LlavaConfig) -> DataConfig:
    """The data config the run trained with (defaults that follow the model when unknown)."""
    data = DataConfig(
        image_size=model.vision.input_image_size,
        image_norm="siglip" if model.vision.vit_style == "siglip" else "clip",
    )
    path = ckpt_dir / model_io.iteration_dirname(iteration) / TRAIN_STATE_JSON
    if path.is_file():
        try:
            saved = (json.loads(path.read_text(encoding="utf-8")).get("job") or {}).get("data")
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the training state: {e}") from e
        for key, value in (saved or {}).items():
            if hasattr(data, key):
                setattr(data, key, value)
    return data


def _tokenizer_source(ckpt_dir: Path, data: DataConfig, override: str | None) -> str:
    for candidate in (override, data.tokenizer_path):
        if candidate:
            if not Path(candidate).is_dir():
                raise FileNotFoundError(f"tokenizer directory {candidate} does not exist")
            return candidate
    hf_files = ckpt_dir / model_io.HF_FILES
    if hf_files.is_dir() and any(hf_files.glob("tokenizer*")):
        return str(hf_files)
    raise FileNotFoundError(
        f"{ckpt_dir}: no tokenizer recorded with the checkpoint; pass --tokenizer DIR"
    )


def _stored_dtype(dist_dir: Path) -> torch.dtype:
    for shape_dtype in model_io.stored_tensors(dist_dir).values():
        if shape_dtype[1].is_floating_point:
            return shape_dtype[1]
    return torch.float32


def load_for_inference(
    ckpt_dir: str | Path,
    *,
    iteration: int | str | None = None,
    template: str | None = None,
    tokenizer: str | None = None,
    model: Any = None,
) -> InferenceBundle:
    """Load `ckpt_dir` for generation (see the module docstring).

    Args:
        ckpt_dir: A checkpoint directory (training `--save` or converter output).
        iteration: Which iteration; default the newest.
        template: Chat template override.
        tokenizer: Tokenizer directory override.
        model: An already built model to use instead of loading weights (the trainer's).
    """
    from mm_megatron.checkpoint.model_io import latest_iteration
    from mm_megatron.data.tokenizer import prepare_tokenizer
    from mm_megatron.model.build import build_llava_model
    from mm_megatron.runtime import distributed

    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"--ckpt {ckpt_dir}: no such directory")
    cfg = model_io.read_run_config(ckpt_dir).model
    if iteration is None:
        iteration = latest_iteration(ckpt_dir)
        if iteration is None:
            raise FileNotFoundError(f"--ckpt {ckpt_dir}: no complete checkpoint in it")
    data = run_data_config(ckpt_dir, iteration, cfg)
    info = prepare_tokenizer(_tokenizer_source(ckpt_dir, data, tokenizer), data.image_token)
    if model is None:
        from megatron.core import parallel_state

        from mm_megatron.config import ParallelConfig

        if not parallel_state.model_parallel_is_initialized():
            distributed.initialize(ParallelConfig(), seed=0)
        dist_dir = model_io.dist_checkpoint_dir(ckpt_dir, iteration)
        model = build_llava_model(cfg, dtype=_stored_dtype(dist_dir))
        if torch.cuda.is_available():
            model = model.cuda()
        model_io.load_checkpoint(model, ckpt_dir, iteration=iteration)
    model.eval()
    default_template = data.template or (CONVERTED_TEMPLATE if iteration == "release" else None)
    return InferenceBundle(
        model=model,
        model_config=cfg,
        tokenizer=info,
        template=template or default_template or CONVERTED_TEMPLATE,
        transform=ImageTransform(data.image_size, data.image_aspect, data.image_norm),
        iteration=iteration,
        system_prompt=data.system_prompt,
    )
