"""BLIP-2's vision tower (EVA ViT-g as transformers ships it) <-> our ``vision.style="blip2"``.

MiniGPT-4 starts from BLIP-2's whole vision side: this module maps transformers'
``Blip2VisionModel`` / ``InstructBlipVisionModel`` (alone, or the ``vision_model.`` half of a
``Blip2ForConditionalGeneration`` / ``Blip2Model`` / ``InstructBlipForConditionalGeneration``)
onto :class:`~mm_megatron.model.vision.VisionEncoder`; ``convert/qformer.py`` does the
Q-Former. Both are used by ``convert assemble --vision BLIP2_DIR --qformer-from BLIP2_DIR``.

* :func:`blip2_vision_config_to_ours`: the HF vision config + a feature layer -> ``VisionConfig``
  (``num_layers`` is the HF ``num_hidden_layers``: BLIP-2 ships 39 of EVA's 40 layers, and
  reads the last one, ``feature_layer=-1``, after ``post_layernorm``, i.e. ``last_hidden_state``;
  an earlier layer is read without it, as HF's ``hidden_states[k]``).
* :func:`blip2_vision_rules`: one rule per parameter, both directions (``convert/mapping.py``'s
  ``Rule``; registered as ``VISION_RULES["blip2"]``).

Canonical key (``model.vision_tower.`` + the stand-alone model's key) -> ours (``vision_model.``)::

    embeddings.class_embedding [1, 1, h]        class_token [1, 1, h]
    embeddings.position_embedding [1, P+1, h]   position_embeddings.weight [P+1, h]
    embeddings.patch_embedding.{weight,bias}    conv1.{weight,bias}
    L layer_norm1.* / layer_norm2.*             L input_layernorm.* / pre_mlp_layernorm.*
    L self_attn.qkv.weight [3h, h] (q; k; v)    L self_attention.linear_qkv.weight (per head)
    L self_attn.qkv.bias [3h] (key third 0)     L self_attention.linear_qkv.bias (per head)
    L self_attn.projection.*                    L self_attention.linear_proj.*
    L mlp.fc1.* / mlp.fc2.*                     L mlp.linear_fc1.* / mlp.linear_fc2.*
    post_layernorm.*                            post_layernorm.* (when applied)

transformers stores the query and value biases as one ``qkv.bias`` whose key third is zero (its
``q_bias``/``v_bias`` are concatenated around zeros at init); we carry the stored third as is,
so the round trip is bit-exact, and the encoder holds it fixed in training (its gradient is
masked; softmax ignores it). Not here: reading files (the shared reader), the Q-Former, the
LM, and HF's ``interpolate_pos_encoding`` (the resolution is the checkpoint's).
"""

from __future__ import annotations

from mm_megatron.checkpoint.errors import UnsupportedModelError
from mm_megatron.config.model_config import VisionConfig
from mm_megatron.convert.mapping import (
    VISION_RULES,
    _identity,
    batched_embedding_rules,
    interleave_qkv,
    split_qkv,
)

MODEL_TYPES = ("blip_2_vision_model", "instructblip_vision_model")
"""HF vision ``model_type`` values this module reads (the vision config of BLIP-2/InstructBLIP)."""


