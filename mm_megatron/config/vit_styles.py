"""What each ViT style decides about its embeddings, norms and MLP: one table, no name tests.

A ``VisionConfig.style`` (or a dual encoder's ``hires.vit_style``) names a :class:`ViTStyle`
here. The encoder (``model/vision.py``), the ViT's TransformerConfig
(``model/transformer_configs.py``) and ``VisionConfig``'s derived properties read the table
instead of comparing style names:

=========  ===========  =========  ======  ===============  ==========  =================
style      class token  conv bias  pre-LN  post-LN default  key bias    activation
=========  ===========  =========  ======  ===============  ==========  =================
clip       yes          no         yes     no               yes         quick_gelu
siglip     no           yes        no      yes              yes         gelu_pytorch_tanh
internvit  yes          yes        no      no               yes         gelu
blip2      yes          yes        no      yes              no (held)   gelu
=========  ===========  =========  ======  ===============  ==========  =================

``blip2`` is transformers' ``Blip2VisionModel`` / ``InstructBlipVisionModel`` (EVA ViT-g as
BLIP-2 ships it): its fused ``qkv`` has query and value biases only; the key third of our fused
QKV bias is held at its loaded value, zero (a key bias adds ``q . b`` to every logit of a
query's row, which softmax ignores: it has no effect, and its computed gradient is rounding noise
that the encoder masks).

This module is data only: it builds nothing and imports nothing from ``model/``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViTStyle:
    """The architecture choices a ViT style fixes."""

    class_token: bool
    """A learned class token is prepended (and has a position embedding)."""
    conv_bias: bool
    """The patch convolution has a bias."""
    pre_layernorm: bool
    """A LayerNorm runs on the embeddings before the first layer (CLIP's ``pre_layrnorm``)."""
    post_layernorm: bool
    """The final LayerNorm runs when ``vision.post_layernorm`` is None."""
    key_bias: bool
    """The key projection has a trained bias; False: the key third of the QKV bias stays 0."""
    activation: str
    """MLP activation (HF ``hidden_act`` name) when ``vision.activation`` is None."""


VIT_STYLES: dict[str, ViTStyle] = {
    "clip": ViTStyle(True, False, True, False, True, "quick_gelu"),
    "siglip": ViTStyle(False, True, False, True, True, "gelu_pytorch_tanh"),
    "internvit": ViTStyle(True, True, False, False, True, "gelu"),
    "blip2": ViTStyle(True, True, False, True, False, "gelu"),
}
"""ViT style name -> its choices (see the module docstring)."""


def vit_style(name: str) -> ViTStyle:
    """The choices of style ``name`` (ValueError lists the known styles)."""
    if name not in VIT_STYLES:
        raise ValueError(f"vision.style={name!r} has no ViT style; known: {sorted(VIT_STYLES)}")
    return VIT_STYLES[name]
