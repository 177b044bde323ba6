"""Tensor mapping between HF LLaVA and our megatron model: one rule per megatron parameter.

A :class:`Rule` names a megatron parameter (our local-spec ``named_parameters()`` name, e.g.
``language_model.decoder.layers.3.mlp.linear_fc1.weight``), the canonical HF keys it is made of
(see :mod:`mm_megatron.convert.keys`), their shapes as implied by the config, and the two
transforms. Both directions use the same rules, so import and export cannot drift apart.

Layouts (megatron-core 0.19.2, ``SelfAttention.get_query_key_value_tensors`` / ``MLP``):

* QKV: HF ``q [nh*d, h]``, ``k, v [ng*d, h]``; megatron ``linear_qkv [(nh+2ng)*d, h]`` grouped:
  for each query group g, ``q[g*p:(g+1)*p]`` (p = nh/ng heads), ``k[g]``, ``v[g]``. Biases alike.
  TP ranks take contiguous dim-0 chunks, i.e. ng/TP whole groups, so the TP1 layout is the global
  one. The ViT is MHA (ng = nh).
* SwiGLU: ``linear_fc1 = cat(gate, up)`` at TP1; megatron's swiglu sharded factory stores it as
  two chunks of one global ``[2*ffn, h]`` tensor (gate rows, then up rows), so at TP=t rank r
  loads ``cat(gate_r, up_r)`` — exactly what its forward expects.
* Vocab: embeddings/output are padded with zero rows to ``padded_vocab_size(1)``; the padding is
  stripped on export. Loading at another TP re-pads (megatron marks these tensors
  ``allow_shape_mismatch``: rows past the stored ones load as zeros, extra stored rows are dropped).
* CLIP ``class_embedding [h]`` <-> ``class_token [1, 1, h]``; ``pre_layrnorm`` (HF's spelling) <->
  ``pre_layernorm``; ``patch_embedding`` <-> ``conv1``.
* A tiling scheme with an arrangement (anyres: LLaVA-NeXT, OneVision) has the learned row
  separator ``image_newline [h]`` <-> ``model.image_newline``, streamed with the projector.

Tensors HF carries but our model never reads (vision layers past ``vision_feature_layer``,
``post_layernorm``, SigLIP's pooling ``head``, buffers) are *passthrough*: stored verbatim next to
the megatron checkpoint and written back on export, so round trips are bit-exact.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.config.vit_styles import vit_style

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """How one megatron parameter is built from (and split back into) HF tensors."""

    param: str
    """Megatron parameter name (local spec)."""
    hf: tuple[str, ...]
    """Canonical HF keys, in the order the transforms take/return them."""
    hf_shapes: tuple[tuple[int, ...], ...]
    """Shapes of ``hf`` the config implies."""
    to_mcore: Callable[[Tensors], torch.Tensor]
    """HF tensors -> megatron tensor (TP1 layout)."""
    to_hf: Callable[[torch.Tensor], Tensors]
    """Megatron tensor -> HF tensors (contiguous)."""
    group: str
    """Streaming unit (one transformer layer, the embeddings, ...)."""
    row_concat: bool = False
    """``to_mcore`` is ``cat(hf tensors, dim=0)`` (SwiGLU fc1): a chunk that is exactly one of
    the parts can be read without building the whole parameter."""


# --- transforms -------------------------------------------------------------------------------


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ng: int) -> torch.Tensor:
    """HF q [nh*d, ...], k/v [ng*d, ...] -> megatron grouped linear_qkv [(nh+2ng)*d, ...]."""
    d = k.shape[0] // ng
    rest = tuple(q.shape[1:])
    q = q.reshape(ng, -1, *rest)  # [ng, p*d, ...]
    k = k.reshape(ng, d, *rest)  # [ng, d, ...]
    v = v.reshape(ng, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, nh: int, ng: int) -> Tensors:
    """Inverse of :func:`interleave_qkv`: returns [q, k, v]."""
    d = qkv.shape[0] // (nh + 2 * ng)
    p = nh // ng
    rest = tuple(qkv.shape[1:])
    x = qkv.reshape(ng, (p + 2) * d, *rest)  # [ng, (p+2)*d, ...]
    q = x[:, : p * d].reshape(nh * d, *rest)
    k = x[:, p * d : (p + 1) * d].reshape(ng * d, *rest)
    v = x[:, (p + 1) * d :].reshape(ng * d, *rest)
    return [q.contiguous(), k.contiguous(), v.contiguous()]


def _identity() -> tuple[Callable, Callable]:
    return (lambda ts: ts[0]), (lambda t: [t.contiguous()])


def _reshape(shape_hf: tuple[int, ...], shape_ours: tuple[int, ...]) -> tuple[Callable, Callable]:
    return (lambda ts: ts[0].reshape(shape_ours)), (lambda t: [t.reshape(shape_hf).contiguous()])


def batched_embedding_rules(v, add, tower: str, cls: str, pos: str, conv: str) -> None:
    """Embedding rules of a ViT whose HF tower stores the class token as ``[1, 1, h]``, the
    position embeddings as ``[1, P, h]`` and a patch conv with bias (BLIP-2's and InternViT's),
    keys ``tower + cls`` / ``tower + pos`` / ``tower + conv + "weight"|"bias"``."""
    h, V, g = v.hidden_size, "vision_model.", "vision.embed"
    add(V + "class_token", [tower + cls], [(1, 1, h)], _identity(), g)
    shape = (1, v.num_positions, h)
    fns = _reshape(shape, (v.num_positions, h))
    add(V + "position_embeddings.weight", [tower + pos], [shape], fns, g)
    patch = (h, v.num_channels, v.patch_size, v.patch_size)
    add(V + "conv1.weight", [tower + conv + "weight"], [patch], _identity(), g)
    add(V + "conv1.bias", [tower + conv + "bias"], [(h,)], _identity(), g)


def _qkv(nh: int, ng: int) -> tuple[Callable, Callable]:
    return (lambda ts: interleave_qkv(ts[0], ts[1], ts[2], ng)), (lambda t: split_qkv(t, nh, ng))


def _swiglu_cat(ts: Tensors) -> torch.Tensor:
    return torch.cat([ts[0], ts[1]], dim=0)


def _swiglu() -> tuple[Callable, Callable]:
    def to_hf(t: torch.Tensor) -> Tensors:
        gate, up = torch.chunk(t, 2, dim=0)
        return [gate.contiguous(), up.contiguous()]

    return _swiglu_cat, to_hf


def _vocab(vocab: int, padded: int) -> tuple[Callable, Callable]:
    def to_mcore(ts: Tensors) -> torch.Tensor:
        t = ts[0]
        if padded == t.shape[0]:
            return t
        pad = t.new_zeros(padded - t.shape[0], *t.shape[1:])
        return torch.cat([t, pad], dim=0)

    return to_mcore, (lambda t: [t[:vocab].contiguous()])


def _class_token(h: int) -> tuple[Callable, Callable]:
    return (lambda ts: ts[0].reshape(1, 1, h)), (lambda t: [t.reshape(h).contiguous()])


# --- rules ------------------------------------------------------------------------------------


PARTS = ("lm", "vision", "projector")
"""The model's parts, in rule order."""