def blip2_vision_config_to_ours(
    vc, feature_layer: int | list[int], strategy: str, where: str = "config.json vision_config."
) -> VisionConfig:
    """A transformers ``Blip2VisionConfig`` / ``InstructBlipVisionConfig`` -> our VisionConfig.

    Args:
        vc: the vision config.
        feature_layer: HF-style ``vision_feature_layer`` (-1: BLIP-2's ``last_hidden_state``).
        strategy: ``full`` keeps the class token (BLIP-2), ``default`` drops it.
        where: how messages name the config: a prefix for a field name (file and section).

    Raises:
        UnsupportedModelError: an option we do not build, naming the field.
    """
    mtype = getattr(vc, "model_type", None)
    if mtype not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"{where}model_type={mtype!r} is not a BLIP-2 vision tower ({', '.join(MODEL_TYPES)})"
        )
    if vc.hidden_act != "gelu":
        raise UnsupportedModelError(f"{where}hidden_act={vc.hidden_act!r} unsupported (gelu)")
    if not getattr(vc, "qkv_bias", True):
        raise UnsupportedModelError(f"{where}qkv_bias=false is unsupported (BLIP-2 has q/v bias)")
    if getattr(vc, "num_channels", 3) != 3:
        raise UnsupportedModelError(f"{where}num_channels={vc.num_channels}: the conv takes 3")
    layers = feature_layer if isinstance(feature_layer, list) else [feature_layer]
    last = len(layers) == 1 and layers[0] in (-1, vc.num_hidden_layers)
    return VisionConfig(
        style="blip2",
        image_size=int(vc.image_size),
        patch_size=int(vc.patch_size),
        num_channels=3,
        num_layers=int(vc.num_hidden_layers),
        feature_layer=feature_layer,
        hidden_size=int(vc.hidden_size),
        ffn_hidden_size=int(vc.intermediate_size),
        num_attention_heads=int(vc.num_attention_heads),
        layernorm_eps=float(vc.layer_norm_eps),
        drop_class_token=strategy == "default",
        post_layernorm=last,  # last_hidden_state has it; hidden_states[k] do not
        activation="gelu",
    )


def _fused_qkv(nh: int):
    """HF fused ``qkv`` ``[q; k; v]`` (each ``[h, ...]``) <-> megatron's per-head grouping."""

    def to_mcore(ts):
        q, k, v = ts[0].chunk(3, dim=0)
        return interleave_qkv(q, k, v, nh)

    def to_hf(t):
        import torch

        return [torch.cat(split_qkv(t, nh, nh), dim=0)]

    return to_mcore, to_hf


def blip2_vision_rules(cfg, add, tower: str = "model.vision_tower.") -> None:
    """Rules of the ``blip2`` encoder (``add(param, hf_keys, hf_shapes, fns, group)``)."""
    v = cfg.vision
    h, f, nh = v.hidden_size, v.ffn_hidden_size, v.num_attention_heads
    V, T = "vision_model.", tower
    emb = "embeddings."
    batched_embedding_rules(
        v, add, T, emb + "class_embedding", emb + "position_embedding", emb + "patch_embedding."
    )
    for i in range(v.num_layers_built):
        m, p, g = f"{V}decoder.layers.{i}.", f"{T}encoder.layers.{i}.", f"vision.layer.{i}"
        for w in ("weight", "bias"):
            add(m + f"input_layernorm.{w}", [p + f"layer_norm1.{w}"], [(h,)], _identity(), g)
            add(m + f"pre_mlp_layernorm.{w}", [p + f"layer_norm2.{w}"], [(h,)], _identity(), g)
        add(
            m + "self_attention.linear_qkv.weight",
            [p + "self_attn.qkv.weight"],
            [(3 * h, h)],
            _fused_qkv(nh),
            g,
        )
        add(
            m + "self_attention.linear_qkv.bias",
            [p + "self_attn.qkv.bias"],
            [(3 * h,)],
            _fused_qkv(nh),
            g,
        )
        for ours, hf, shape in (
            ("self_attention.linear_proj", "self_attn.projection", (h, h)),
            ("mlp.linear_fc1", "mlp.fc1", (f, h)),
            ("mlp.linear_fc2", "mlp.fc2", (h, f)),
        ):
            add(m + f"{ours}.weight", [p + f"{hf}.weight"], [shape], _identity(), g)
            add(m + f"{ours}.bias", [p + f"{hf}.bias"], [shape[:1]], _identity(), g)
    if v.apply_post_layernorm:
        for w in ("weight", "bias"):
            post = [T + f"post_layernorm.{w}"]
            add(V + f"post_layernorm.{w}", post, [(h,)], _identity(), "vision.post")


VISION_RULES["blip2"] = blip2_vision_rules
