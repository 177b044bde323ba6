"""HF ``InternVLForConditionalGeneration`` <-> our model: the InternViT and pixel-shuffle rules.

The language model's rules are LLaVA's (transformers' InternVL stores its Qwen2 / Llama /
InternLM2-as-Llama text model under the same ``model.language_model.`` keys). This file adds the
two parts LLaVA does not have, in :mod:`mm_megatron.convert.mapping`'s ``Rule`` form:

* InternViT (``model.vision_tower.``): ``embeddings.cls_token [1, 1, h]`` <-> ``class_token``;
  ``embeddings.position_embeddings [1, P+1, h]`` <-> ``position_embeddings.weight [P+1, h]``;
  ``patch_embeddings.projection`` <-> ``conv1``; per layer ``layernorm_before`` /
  ``layernorm_after`` <-> ``input_layernorm`` / ``pre_mlp_layernorm``, ``attention.{q,k,v}_proj``
  <-> ``linear_qkv`` (grouped, MHA), ``attention.projection_layer`` <-> ``linear_proj``,
  ``attention.{q,k}_norm`` <-> ``self_attention.{q,k}_layernorm`` (head-major, the same order),
  ``lambda_1`` / ``lambda_2`` <-> ``self_attn_bda`` / ``mlp_bda``, ``mlp.fc1/fc2``;
  the final ``layernorm`` <-> ``post_layernorm`` when it is applied.
* pixel-shuffle projector (``model.multi_modal_projector.``): ``layer_norm`` <->
  ``vision_projection.layer_norm``, ``linear_1/2`` <-> ``vision_projection.encoder.linear_fc1/2``.

What it does not do: read or write files (the shared converter does), or map the LM.
"""

from __future__ import annotations

from mm_megatron.checkpoint.errors import UnsupportedModelError
from mm_megatron.config.model_config import (
    PROJECTOR_ACTIVATIONS,
    LlavaConfig,
    ProjectorConfig,
    TilingConfig,
    VisionConfig,
)
from mm_megatron.config.presets_internvl import INTERNVL_MARKERS
from mm_megatron.convert.hf_config import HF_FAMILIES, HFFamily, text_config_to_ours
from mm_megatron.convert.mapping import (
    PROJECTOR_RULES,
    VISION_RULES,
    _identity,
    _qkv,
    batched_embedding_rules,
)
from mm_megatron.convert.processor_families import internvl_processor

HF_TOWER = "model.vision_tower."
"""Prefix of the vision tower in ``InternVLForConditionalGeneration``."""


def internvit_rules(cfg: LlavaConfig, add, tower: str = HF_TOWER) -> None:
    """Rules of the InternViT encoder (``add(param, hf_keys, hf_shapes, fns, group)``)."""
    v = cfg.vision
    h, f, nh = v.hidden_size, v.ffn_hidden_size, v.num_attention_heads
    V, T = "vision_model.", tower
    emb = "embeddings."
    batched_embedding_rules(
        v,
        add,
        T,
        emb + "cls_token",
        emb + "position_embeddings",
        emb + "patch_embeddings.projection.",
    )
    norm_ws = ("weight", "bias") if v.norm == "LayerNorm" else ("weight",)
    for i in range(v.num_layers_built):
        m, p, g = f"{V}decoder.layers.{i}.", f"{T}encoder.layer.{i}.", f"vision.layer.{i}"
        for w in norm_ws:
            add(m + f"input_layernorm.{w}", [p + f"layernorm_before.{w}"], [(h,)], _identity(), g)
            add(m + f"pre_mlp_layernorm.{w}", [p + f"layernorm_after.{w}"], [(h,)], _identity(), g)
        qkv = [p + f"attention.{x}_proj.weight" for x in "qkv"]
        add(m + "self_attention.linear_qkv.weight", qkv, [(h, h)] * 3, _qkv(nh, nh), g)
        if v.qkv_bias:
            qkv_b = [p + f"attention.{x}_proj.bias" for x in "qkv"]
            add(m + "self_attention.linear_qkv.bias", qkv_b, [(h,)] * 3, _qkv(nh, nh), g)
        for w, shape in (("weight", (h, h)), ("bias", (h,))):
            proj = [p + f"attention.projection_layer.{w}"]
            add(m + f"self_attention.linear_proj.{w}", proj, [shape], _identity(), g)
            add(
                m + f"mlp.linear_fc1.{w}",
                [p + f"mlp.fc1.{w}"],
                [(f, h)[: len(shape)]],
                _identity(),
                g,
            )
            add(
                m + f"mlp.linear_fc2.{w}",
                [p + f"mlp.fc2.{w}"],
                [(h, f)[: len(shape)]],
                _identity(),
                g,
            )
        if v.qk_norm:
            for x in "qk":
                norm = [p + f"attention.{x}_norm.weight"]
                add(m + f"self_attention.{x}_layernorm.weight", norm, [(h,)], _identity(), g)
        if v.layer_scale_init is not None:
            add(m + "self_attn_bda.weight", [p + "lambda_1"], [(h,)], _identity(), g)
            add(m + "mlp_bda.weight", [p + "lambda_2"], [(h,)], _identity(), g)
    if v.apply_post_layernorm:
        for w in ("weight", "bias"):
            add(
                V + f"post_layernorm.{w}",
                [T + f"layernorm.{w}"],
                [(h,)],
                _identity(),
                "vision.post",
            )


