"""The two inputs of ``convert assemble``: what kind of checkpoint each is, its config, the LM's
tokenizer with the image placeholder (and pad) added, and the vision tower's image processor.

Each reader checks the part is of the kind its flag takes (``--vision``: CLIP/SigLIP/BLIP-2
vision models, or the CLIP/SigLIP/BLIP-2/InstructBLIP models holding one; ``--lm``:
Llama/Mistral/Qwen2 causal LMs) and says so in one line naming the file otherwise.
Not here: tensors and the model config (:mod:`.assemble`).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

from mm_megatron.checkpoint.errors import ConversionError, MissingFileError, UnsupportedModelError

VISION_KINDS = {  # config.json model_type -> (class, composite model with a text half)
    "clip_vision_model": ("CLIPVisionModel", False),
    "clip": ("CLIPModel", True),
    "siglip_vision_model": ("SiglipVisionModel", False),
    "siglip": ("SiglipModel", True),
    "blip_2_vision_model": ("Blip2VisionModel", False),
    "instructblip_vision_model": ("InstructBlipVisionModel", False),
    "blip-2": ("Blip2ForConditionalGeneration", True),  # its vision_model. half
    "instructblip": ("InstructBlipForConditionalGeneration", True),
}
UNNESTED_VISION = ("blip-2", "instructblip")
"""Composites whose stand-alone vision class has no ``vision_model.`` level (BLIP-2's): their
vision half is exported without that prefix, as ``Blip2VisionModel`` keys."""
LM_KINDS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


@dataclasses.dataclass
class Part:
    """One input checkpoint: its directory, config and what kind of model it is."""

    dir: Path
    """The HF directory."""
    raw: dict[str, Any]
    """``config.json`` as stored."""
    config: Any
    """The transformers config of the part (a composite model's vision sub-config)."""
    cls: str
    """The HF class the part is (``CLIPModel``, ``Qwen2ForCausalLM``, ...)."""
    composite: bool = False
    """A CLIP/SigLIP model with a text half (dropped)."""

    @property
    def where(self) -> str:
        """How messages name the part's config: a prefix for a field name."""
        return f"{self.dir}/config.json " + ("vision_config." if self.composite else "")

    @property
    def dtype_field(self) -> str:
        """``dtype='bfloat16'`` as config.json spells it (or a note that it has none)."""
        for key in ("dtype", "torch_dtype"):
            if self.raw.get(key):
                return f"{key}={self.raw[key]!r}"
        return "(no dtype field)"


def _read_json(hf_dir: Path, flag: str) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise MissingFileError(f"{flag} {hf_dir}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UnsupportedModelError(f"{path} is not valid JSON: {e}") from None


def _hf_config(hf_dir: Path):
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
        except (ValueError, TypeError, KeyError, OSError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UnsupportedModelError(f"{hf_dir}/config.json: {msg}") from None


def _kind(raw: dict) -> str:
    archs = raw.get("architectures") or []
    return f"model_type {raw.get('model_type')!r}" + (f" ({archs[0]})" if archs else "")


def read_vision_part(hf_dir: Path) -> Part:
    """The ``--vision`` checkpoint's config; UnsupportedModelError for a part of another kind."""
    hf_dir = Path(hf_dir)
    raw = _read_json(hf_dir, "--vision")
    mtype = raw.get("model_type")
    if mtype not in VISION_KINDS:
        hint = " (a whole LLaVA: use `convert hf-to-mcore`)" if mtype == "llava" else ""
        raise UnsupportedModelError(
            f"{hf_dir}/config.json: {_kind(raw)} is not a vision tower{hint}; --vision takes "
            f"{', '.join(c for c, _ in VISION_KINDS.values())} checkpoints"
        )
    cls, composite = VISION_KINDS[mtype]
    config = _hf_config(hf_dir)
    return Part(hf_dir, raw, config.vision_config if composite else config, cls, composite)


def read_lm_part(hf_dir: Path) -> Part:
    """The ``--lm`` checkpoint's config; UnsupportedModelError for a part of another kind."""
    hf_dir = Path(hf_dir)
    raw = _read_json(hf_dir, "--lm")
    mtype, archs = raw.get("model_type"), raw.get("architectures") or []
    if mtype not in LM_KINDS or (archs and LM_KINDS[mtype] not in archs):
        hint = " (a whole LLaVA: use `convert hf-to-mcore`)" if mtype == "llava" else ""
        raise UnsupportedModelError(
            f"{hf_dir}/config.json: {_kind(raw)} is not a supported causal LM{hint}; --lm "
            f"takes {', '.join(LM_KINDS.values())} checkpoints"
        )
    return Part(hf_dir, raw, _hf_config(hf_dir), LM_KINDS[mtype])


# --- tokenizer --------------------------------------------------------------------------------


def tokenizer_with_placeholders(lm: Part, image_token: str):
    """(tokenizer, TokenizerInfo, {added token: id}): the LM's tokenizer plus image/pad tokens."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from mm_megatron.data.tokenizer import TokenizerSetupError, prepare_tokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(lm.dir), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MissingFileError(f"--lm {lm.dir}: no usable tokenizer ({msg})") from None
    before = len(tok)
    ids = tok(image_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or tok.convert_ids_to_tokens(ids[0]) != image_token:
        tok.add_tokens(
            [AddedToken(image_token, special=True, normalized=False)], special_tokens=True
        )
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    try:
        info = prepare_tokenizer(tok, image_token)
    except TokenizerSetupError as e:
        raise ConversionError(f"--lm {lm.dir} tokenizer: {e}") from None
    added = {t: tok.convert_tokens_to_ids(t) for t in (image_token, tok.pad_token)}
    added = {t: i for t, i in added.items() if i >= before}
    return tok, info, added


def image_processor_for(vision: Part, size: int):
    """The vision checkpoint's image processor, else a CLIP/SigLIP/BLIP one for ``size`` pixels."""
    import transformers

    if (vision.dir / "preprocessor_config.json").is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.AutoImageProcessor.from_pretrained(
                str(vision.dir), local_files_only=True
            )
    name = "SiglipImageProcessor" if "Siglip" in vision.cls else "CLIPImageProcessor"
    name = "BlipImageProcessor" if "Blip" in vision.cls else name  # resize, no crop
    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name)
    if not name.startswith("CLIP"):
        return cls(size={"height": size, "width": size})
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
