"""HF ``LlavaConfig`` <-> our :class:`~mm_megatron.config.model_config.LlavaConfig`, in one place.

Supported: ``LlavaForConditionalGeneration`` with a CLIP or SigLIP vision tower, a two-layer MLP
projector (``projector_hidden_act`` one of ``PROJECTOR_ACTIVATIONS``: gelu, its tanh forms,
quick_gelu, silu, relu) and a Llama / Vicuna / Mistral / Qwen2 language model
(GQA, Qwen2's qkv bias, RoPE theta, ``linear`` and megatron-compatible ``llama3`` RoPE scaling,
tied or untied embeddings). Everything else raises :class:`UnsupportedModelError` naming the field,
e.g. ``yarn`` RoPE scaling, an activation outside that list, Llama's
``attention_bias`` (bias on o_proj too) or ``mlp_bias``.

Other HF families register in ``HF_FAMILIES`` from their own module (``convert/internvl.py``:
``InternVLForConditionalGeneration``); this file dispatches on ``model_type``.

Semantics that matter for exactness (read from transformers 5.23):

* ``vision_feature_layer`` indexes ``hidden_states`` of the vision tower, where index 0 is the
  embeddings (after CLIP's ``pre_layrnorm``) and index k the output of layer k; the tower's
  ``post_layernorm`` is never applied. So we build ``num_layers + 1 + feature_layer`` layers
  (negative) or ``feature_layer`` layers (positive) and no post-LayerNorm. A list of layers
  builds up to the deepest and concatenates their outputs (``torch.cat(..., dim=-1)``) before
  the projector, whose ``linear_1`` then takes ``len(list) * hidden_size`` inputs.
* ``vision_feature_select_strategy="default"`` drops the first token (``[:, 1:]``), ``"full"``
  keeps all. SigLIP has no class token, so "default" would drop a real patch: unsupported.
* ``tie_word_embeddings`` is read from the top-level config (transformers forwards the text
  config's flag to it).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm_megatron.checkpoint.errors import MissingFileError, UnsupportedModelError
from mm_megatron.config.model_config import (
    PROJECTOR_ACTIVATIONS,
    LanguageConfig,
    LlavaConfig,
    ProjectorConfig,
    VisionConfig,
)
from mm_megatron.model.image_tokens import image_token_count


@dataclass(frozen=True)
class HFFamily:
    """An HF multimodal architecture the converter reads (``HF_FAMILIES[model_type]``)."""

    architecture: str
    """``architectures[0]`` of its config.json."""
    config_class: str
    """Its transformers config class name."""
    from_hf: Callable | None = None
    """``(hf_cfg, spec=, make_vocab_size_divisible_by=) -> (LlavaConfig, notes)``; None: LLaVA."""
    exports: Callable | None = None
    """``cfg -> bool``: this family writes the config.json of ``cfg`` (trained here)."""
    to_hf: Callable | None = None
    """``(cfg, dtype) -> config.json dict`` for a model trained here."""
    tiling: Callable | None = None
    """LLaVA-like families (no ``from_hf``): ``hf_cfg -> TilingConfig`` (LLaVA-NeXT's anyres)."""
    verify_inputs: Callable | None = None
    """``(hf_cfg, cfg, seed=) -> {"ours", "hf", "lengths"}``: ``convert verify``'s batch for
    tiled images (None: ``verify_inputs.make_verify_inputs``, one tile per image)."""
    build_processor: Callable | None = None
    """``(cfg, job, tokenizer_dir) -> processor`` for the export of a run trained here
    (``processor_files.complete_export``); None: LLaVA's ``LlavaProcessor``."""


HF_FAMILIES: dict[str, HFFamily] = {
    "llava": HFFamily("LlavaForConditionalGeneration", "LlavaConfig"),
}
"""HF ``model_type`` -> family; other families register in their own module."""

TEXT_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
_VISION_ACT = {"clip": ("quick_gelu",), "siglip": ("gelu_pytorch_tanh", "gelu_tanh")}


def register_hf_family(model_type: str, family: HFFamily) -> None:
    """Add a family of LLaVA-like HF checkpoints under its ``model_type``."""
    if model_type in HF_FAMILIES:
        raise ValueError(f"HF family {model_type!r} registered twice")
    HF_FAMILIES[model_type] = family


def read_config_json(hf_dir: Path) -> dict[str, Any]:
    """``config.json`` of an HF checkpoint directory, checked to be a LLaVA one."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist (is {hf_dir} a HuggingFace checkpoint?)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UnsupportedModelError(f"{path} is not valid JSON: {e}") from None
    archs = raw.get("architectures") or []
    mtype = raw.get("model_type")
    family = HF_FAMILIES.get(mtype)
    if family is None or (archs and family.architecture not in archs):
        what = archs[0] if archs else f"model_type {mtype!r}"
        known = ", ".join(f"{f.architecture} (model_type {t!r})" for t, f in HF_FAMILIES.items())
        raise UnsupportedModelError(
            f"{path}: unsupported architecture {what}; mm-megatron converts {known} checkpoints"
        )
    return raw


def load_hf_config(hf_dir: Path):
    """transformers config of ``hf_dir`` (``LlavaConfig``, ``InternVLConfig``; defaults filled)."""
    family = HF_FAMILIES[read_config_json(hf_dir)["model_type"]]
    import transformers

    family = HF_FAMILIES[read_config_json(hf_dir)["model_type"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return getattr(transformers, family.config_class).from_pretrained(str(hf_dir))
        except (ValueError, TypeError, KeyError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UnsupportedModelError(f"{hf_dir}/config.json: {msg}") from None


def _rope(tc, where: str) -> tuple[float, dict[str, Any] | None]:
    """(theta, our rope_scaling dict or None) from a text config."""
    params = dict(getattr(tc, "rope_parameters", None) or {})
    legacy = getattr(tc, "rope_scaling", None)
    if not params and legacy:
        params = dict(legacy)
    theta = float(params.get("rope_theta", getattr(tc, "rope_theta", 10000.0) or 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": float(params["factor"])}
    if kind == "llama3":
        scaling = {"rope_type": "llama3"}
        for k in (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ):
            if k in params:
                scaling[k] = params[k]
        from mm_megatron.model.transformer_configs import rope_kwargs

        try:
            rope_kwargs(LanguageConfig(rope_theta=theta, rope_scaling=scaling))
        except ValueError as e:
            raise UnsupportedModelError(f"{where}rope_parameters: {e}") from None
        return theta, scaling
    raise UnsupportedModelError(
        f"{where}rope_parameters.rope_type={kind!r} is unsupported: "
        "megatron-core's GPTModel implements plain, 'linear' and 'llama3' RoPE only"
    )


def text_config_to_ours(
    tc, make_vocab_size_divisible_by: int = 64, where: str = "config.json text_config."
) -> tuple[LanguageConfig, list[str]]:
    """A transformers Llama/Mistral/Qwen2 config -> our LanguageConfig (+ notes).

    Args:
        tc: the text config.
        make_vocab_size_divisible_by: megatron's vocab padding multiple.
        where: how messages name the config: a prefix for a field name (file and section).
    """
    notes: list[str] = []
    mtype = getattr(tc, "model_type", None)
    if mtype not in TEXT_TYPES:
        raise UnsupportedModelError(
            f"{where}model_type={mtype!r} is unsupported (supported: {', '.join(TEXT_TYPES)})"
        )
    if tc.hidden_act != "silu":
        raise UnsupportedModelError(
            f"{where}hidden_act={tc.hidden_act!r}: only SwiGLU ('silu') LMs"
        )
    if getattr(tc, "mlp_bias", False):
        raise UnsupportedModelError(f"{where}mlp_bias=true is unsupported")
    if getattr(tc, "attention_bias", False):
        raise UnsupportedModelError(
            f"{where}attention_bias=true (bias on q/k/v/o) is unsupported; "
            "only Qwen2-style q/k/v bias is"
        )
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None)
    if head_dim not in (None, tc.hidden_size // heads):
        raise UnsupportedModelError(
            f"{where}head_dim={head_dim} != hidden_size/num_attention_heads="
            f"{tc.hidden_size // heads}: unsupported"
        )
    if float(getattr(tc, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise UnsupportedModelError(f"{where}partial_rotary_factor != 1")
    window = getattr(tc, "sliding_window", None)
    uses_window = getattr(tc, "use_sliding_window", mtype == "mistral")
    if uses_window and window is not None and window < tc.max_position_embeddings:
        notes.append(
            f"text_config.sliding_window={window} is not implemented (full causal attention); "
            f"outputs are exact for sequences up to {window} tokens"
        )
    theta, scaling = _rope(tc, where)
    lm = LanguageConfig(
        flavor=TEXT_TYPES[mtype],
        num_layers=tc.num_hidden_layers,
        hidden_size=tc.hidden_size,
        ffn_hidden_size=tc.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=getattr(tc, "num_key_value_heads", None) or heads,
        vocab_size=tc.vocab_size,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        max_position_embeddings=tc.max_position_embeddings,
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=mtype == "qwen2",
        norm_eps=float(tc.rms_norm_eps),
        tie_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
    )
    return lm, notes


def vision_config_to_ours(
    vc, feature_layer, strategy: str, where: str = "config.json vision_config."
) -> VisionConfig:
    """A transformers CLIP/SigLIP vision config + LLaVA's feature choice -> our VisionConfig.

    Args:
        vc: the vision config.
        feature_layer: HF ``vision_feature_layer``.
        strategy: HF ``vision_feature_select_strategy`` (``default`` drops the class token).
        where: how messages name the config: a prefix for a field name (file and section).
    """
    mtype = getattr(vc, "model_type", None)
    if mtype not in VISION_TYPES:
        raise UnsupportedModelError(
            f"{where}model_type={mtype!r} is unsupported (supported: {', '.join(VISION_TYPES)})"
        )
    style = VISION_TYPES[mtype]
    if vc.hidden_act not in _VISION_ACT[style]:
        raise UnsupportedModelError(
            f"{where}hidden_act={vc.hidden_act!r} unsupported for {mtype} "
            f"(expected {_VISION_ACT[style][0]!r})"
        )
    if isinstance(feature_layer, (list, tuple)):
        feature_layer = list(feature_layer)
    if not feature_layer or not all(isinstance(x, int) for x in _as_list(feature_layer)):
        raise UnsupportedModelError(
            f"config.json vision_feature_layer={feature_layer!r}: expected an integer or a "
            "non-empty list of integers"
        )
    if strategy not in ("default", "full"):
        raise UnsupportedModelError(
            f"config.json vision_feature_select_strategy={strategy!r} (expected default|full)"
        )
    if style == "siglip" and strategy == "default":
        raise UnsupportedModelError(
            "config.json: vision_feature_select_strategy='default' with a SigLIP tower drops a "
            "patch token in transformers (SigLIP has no class token); unsupported, use 'full'"
        )
    v = VisionConfig(
        style=style,
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        num_channels=vc.num_channels,
        num_layers=vc.num_hidden_layers,
        feature_layer=feature_layer,
        hidden_size=vc.hidden_size,
        ffn_hidden_size=vc.intermediate_size,
        num_attention_heads=vc.num_attention_heads,
        layernorm_eps=float(vc.layer_norm_eps),
        drop_class_token=strategy == "default",
        post_layernorm=False,  # HF LLaVA reads hidden_states, before post_layernorm
    )
    if not 1 <= v.num_layers_built <= v.num_layers or min(v.feature_layers) < 0:
        raise UnsupportedModelError(
            f"config.json vision_feature_layer={feature_layer} selects no encoder layer of "
            f"{v.num_layers}"
        )
    return v


def _as_list(feature_layer) -> list:
    return feature_layer if isinstance(feature_layer, list) else [feature_layer]


def llava_config_from_hf(
    hf_cfg, *, spec: str = "local", make_vocab_size_divisible_by: int = 64
) -> tuple[LlavaConfig, list[str]]:
    """Map a transformers ``LlavaConfig`` (or another registered family's config) to ours.

    Returns:
        (config, notes): notes are one-line warnings about approximations (e.g. sliding window).
    """
    family = HF_FAMILIES.get(getattr(hf_cfg, "model_type", "llava"))
    if family is not None and family.from_hf is not None:
        return family.from_hf(
            hf_cfg, spec=spec, make_vocab_size_divisible_by=make_vocab_size_divisible_by
        )
    act = hf_cfg.projector_hidden_act
    if act not in PROJECTOR_ACTIVATIONS:
        raise UnsupportedModelError(
            f"config.json projector_hidden_act={act!r}: supported are {PROJECTOR_ACTIVATIONS}"
        )
    lm, notes = text_config_to_ours(hf_cfg.text_config, make_vocab_size_divisible_by)
    lm.tie_embeddings = bool(getattr(hf_cfg, "tie_word_embeddings", False))
    vision = vision_config_to_ours(
        hf_cfg.vision_config, hf_cfg.vision_feature_layer, hf_cfg.vision_feature_select_strategy
    )
    cfg = LlavaConfig(
        vision=vision,
        projector=ProjectorConfig(
            type="mlp2x_gelu",
            bias=bool(getattr(hf_cfg, "multimodal_projector_bias", True)),
            activation=act,
        ),
        lm=lm,
        image_token_id=int(hf_cfg.image_token_index),
    )
    family = HF_FAMILIES.get(getattr(hf_cfg, "model_type", "llava"), HF_FAMILIES["llava"])
    if family.tiling is not None:  # LLaVA-NeXT / OneVision: LLaVA + anyres settings
        cfg.tiling = family.tiling(hf_cfg)
    cfg.set_spec(spec)
    try:
        cfg.validate()
    except ValueError as e:
        raise UnsupportedModelError(f"config.json maps to an invalid model config: {e}") from None
    seq = getattr(hf_cfg, "image_seq_length", None)
    if seq is not None and family.tiling is None and int(seq) != image_token_count(cfg):
        notes.append(
            f"image_seq_length={seq} but the vision config yields {image_token_count(cfg)} "
            "image tokens per image"
        )
    return cfg, notes


def architecture_dict(cfg: LlavaConfig) -> dict[str, Any]:
    """The fields of a config that define the weights and outputs (no spec, freezing, init)."""
    d = cfg.to_dict()
    for part in ("vision", "projector", "lm"):
        d[part].pop("spec", None)
    d["lm"].pop("make_vocab_size_divisible_by", None)
    d["lm"].pop("flavor", None)
    for k in ("freeze_vision", "freeze_projector", "freeze_lm", "init_method_std"):
        d.pop(k, None)
    return d


def hf_config_from_llava(cfg: LlavaConfig, dtype: str = "float32") -> dict[str, Any]:
    """A transformers ``LlavaConfig`` dict for a model that has no HF original (trained here).

    The vision tower gets exactly the layers we built and ``vision_feature_layer=-1`` (the same
    features as ours, with no missing weights).

    Raises:
        UnsupportedModelError: projector types or options HF LLaVA cannot express.
    """
    from transformers import LlavaConfig as HFLlavaConfig

    for family in HF_FAMILIES.values():
        if family.exports is not None and family.exports(cfg):
            return family.to_hf(cfg, dtype)
    if cfg.projector.type != "mlp2x_gelu":
        raise UnsupportedModelError(
            f"projector.type={cfg.projector.type!r} has no HF LlavaForConditionalGeneration "
            "equivalent (only mlp2x_gelu)"
        )
    v, lm = cfg.vision, cfg.lm
    strategy = "default" if v.has_class_token and v.drop_class_token else "full"
    hf = HFLlavaConfig(
        vision_config=vision_hf_config(cfg),
        text_config=text_hf_config(cfg),
        image_token_index=cfg.image_token_id,
        image_seq_length=image_token_count(cfg),
        projector_hidden_act=cfg.projector.activation,
        vision_feature_select_strategy=strategy,
        # the tower has exactly the layers we built: the last one, or the listed ones by index
        vision_feature_layer=list(v.feature_layers) if isinstance(v.feature_layer, list) else -1,
        multimodal_projector_bias=cfg.projector.bias,
        tie_word_embeddings=lm.tie_embeddings,
    )
    hf.architectures = ["LlavaForConditionalGeneration"]
    d = hf.to_dict()
    d["dtype"] = dtype
    return d


def vision_hf_config(cfg: LlavaConfig):
    """A CLIP/SigLIP vision config with exactly the layers we built (no HF original needed)."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    v = cfg.vision
    if v.style not in ("clip", "siglip"):
        raise UnsupportedModelError(f"vision.style={v.style!r} has no HF LLaVA vision tower")
    if v.apply_post_layernorm:
        raise UnsupportedModelError("vision.post_layernorm=True has no HF LLaVA equivalent")
    vkw = dict(
        hidden_size=v.hidden_size,
        intermediate_size=v.ffn_hidden_size,
        num_hidden_layers=v.num_layers_built,
        num_attention_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=v.num_channels,
        layer_norm_eps=v.layernorm_eps,
    )
    if v.style == "clip":
        return CLIPVisionConfig(hidden_act="quick_gelu", **vkw)
    return SiglipVisionConfig(hidden_act="gelu_pytorch_tanh", vision_use_head=False, **vkw)


def text_hf_config(cfg: LlavaConfig):
    """The Llama / Mistral / Qwen2 config of our language model (qkv bias -> Qwen2)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    lm = cfg.lm
    rope = {"rope_type": "default", "rope_theta": lm.rope_theta}
    if lm.rope_scaling:
        rope = dict(lm.rope_scaling, rope_theta=lm.rope_theta)
        rope["rope_type"] = rope.pop("type", rope.get("rope_type"))
    tkw = dict(
        hidden_size=lm.hidden_size,
        intermediate_size=lm.ffn_hidden_size,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_attention_heads,
        num_key_value_heads=lm.kv_groups,
        vocab_size=lm.vocab_size,
        max_position_embeddings=lm.max_position_embeddings,
        rms_norm_eps=lm.norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=lm.tie_embeddings,
    )
    if lm.qkv_bias:
        if lm.flavor not in ("qwen2",):
            warnings.warn("qkv_bias=True exported as a Qwen2 text config", stacklevel=2)
        return Qwen2Config(**tkw)
    if lm.flavor == "mistral":
        return MistralConfig(sliding_window=None, head_dim=lm.head_dim, **tkw)
    return LlamaConfig(head_dim=lm.head_dim, **tkw)


# Families in their own modules register on import.
from mm_megatron.convert import internvl, llava_next  # noqa: E402, F401