def pixel_shuffle_projector_rules(cfg: LlavaConfig, add) -> None:
    """Rules of the ``pixel_shuffle_mlp`` projector."""
    from mm_megatron.model.projector_pixel_shuffle import shuffle_factor

    k = shuffle_factor(cfg.projector.pixel_shuffle_ratio)
    h, hin = cfg.lm.hidden_size, cfg.vision.hidden_size * k * k
    hp = cfg.projector.hidden_size or h
    pr, ours, g = "model.multi_modal_projector.", "vision_projection.", "projector"
    for w in ("weight", "bias"):
        add(f"{ours}layer_norm.{w}", [f"{pr}layer_norm.{w}"], [(hin,)], _identity(), g)
    for hf_name, mc, (out, inp) in (
        ("linear_1", "linear_fc1", (hp, hin)),
        ("linear_2", "linear_fc2", (h, hp)),
    ):
        add(f"{ours}encoder.{mc}.weight", [f"{pr}{hf_name}.weight"], [(out, inp)], _identity(), g)
        if cfg.projector.bias:
            add(f"{ours}encoder.{mc}.bias", [f"{pr}{hf_name}.bias"], [(out,)], _identity(), g)


def hf_internvl_config(cfg: LlavaConfig, built_layers_only: bool = False):
    """transformers ``InternVLConfig`` of our InternVL model ``cfg`` (Qwen2 or Llama text).

    Args:
        cfg: the model.
        built_layers_only: give the tower exactly the layers we build and read the last one
            (a model trained here has no others); else ``vision.num_layers`` and
            ``vision.feature_layer`` as they are.
    """
    from transformers import InternVLConfig

    v, lm = cfg.vision, cfg.lm
    vision = dict(
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_layers_built if built_layers_only else v.num_layers,
        num_attention_heads=v.num_attention_heads,
        intermediate_size=v.ffn_hidden_size,
        hidden_act=v.activation or "gelu",
        norm_type="layer_norm" if v.norm == "LayerNorm" else "rms_norm",
        layer_norm_eps=v.layernorm_eps,
        image_size=[v.image_size, v.image_size],
        patch_size=[v.patch_size, v.patch_size],
        num_channels=v.num_channels,
        attention_bias=v.qkv_bias,
        use_qk_norm=v.qk_norm,
        layer_scale_init_value=v.layer_scale_init if v.layer_scale_init is not None else 1.0,
        use_mean_pooling=not v.apply_post_layernorm,
    )
    text = dict(
        model_type="qwen2" if lm.qkv_bias else "llama",
        hidden_size=lm.hidden_size,
        intermediate_size=lm.ffn_hidden_size,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_attention_heads,
        num_key_value_heads=lm.kv_groups,
        vocab_size=lm.vocab_size,
        max_position_embeddings=lm.max_position_embeddings,
        rope_theta=lm.rope_theta,
        rms_norm_eps=lm.norm_eps,
        tie_word_embeddings=lm.tie_embeddings,
        hidden_act="silu",
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=cfg.image_token_id,
        downsample_ratio=cfg.projector.pixel_shuffle_ratio,
        projector_hidden_act=cfg.projector.activation,
        vision_feature_layer=-1 if built_layers_only else v.feature_layer,
        vision_feature_select_strategy="default" if v.drop_class_token else "full",
        tie_word_embeddings=lm.tie_embeddings,
    )


