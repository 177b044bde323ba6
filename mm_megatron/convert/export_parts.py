"""``mcore-to-hf --parts``: export a checkpoint's vision tower and language model as HF models.

Writes two HF directories under the output:

* ``vision/``: the vision tower as ``CLIPVisionModel``, ``SiglipVisionModel`` or BLIP-2's
  ``Blip2VisionModel`` / ``InstructBlipVisionModel`` (config.json,
  safetensors, and the image processor's ``preprocessor_config.json`` when the checkpoint has
  one). Layers past ``vision_feature_layer`` and ``post_layernorm``, which LLaVA never runs, come
  from the passthrough file, so a frozen tower comes back bit-exact and complete.
* ``lm/``: the language model as ``LlamaForCausalLM``, ``MistralForCausalLM`` or
  ``Qwen2ForCausalLM`` with the tokenizer files (added tokens kept; the vocabulary, and the
  embedding and output rows, include them).

The projector has no stand-alone HF class and is not written. Configs are the parts' own (which
``convert assemble`` records, whatever the projector), else those inside the LLaVA config.json
the checkpoint carries (``hf-to-mcore`` stores one), else made from the model config for a
checkpoint trained from scratch. Key spellings follow the parts'
originals (recorded by ``convert assemble``); dtypes follow the originals unless ``--dtype``.

Not here: reading the dist checkpoint and the shard layout (:mod:`.mcore_to_hf`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mm_megatron.convert.common import atomic_output, check_output, dtype_name, single_rank
from mm_megatron.convert.keys import LMPartNaming, VisionPartNaming
from mm_megatron.convert.mcore_to_hf import (
    DEFAULT_MAX_SHARD,
    ExportSource,
    _synthetic_tensors,
    copy_files,
    export_tensors,
)

VISION_CLASSES = {
    "clip": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "blip2": "Blip2VisionModel",
}
VISION_CLASS_OF_TYPE = {"instructblip_vision_model": "InstructBlipVisionModel"}
"""A vision config ``model_type`` whose class is not its style's."""
LM_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json",)
"""HF files that belong to the vision part; the processor's own config belongs to neither."""
NOT_LM_FILES = {"config.json", "processor_config.json", *IMAGE_PROCESSOR_FILES}


def mcore_to_hf_parts(
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
    """Export a checkpoint as ``out_dir/vision`` (the HF vision model) and ``out_dir/lm`` (the HF
    causal LM with the tokenizer); arguments as :func:`.mcore_to_hf.mcore_to_hf`.

    Returns:
        ``out_dir``.
    """
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    check_output(out_dir, force, (ckpt_dir,))  # fail before any work
    src = ExportSource.open(ckpt_dir, iteration, dtype)
    with atomic_output(out_dir, force, inputs=(ckpt_dir,)) as tmp, single_rank():
        export_parts(src, tmp, max_shard_size=max_shard_size, progress=progress, log=log)
    return out_dir


def export_parts(
    src: ExportSource, out_dir: Path, *, max_shard_size: int, progress: bool, log=print
) -> None:
    """Write ``out_dir/vision`` and ``out_dir/lm`` (see the module docstring); single rank."""
    recorded = src.source.get("part_configs")  # convert assemble keeps the parts' own configs
    if recorded:
        dtype = dtype_name(src.override) if src.override is not None else src.default_dtype
        llava, generated = (
            {"vision_config": recorded["vision"], "text_config": recorded["text"]},
            False,
        )
        llava["dtype"] = dtype
    else:
        config_text, generated = src.config_json(log)
        llava = json.loads(config_text)
    vision_cfg, lm_cfg = _part_configs(src, llava)
    vision_naming = VisionPartNaming(src.source.get("vision_key_prefix", ""))
    lm_naming = LMPartNaming()

    def route(key: str):
        if key.startswith("model.vision_tower."):
            return "vision", vision_naming.to_file(key)
        if key.startswith("model.language_model.") or key.startswith("lm_head."):
            return "lm", lm_naming.to_file(key)
        return None  # the projector

    synthetic = _synthetic_tensors(src.cfg) if generated else {}
    export_tensors(
        src,
        out_dir,
        route,
        parts=("lm", "vision"),
        synthetic=synthetic,
        max_shard_size=max_shard_size,
        progress=progress,
    )
    for sub, cfg in (("vision", vision_cfg), ("lm", lm_cfg)):
        (out_dir / sub / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    copy_files(src.hf_files, out_dir / "vision", lambda n: n in IMAGE_PROCESSOR_FILES)
    copy_files(src.hf_files, out_dir / "lm", lambda n: n not in NOT_LM_FILES)


def _part_configs(src: ExportSource, llava: dict) -> tuple[dict, dict]:
    """(vision config dict, causal-LM config dict) from a LLaVA config dict."""
    cfg = src.cfg
    dtype = llava.get("dtype") or llava.get("torch_dtype") or src.default_dtype
    vision = dict(llava["vision_config"])
    style_class = VISION_CLASSES[cfg.vision.style]
    vision["architectures"] = [VISION_CLASS_OF_TYPE.get(vision.get("model_type"), style_class)]
    vision["dtype"] = dtype
    text = dict(llava["text_config"])
    flavor = text.get("model_type", cfg.lm.flavor)
    text["architectures"] = [LM_CLASSES.get(flavor, LM_CLASSES["llama"])]
    text["tie_word_embeddings"] = cfg.lm.tie_embeddings
    text["vocab_size"] = cfg.lm.vocab_size
    text["dtype"] = dtype
    for d in (vision, text):
        d.pop("torch_dtype", None)
    return vision, text
