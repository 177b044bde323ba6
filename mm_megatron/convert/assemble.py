"""``convert assemble``: an mm_megatron LLaVA checkpoint from an HF vision tower, an HF LM and a
freshly initialised projector (the starting point of stage-1 pretraining).

Inputs:

* ``--vision``: a ``CLIPVisionModel``, ``CLIPModel`` (its vision half), ``SiglipVisionModel``,
  ``SiglipModel``, ``Blip2VisionModel`` / ``InstructBlipVisionModel`` or a BLIP-2 / InstructBLIP
  model (its ``vision_model.`` half: ``vision.style="blip2"``, read at ``last_hidden_state``, the
  class token kept, as BLIP-2 feeds its Q-Former; :mod:`.blip2_vision`).
* ``--lm``: a ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM`` checkpoint
  with its tokenizer, single-file or sharded.

It is the ``hf-to-mcore`` mapping fed from two sources: each part's keys are renamed onto the
canonical LLaVA keys (:mod:`mm_megatron.convert.keys`), the same rules (:mod:`.mapping`) build the
megatron parameters, and the same streaming writer, atomic output and ``--force`` apply. What is
new here:

* **Tokenizer.** The LM's tokenizer gets the image placeholder (``--image-token``) and, where it
  has none, a ``<pad>`` token, both as special tokens. The vocabulary becomes
  ``max(config vocab_size, len(tokenizer))``; embedding (and untied output) rows past the LM's
  own are initialised to the mean of its existing rows. An added token whose id falls inside the
  LM's table (Qwen2 keeps spare rows) keeps that row. Megatron's vocab padding follows as usual.
* **Projector.** Built by our own projector code (any registered type) and initialised with
  ``seed`` as a training run would; checked to map the vision width to the LM width.
* **Output.** The dist checkpoint (loadable at any TP/PP/CP), the run config (stage 1 freezing:
  vision and LM frozen, projector trained), and ``hf_files/``: the tokenizer with the added
  tokens, the image processor (the vision checkpoint's, else one made for its resolution), a
  ``LlavaProcessor`` config and, for ``mlp2x_gelu``, a LLaVA ``config.json``, so ``mcore-to-hf``
  exports it as ``LlavaForConditionalGeneration`` or (``--parts``) as the two parts again.

Bad input gets one line naming the file and field: a part of the wrong kind, a model the parts'
config describes that we cannot build, a width the projector cannot bridge, a vision/LM dtype
clash without ``--dtype``, widths that differ from ``--preset``.

Not here: the verification against transformers (:mod:`.verify_parts`), the export (:mod:`.
mcore_to_hf`, :mod:`.export_parts`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import torch

from mm_megatron.checkpoint import model_io
from mm_megatron.checkpoint.errors import ConversionError, UnsupportedModelError
from mm_megatron.config.model_config import LlavaConfig, ProjectorConfig
from mm_megatron.config.vit_styles import vit_style
from mm_megatron.convert.blip2_vision import blip2_vision_config_to_ours
from mm_megatron.convert.common import (
    HFCheckpoint,
    atomic_output,
    check_output,
    dtype_name,
    parse_dtype,
    single_rank,
)
from mm_megatron.convert.hf_config import VISION_TYPES, text_config_to_ours, vision_config_to_ours
from mm_megatron.convert.hf_to_mcore import (
    choose_dtype,
    dtype_record,
    plan_import,
    write_passthrough,
    write_weights,
)
from mm_megatron.convert.keys import KeySpelling, LMPartNaming, VisionPartNaming
from mm_megatron.convert.parts import (
    UNNESTED_VISION,
    Part,
    image_processor_for,
    read_lm_part,
    read_vision_part,
    tokenizer_with_placeholders,
)
from mm_megatron.convert.qformer import init_qformer, use_hf_qformer
from mm_megatron.model.image_tokens import image_token_count

SOURCE_KIND = "hf-parts"
STYLE_OF_TYPE = {
    "clip_vision_model": "clip",
    "siglip_vision_model": "siglip",
    "blip_2_vision_model": "blip2",
    "instructblip_vision_model": "blip2",
}
"""HF vision config ``model_type`` -> our ``vision.style``."""
DEFAULT_FEATURE_LAYER = {"clip": -2, "siglip": -1, "blip2": -1}
"""LLaVA-1.5 reads CLIP's second-to-last layer; SigLIP towers are usually read at the last;
BLIP-2 reads ``last_hidden_state`` (the last layer, post-LayerNorm)."""
DROP_CLASS_TOKEN = {"clip": True, "siglip": False, "blip2": False}
"""Without a preset: LLaVA drops CLIP's class token; BLIP-2's Q-Former sees all 257 tokens."""
CONFIG_READERS = {"blip2": blip2_vision_config_to_ours}
"""Styles whose HF vision config is not read by ``hf_config.vision_config_to_ours``."""
EMBED = "model.language_model.embed_tokens.weight"
HEAD = "lm_head.weight"

# --- config -----------------------------------------------------------------------------------


def parts_config(
    vision: Part,
    lm: Part,
    *,
    vocab_size: int,
    image_token_id: int,
    projector: str | None = None,
    feature_layer: int | list[int] | None = None,
    spec: str = "local",
    preset: str | None = None,
    make_vocab_size_divisible_by: int | None = None,
) -> tuple[LlavaConfig, list[str]]:
    """Our model config for the two parts (+ notes).

    With ``preset``: projector, feature layer and init come from it, its widths must match the
    parts', and the vocabulary is at least the preset's (llava-1.5's 32064 rows), so a training
    job naming the preset builds exactly this model.
    """
    from mm_megatron.config import get_preset

    base = get_preset(preset) if preset else None
    mtype = vision.config.model_type
    style = STYLE_OF_TYPE[mtype]
    if feature_layer is None:
        feature_layer = base.vision.feature_layer if base else DEFAULT_FEATURE_LAYER[style]
    layers = vision.config.num_hidden_layers
    chosen = feature_layer if isinstance(feature_layer, list) else [feature_layer]
    bad = [x for x in chosen if not isinstance(x, int) or not -layers <= x <= layers or not x]
    if bad or not chosen:
        raise UnsupportedModelError(
            f"--vision-feature-layer {feature_layer}: {vision.where}num_hidden_layers={layers} "
            f"allows 1..{layers} or -{layers}..-1"
        )
    drop_cls = vit_style(style).class_token and (
        base.vision.drop_class_token if base else DROP_CLASS_TOKEN[style]
    )
    v = CONFIG_READERS.get(style, vision_config_to_ours)(
        vision.config, feature_layer, "default" if drop_cls else "full", where=vision.where
    )
    multiple = make_vocab_size_divisible_by or (
        base.lm.make_vocab_size_divisible_by if base else 64
    )
    text, notes = text_config_to_ours(lm.config, multiple, where=lm.where)
    text.vocab_size = max(vocab_size, base.lm.vocab_size if base else 0)  # keep a preset's rows
    if base and image_token_id != base.image_token_id:
        notes.append(
            f"the tokenizer's image token id is {image_token_id}, preset {preset!r} says "
            f"{base.image_token_id}: a job naming the preset needs --model.image_token_id="
            f"{image_token_id} --model.lm.vocab_size={text.vocab_size}"
        )
    proj = copy.deepcopy(base.projector) if base else ProjectorConfig()
    proj.type = projector or proj.type
    from mm_megatron.model.projector import PROJECTORS

    if proj.type not in PROJECTORS:
        raise UnsupportedModelError(
            f"--projector {proj.type!r} is not registered; known: {', '.join(sorted(PROJECTORS))}"
        )
    cfg = LlavaConfig(vision=v, projector=proj, lm=text, image_token_id=image_token_id)
    cfg.freeze_vision, cfg.freeze_projector, cfg.freeze_lm = True, False, True  # stage 1
    if base:
        _check_preset(cfg, base, preset, vision, lm)
        cfg.init_method_std = base.init_method_std
        cfg.tiling = copy.deepcopy(base.tiling)  # e.g. MiniCPM-V's slices
    cfg.set_spec(spec)
    try:
        cfg.validate()
    except ValueError as e:
        raise UnsupportedModelError(f"the parts make an invalid model config: {e}") from None
    return cfg, notes


_HF_FIELDS = {  # our field -> the HF config field it comes from (for messages)
    "image_size": "image_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads",
    "layernorm_eps": "layer_norm_eps",
    "norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_parameters",
    "tie_embeddings": "tie_word_embeddings",
}
_NOT_COMPARED = {"spec", "flavor", "make_vocab_size_divisible_by", "vocab_size"}


def _check_preset(cfg: LlavaConfig, base: LlavaConfig, preset: str, vision: Part, lm: Part):
    """Every architecture field of the parts must equal the preset's (vocab aside)."""
    for ours, theirs, part, name in (
        (cfg.vision, base.vision, vision, "vision"),
        (cfg.lm, base.lm, lm, "lm"),
    ):
        for f in dataclasses.fields(ours):
            if f.name in _NOT_COMPARED:
                continue
            got, want = getattr(ours, f.name), getattr(theirs, f.name)
            if f.name in ("num_query_groups", "post_layernorm"):  # None means a default
                prop = "kv_groups" if name == "lm" else "apply_post_layernorm"
                got, want = getattr(ours, prop), getattr(theirs, prop)
            if got != want:
                field = _HF_FIELDS.get(f.name)
                src = f"{part.where}{field}={got}" if field else f"{name}.{f.name}={got} (parts)"
                raise ConversionError(f"{src}, but preset {preset!r} has {name}.{f.name}={want}")


def llava_config_json(cfg: LlavaConfig, vision: Part, lm: Part, dtype: str) -> dict | None:
    """A transformers ``LlavaConfig`` dict of the assembled model; None unless ``mlp2x_gelu``
    (the only projector HF LLaVA has) on a CLIP/SigLIP tower (the towers HF LLaVA builds)."""
    from transformers import LlavaConfig as HFLlavaConfig

    if cfg.projector.type != "mlp2x_gelu" or vision.config.model_type not in VISION_TYPES:
        return None
    text = copy.deepcopy(lm.config)
    text.vocab_size = cfg.lm.vocab_size
    v = cfg.vision
    hf = HFLlavaConfig(
        vision_config=copy.deepcopy(vision.config),
        text_config=text,
        image_token_index=cfg.image_token_id,
        image_seq_length=image_token_count(cfg),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if v.drop_class_token else "full",
        vision_feature_layer=v.feature_layer,
        multimodal_projector_bias=cfg.projector.bias,
        tie_word_embeddings=cfg.lm.tie_embeddings,
    )
    hf.architectures = ["LlavaForConditionalGeneration"]
    d = hf.to_dict()
    d["dtype"] = dtype
    return d


# --- tensors ----------------------------------------------------------------------------------


class AssembledSource:
    """The two parts' tensors under canonical LLaVA keys, vocab rows added (read on demand).

    Offers what :func:`~mm_megatron.convert.hf_to_mcore.plan_import` and ``write_weights`` use:
    ``infos`` (shapes after the resize), ``read``, ``describe`` and ``where``.
    """

    def __init__(self, vision: HFCheckpoint, lm: HFCheckpoint, old_vocab: int, new_vocab: int):
        self._vision, self._lm = vision, lm
        self.parts = {k: vision for k in vision.infos}
        self.parts.update({k: lm for k in lm.infos})
        self.infos = {k: p.infos[k] for k, p in self.parts.items()}
        self.old_vocab, self.new_vocab = old_vocab, new_vocab
        self.resized: set[str] = set()
        for key in (EMBED, HEAD):
            if key not in self.infos:
                continue
            info = self.infos[key]
            if info.shape[0] != old_vocab:
                raise ConversionError(
                    f"tensor {lm.describe(key)} of {lm.dir} has {info.shape[0]} rows, but its "
                    f"config.json vocab_size={old_vocab}"
                )
            if new_vocab > old_vocab:
                self.infos[key] = dataclasses.replace(info, shape=(new_vocab, *info.shape[1:]))
                self.resized.add(key)

    def read(self, key: str) -> torch.Tensor:
        """Tensor by canonical key; resized vocab tensors get mean-initialised new rows."""
        t = self.parts[key].read(key)
        if key in self.resized:
            mean = t.float().mean(dim=0, keepdim=True).to(t.dtype)  # [1, h]
            t = torch.cat([t, mean.expand(self.new_vocab - self.old_vocab, -1)], dim=0)
        return t

    def describe(self, key: str) -> str:
        """``'stored key' in file.safetensors of DIR`` for messages."""
        part = self.parts[key]
        return f"{part.describe(key)} of {part.dir}"

    def where(self, key: str) -> str:
        """Where an absent canonical key would be, for messages."""
        part = self._vision if key.startswith("model.vision_tower.") else self._lm
        return part.where(key)


def fresh_projector(cfg: LlavaConfig, seed: int) -> dict[str, torch.Tensor]:
    """``{parameter name: tensor}`` of a newly initialised projector (TP1, fp32).

    Needs megatron's parallel state (:func:`~mm_megatron.convert.common.single_rank`).

    Raises:
        ConversionError: the projector does not map the vision width to the LM width.
    """
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mm_megatron.config.parallel_config import ParallelConfig
    from mm_megatron.model.projector import build_projector
    from mm_megatron.model.transformer_configs import projector_transformer_config

    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    config = projector_transformer_config(cfg, ParallelConfig(), torch.float32)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    hv, h = cfg.vision.feature_width, cfg.lm.hidden_size
    proj = build_projector(config, cfg.projector, hv, pgs)
    tokens = cfg.vision.num_output_tokens
    with torch.no_grad():
        width = proj(torch.zeros(1, tokens, hv)).shape[-1]  # [N, T, h_v] -> [N, T', h_lm]
    if width != h:
        raise ConversionError(
            f"projector {cfg.projector.type!r} maps the vision width {hv} to {width}, but the "
            f"LM's hidden_size is {h}"
        )
    return {"vision_projection." + n: p.detach() for n, p in proj.named_parameters()}


def _store_dtype(src, rules, vision_part: Part, lm_part: Part, requested):
    if requested is not None:
        return requested
    vr = [r for r in rules if r.param.startswith("vision_model.")]
    lr = [r for r in rules if not r.param.startswith("vision_model.")]
    vd, ld = choose_dtype(src, vr, None), choose_dtype(src, lr, None)
    if vd != ld:
        raise ConversionError(
            f"vision/LM dtype clash: {vision_part.dir}/config.json {vision_part.dtype_field} "
            f"(tensors {dtype_name(vd)}) vs {lm_part.dir}/config.json {lm_part.dtype_field} "
            f"(tensors {dtype_name(ld)}); pass --dtype bf16|fp32 to store both in one"
        )
    return vd


# --- the command ------------------------------------------------------------------------------


def assemble(
    vision_dir: Path,
    lm_dir: Path,
    out_dir: Path,
    *,
    projector: str | None = None,
    feature_layer: int | list[int] | None = None,
    image_token: str = "<image>",
    spec: str = "local",
    dtype: str | torch.dtype | None = None,
    preset: str | None = None,
    seed: int = 1234,
    force: bool = False,
    make_vocab_size_divisible_by: int | None = None,
    qformer_from: Path | None = None,
    progress: bool = True,
    log=print,
) -> Path:
    """Assemble a LLaVA checkpoint from a vision checkpoint and a causal-LM checkpoint.

    Args:
        vision_dir: CLIP/SigLIP/BLIP-2 vision (or CLIP/SigLIP/BLIP-2/InstructBLIP) checkpoint
            directory.
        lm_dir: Llama/Mistral/Qwen2 causal-LM checkpoint directory with its tokenizer.
        out_dir: output checkpoint directory (must not exist unless ``force``).
        projector: projector type (default ``mlp2x_gelu``, or the preset's).
        feature_layer: HF ``vision_feature_layer``: a layer, or a list of layers whose features
            are concatenated (default -2 for CLIP, -1 for SigLIP, or the preset's).
        image_token: the image placeholder text.
        spec: ``local`` or ``te``, recorded for training.
        dtype: storage dtype; default the parts' own (they must agree).
        preset: take projector, freezing and init from this preset (widths must match).
        seed: projector init seed.
        force: replace an existing ``out_dir``.
        make_vocab_size_divisible_by: megatron vocab padding multiple (x TP); default the
            preset's, else 64.
        qformer_from: a BLIP-2 / InstructBLIP checkpoint whose Q-Former (+ query tokens, +
            language projection when the widths match) becomes the ``qformer`` projector.
        progress: show a tqdm bar.
        log: where to print one-line notes.

    Returns:
        ``out_dir``.
    """
    vision_dir, lm_dir, out_dir = Path(vision_dir), Path(lm_dir), Path(out_dir)
    inputs = (vision_dir, lm_dir) + ((Path(qformer_from),) if qformer_from else ())
    check_output(out_dir, force, inputs)  # fail before any work
    requested = dtype if isinstance(dtype, torch.dtype) or dtype is None else parse_dtype(dtype)
    vision, lm = read_vision_part(vision_dir), read_lm_part(lm_dir)
    tokenizer, info, added = tokenizer_with_placeholders(lm, image_token)
    old_vocab = int(lm.config.vocab_size)
    cfg, notes = parts_config(
        vision,
        lm,
        vocab_size=max(old_vocab, len(tokenizer)),
        image_token_id=info.image_token_id,
        projector=projector,
        feature_layer=feature_layer,
        spec=spec,
        preset=preset,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )
    qformer = use_hf_qformer(cfg, qformer_from) if qformer_from else None
    for note in notes:
        log(f"note: {note}")
    vision_ck = HFCheckpoint(vision_dir, lambda k: VisionPartNaming.detect(k, vision.composite))
    lm_ck = HFCheckpoint(lm_dir, lambda k: LMPartNaming())
    src = AssembledSource(vision_ck, lm_ck, old_vocab, cfg.lm.vocab_size)
    config_files = f"{vision_dir}/config.json and {lm_dir}/config.json"
    rules, passthrough = plan_import(src, cfg, ("lm", "vision"), config=config_files)
    if cfg.lm.tie_embeddings:  # an old save's copy of the tied head: it would miss the new rows
        passthrough = [k for k in passthrough if k != HEAD]
    store_dtype = _store_dtype(src, rules, vision, lm, requested)
    spelling = KeySpelling()  # the LLaVA spelling passthrough keys and dtypes are recorded in
    source = {
        "kind": SOURCE_KIND,
        "vision_dir": str(vision_dir.absolute()),
        "lm_dir": str(lm_dir.absolute()),
        **_provenance(vision, lm, vision_ck, cfg),
        "key_spelling": spelling.to_dict(),
        "dtype": dtype_name(store_dtype),
        **dtype_record(src, rules, spelling.to_file),
        "passthrough": [spelling.to_file(k) for k in passthrough],
        "original_vocab_size": old_vocab,
        "added_tokens": added,
        "projector_seed": seed,
        "notes": notes,
        **({"qformer_from": str(Path(qformer_from).absolute())} if qformer_from else {}),
    }
    if vision_ck.dropped:
        log(f"note: {len(vision_ck.dropped)} tensors of {vision.cls}'s text half not used")
    with atomic_output(out_dir, force, inputs=inputs) as tmp, single_rank():
        fixed = fresh_projector(cfg, seed)
        if qformer is not None:
            fixed, qnotes = init_qformer(fixed, qformer, prefix="vision_projection.")
            for note in qnotes:
                log(f"note: {note}")
        write_weights(tmp, src, cfg, rules, store_dtype, fixed=fixed, progress=progress)
        write_passthrough(src, passthrough, tmp / model_io.PASSTHROUGH, spelling.to_file)
        _write_hf_files(tmp / model_io.HF_FILES, cfg, vision, lm, tokenizer, source)
        model_io.write_run_config(tmp, cfg, source)
        model_io.write_tracker(tmp, model_io.RELEASE)
    return out_dir


def _provenance(vision: Part, lm: Part, vision_ck: HFCheckpoint, cfg: LlavaConfig) -> dict:
    """What the parts export needs to write the parts as they came: classes, key prefix,
    configs (the LM's with the grown vocabulary)."""
    text = lm.config.to_dict()
    text["vocab_size"] = cfg.lm.vocab_size
    return {
        "vision_class": vision.cls,
        "lm_class": lm.cls,
        # BLIP-2's vision half exports as a Blip2VisionModel, which has no vision_model. level
        "vision_key_prefix": (
            "" if vision.raw.get("model_type") in UNNESTED_VISION else vision_ck.spelling.prefix
        ),
        "dropped": len(vision_ck.dropped),
        "part_configs": {"vision": vision.config.to_dict(), "text": text},
    }


def _write_hf_files(files: Path, cfg, vision: Part, lm: Part, tokenizer, source: dict) -> None:
    """Tokenizer, image processor, LlavaProcessor and LLaVA config.json into ``hf_files/``."""
    from transformers import LlavaProcessor

    files.mkdir()
    v = cfg.vision
    image_processor = image_processor_for(vision, v.image_size)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=v.patch_size,
        vision_feature_select_strategy="default" if v.drop_class_token else "full",
        image_token=tokenizer.convert_ids_to_tokens(cfg.image_token_id),
        num_additional_image_tokens=1 if v.has_class_token else 0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor.save_pretrained(str(files))
        image_processor.save_pretrained(str(files))  # on its own too, for the vision export
    if (lm.dir / "generation_config.json").is_file():
        shutil.copy2(lm.dir / "generation_config.json", files / "generation_config.json")
    doc = llava_config_json(cfg, vision, lm, source["hf_dtype"])
    if doc is not None:
        (files / "config.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