def internvl_config_from_hf(
    hf_cfg, *, spec: str = "local", make_vocab_size_divisible_by: int = 64
) -> tuple[LlavaConfig, list[str]]:
    """Map a transformers ``InternVLConfig`` to ours (UnsupportedModelError names the field)."""
    where = "config.json vision_config."
    vc = hf_cfg.vision_config
    act = hf_cfg.projector_hidden_act
    if act not in PROJECTOR_ACTIVATIONS:
        raise UnsupportedModelError(
            f"config.json projector_hidden_act={act!r}: supported are {PROJECTOR_ACTIVATIONS}"
        )
    if vc.hidden_act not in PROJECTOR_ACTIVATIONS:
        raise UnsupportedModelError(f"{where}hidden_act={vc.hidden_act!r} is unsupported")
    if not vc.use_absolute_position_embeddings or vc.use_mask_token:
        raise UnsupportedModelError(
            f"{where}use_absolute_position_embeddings=false / use_mask_token=true are unsupported"
        )
    size, patch = list(vc.image_size), list(vc.patch_size)
    if size[0] != size[1] or patch[0] != patch[1]:
        raise UnsupportedModelError(f"{where}image_size={size} / patch_size={patch}: not square")
    layer, strategy = hf_cfg.vision_feature_layer, hf_cfg.vision_feature_select_strategy
    if not isinstance(layer, int) or layer >= 0:
        raise UnsupportedModelError(
            f"config.json vision_feature_layer={layer!r}: only one negative layer index is "
            "supported"
        )
    if strategy not in ("default", "full"):
        raise UnsupportedModelError(
            f"config.json vision_feature_select_strategy={strategy!r} (expected default|full)"
        )
    lm, notes = text_config_to_ours(hf_cfg.text_config, make_vocab_size_divisible_by)
    lm.tie_embeddings = bool(getattr(hf_cfg, "tie_word_embeddings", False))
    eps = float(vc.layer_norm_eps)
    if vc.use_qk_norm and eps != 1e-6:
        notes.append(f"QK norm uses layer_norm_eps={eps} here; transformers fixes it at 1e-6")
    vision = VisionConfig(
        style="internvit",
        image_size=size[0],
        patch_size=patch[0],
        num_channels=vc.num_channels,
        num_layers=vc.num_hidden_layers,
        feature_layer=layer,
        hidden_size=vc.hidden_size,
        ffn_hidden_size=vc.intermediate_size,
        num_attention_heads=vc.num_attention_heads,
        layernorm_eps=eps,
        drop_class_token=strategy == "default",
        # last_hidden_state carries the final LayerNorm unless mean pooling replaces it
        post_layernorm=layer == -1 and not vc.use_mean_pooling,
        norm="LayerNorm" if vc.norm_type == "layer_norm" else "RMSNorm",
        activation=vc.hidden_act,
        qkv_bias=bool(vc.attention_bias),
        qk_norm=bool(vc.use_qk_norm),
        layer_scale_init=float(vc.layer_scale_init_value),
    )
    cfg = LlavaConfig(
        vision=vision,
        projector=ProjectorConfig(
            type="pixel_shuffle_mlp",
            activation=act,
            pixel_shuffle_ratio=float(hf_cfg.downsample_ratio),
        ),
        lm=lm,
        tiling=TilingConfig(type="internvl_dynamic", image_markers=INTERNVL_MARKERS),
        image_token_id=int(hf_cfg.image_token_id),
    )
    cfg.set_spec(spec)
    try:
        cfg.validate()
        from mm_megatron.model.image_tokens import image_token_count

        tokens = image_token_count(cfg)
    except ValueError as e:
        raise UnsupportedModelError(f"config.json maps to an invalid model config: {e}") from None
    seq = getattr(hf_cfg, "image_seq_length", None)
    if seq is not None and int(seq) != tokens:
        notes.append(f"image_seq_length={seq} but the vision config yields {tokens} per tile")
    return cfg, notes


def _to_hf(cfg: LlavaConfig, dtype: str) -> dict:
    hf = hf_internvl_config(cfg, built_layers_only=True)
    hf.architectures = ["InternVLForConditionalGeneration"]
    d = hf.to_dict()
    d["dtype"] = dtype
    return d


HF_FAMILIES["internvl"] = HFFamily(
    architecture="InternVLForConditionalGeneration",
    config_class="InternVLConfig",
    from_hf=internvl_config_from_hf,
    exports=lambda cfg: cfg.vision.style == "internvit",
    to_hf=_to_hf,
    build_processor=internvl_processor,
)
VISION_RULES["internvit"] = internvit_rules
PROJECTOR_RULES["pixel_shuffle_mlp"] = pixel_shuffle_projector_rules