def build_rules(cfg: LlavaConfig, parts: tuple[str, ...] = PARTS) -> list[Rule]:
    """The rules of ``parts`` for ``cfg``.

    With all parts, every megatron parameter of the TP1/PP1 model has exactly one rule.
    ``convert assemble`` and the parts export use ``("lm", "vision")``: the projector does not
    come from (or go to) an HF checkpoint there.
    """
    rules: list[Rule] = []

    def add(param, hf, shapes, fns, group):
        shapes = tuple(tuple(s) for s in shapes)
        concat = fns[0] is _swiglu_cat
        rules.append(Rule(param, tuple(hf), shapes, fns[0], fns[1], group, concat))

    builders = {
        "lm": _lm_rules,
        "vision": VISION_RULES.get(cfg.vision.style, _vision_rules),
        "projector": PROJECTOR_RULES.get(cfg.projector.type, _projector_rules),
    }
    for part in PARTS:
        if part in parts:
            builders[part](cfg, add)
    return rules


def _lm_rules(cfg: LlavaConfig, add) -> None:
    lm = cfg.lm
    h, f, dh = lm.hidden_size, lm.ffn_hidden_size, lm.head_dim
    nh, ng = lm.num_attention_heads, lm.kv_groups
    vocab_fns = _vocab(lm.vocab_size, lm.padded_vocab_size(1))
    L, P = "language_model.", "model.language_model."
    emb = [P + "embed_tokens.weight"]
    add(L + "embedding.word_embeddings.weight", emb, [(lm.vocab_size, h)], vocab_fns, "lm.embed")
    for i in range(lm.num_layers):
        m, p, g = f"{L}decoder.layers.{i}.", f"{P}layers.{i}.", f"lm.layer.{i}"
        add(m + "input_layernorm.weight", [p + "input_layernorm.weight"], [(h,)], _identity(), g)
        qkv_shapes = [(nh * dh, h), (ng * dh, h), (ng * dh, h)]
        qkv = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        add(m + "self_attention.linear_qkv.weight", qkv, qkv_shapes, _qkv(nh, ng), g)
        if lm.qkv_bias:
            qkv_b = [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
            bias_shapes = [s[:1] for s in qkv_shapes]
            add(m + "self_attention.linear_qkv.bias", qkv_b, bias_shapes, _qkv(nh, ng), g)
        o_proj = [p + "self_attn.o_proj.weight"]
        add(m + "self_attention.linear_proj.weight", o_proj, [(h, nh * dh)], _identity(), g)
        post_ln = [p + "post_attention_layernorm.weight"]
        add(m + "pre_mlp_layernorm.weight", post_ln, [(h,)], _identity(), g)
        gate_up = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        add(m + "mlp.linear_fc1.weight", gate_up, [(f, h), (f, h)], _swiglu(), g)
        add(m + "mlp.linear_fc2.weight", [p + "mlp.down_proj.weight"], [(h, f)], _identity(), g)
    add(L + "decoder.final_layernorm.weight", [P + "norm.weight"], [(h,)], _identity(), "lm.final")
    if not lm.tie_embeddings:
        head = ["lm_head.weight"]
        add(L + "output_layer.weight", head, [(lm.vocab_size, h)], vocab_fns, "lm.final")


def _vision_rules(cfg: LlavaConfig, add) -> None:
    v = cfg.vision
    hv, fv, nv = v.hidden_size, v.ffn_hidden_size, v.num_attention_heads
    V, T, g = "vision_model.", "model.vision_tower.", "vision.embed"
    if v.has_class_token:
        cls = [T + "embeddings.class_embedding"]
        add(V + "class_token", cls, [(hv,)], _class_token(hv), g)
    patch = (hv, v.num_channels, v.patch_size, v.patch_size)
    add(V + "conv1.weight", [T + "embeddings.patch_embedding.weight"], [patch], _identity(), g)
    style = vit_style(v.style)
    if style.conv_bias:
        add(V + "conv1.bias", [T + "embeddings.patch_embedding.bias"], [(hv,)], _identity(), g)
    pos = [T + "embeddings.position_embedding.weight"]
    add(V + "position_embeddings.weight", pos, [(v.num_positions, hv)], _identity(), g)
    if style.pre_layernorm:
        for w in ("weight", "bias"):
            add(V + f"pre_layernorm.{w}", [T + f"pre_layrnorm.{w}"], [(hv,)], _identity(), g)
    for i in range(v.num_layers_built):
        m, p, g = f"{V}decoder.layers.{i}.", f"{T}encoder.layers.{i}.", f"vision.layer.{i}"
        for w in ("weight", "bias"):

            def shape(out: int, inp: int, w=w) -> tuple[int, ...]:
                return (out, inp) if w == "weight" else (out,)

            qkv = [p + f"self_attn.{x}_proj.{w}" for x in "qkv"]
            add(m + f"input_layernorm.{w}", [p + f"layer_norm1.{w}"], [(hv,)], _identity(), g)
            add(m + f"self_attention.linear_qkv.{w}", qkv, [shape(hv, hv)] * 3, _qkv(nv, nv), g)
            out_proj = [p + f"self_attn.out_proj.{w}"]
            add(m + f"self_attention.linear_proj.{w}", out_proj, [shape(hv, hv)], _identity(), g)
            add(m + f"pre_mlp_layernorm.{w}", [p + f"layer_norm2.{w}"], [(hv,)], _identity(), g)
            add(m + f"mlp.linear_fc1.{w}", [p + f"mlp.fc1.{w}"], [shape(fv, hv)], _identity(), g)
            add(m + f"mlp.linear_fc2.{w}", [p + f"mlp.fc2.{w}"], [shape(hv, fv)], _identity(), g)


def _projector_rules(cfg: LlavaConfig, add) -> None:
    # mlp2x_gelu (the only projector HF LLaVA has): linear_1 [hp, hv], linear_2 [h, hp]
    h, hv = cfg.lm.hidden_size, cfg.vision.feature_width
    hp = cfg.projector.hidden_size or h
    pr = "model.multi_modal_projector."
    for hf_name, ours, (out, inp) in (
        ("linear_1", "linear_fc1", (hp, hv)),
        ("linear_2", "linear_fc2", (h, hp)),
    ):
        param = f"vision_projection.encoder.{ours}."
        add(param + "weight", [f"{pr}{hf_name}.weight"], [(out, inp)], _identity(), "projector")
        if cfg.projector.bias:
            add(param + "bias", [f"{pr}{hf_name}.bias"], [(out,)], _identity(), "projector")
    from mm_megatron.model.image_tokens import tile_arrangement

    if tile_arrangement(cfg) is not None:
        add("image_newline", ["model.image_newline"], [(h,)], _identity(), "projector")


VISION_RULES: dict[str, Callable] = {}
"""``vision.style`` -> rule builder ``(cfg, add)`` of encoders other than CLIP/SigLIP
(``internvit``: ``convert/internvl.py``; ``blip2``: ``convert/blip2_vision.py``)."""
PROJECTOR_RULES: dict[str, Callable] = {}
"""``projector.type`` -> rule builder ``(cfg, add)`` of projectors other than ``mlp2x_gelu``."""

_BUFFER = re.compile(r"(^|\.)(position_ids|inv_freq)$")
_VISION_LAYER = re.compile(r"^model\.vision_tower\.encoder\.layers?\.(\d+)\.")  # layer: InternViT


def passthrough_reason(key: str, cfg: LlavaConfig) -> str | None:
    """Why canonical HF key ``key`` is carried through unused, or None if it is not."""
    if _BUFFER.search(key):
        return "buffer"
    m = _VISION_LAYER.match(key)
    if m and int(m.group(1)) >= cfg.vision.num_layers_built:
        return "vision layer after vision_feature_layer"
    if key.startswith(("model.vision_tower.post_layernorm.", "model.vision_tower.layernorm.")):
        return "vision post_layernorm (not read by LLaVA)"
    if key.startswith("model.vision_tower.head."):
        return "SigLIP pooling head (not read by LLaVA)"
    if key == "lm_head.weight" and cfg.lm.tie_embeddings:
        return "lm_head of a tied model"
    return None


def groups_in_order(rules: list[Rule]) -> list[str]:
    """Rule groups in first-appearance order."""
    seen: dict[str, None] = {}
    for r in rules:
        seen.setdefault(r.group, None)
    return list(seen)


# Families with their own encoder/projector rules register them on import.
from mm_megatron.convert import blip2_vision, internvl  # noqa: E402, F401
