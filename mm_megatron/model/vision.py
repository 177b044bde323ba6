"""Vision encoder: patch embedding + a megatron-core ``TransformerBlock`` built from a ViT spec.

Three styles (``VisionConfig.style``), whose choices are the table in
:mod:`mm_megatron.config.vit_styles` (no style name is compared here):

* ``clip``: class token, patch conv without bias, learned positions, pre-LayerNorm
  (HF ``pre_layrnorm``), quick_gelu MLPs; no post-LayerNorm by default.
* ``siglip``: no class token, patch conv with bias, learned positions, gelu-tanh, post-LayerNorm.
* ``blip2``: transformers' ``Blip2VisionModel`` (BLIP-2's EVA ViT-g): class token, patch conv
  with bias, no pre-LayerNorm, exact GELU, post-LayerNorm (BLIP-2 feeds ``last_hidden_state``
  to the Q-Former), query and value biases only: the key third of the fused QKV bias has its
  gradient masked to zero (:func:`hold_key_bias`), so it keeps its loaded (zero) value in
  training; softmax ignores it anyway (it adds ``q . b_k`` to a whole row of logits).

Only ``VisionConfig.num_layers_built`` layers are built: LLaVA's ``vision_feature_layer=-2``
reads the penultimate layer's output, so the last layer would be dead weight. A list of feature
layers (HF ``vision_feature_layer=[...]``) concatenates their outputs along the channels.

Encoders are found by style: ``@register_vision_encoder("style")`` on a ``MegatronModule``
subclass that has a ``build(config, vcfg, pg_collection)`` classmethod and a
``forward_flops(vcfg, num_images)`` staticmethod, plus the connector hooks (parts that freeze,
train and count with the projector: ``connector_modules()``, ``connector_forward_flops``,
``connector_activation_elements``; none for a plain ViT, MGM's mining in ``model/mgm.py``);
:func:`build_vision_encoder` and :func:`vision_encoder_class` are what the rest of the package
calls (no ``if`` on a style name elsewhere). ``clip``, ``siglip`` and ``blip2`` are
:class:`VisionEncoder`.

This module computes; it never looks up process groups itself (they arrive in ``pg_collection``).
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from mm_megatron.config.model_config import VisionConfig
from mm_megatron.config.registry import Registry
from mm_megatron.config.vit_styles import vit_style
from mm_megatron.model.norm import LocalNorm
from mm_megatron.model.specs import block_spec, vit_layer_spec

VISION_ENCODERS: Registry[type[MegatronModule]] = Registry("vision.style", MegatronModule)
"""``VisionConfig.style`` -> encoder class (see the module docstring)."""


def register_vision_encoder(*styles: str):
    """Class decorator adding an encoder class under one or more ``VisionConfig.style`` names."""
    return VISION_ENCODERS.register(*styles)


def vision_encoder_class(style: str) -> type[MegatronModule]:
    """The encoder class of ``style`` (ValueError lists the registered styles)."""
    return VISION_ENCODERS.lookup(style)


def build_vision_encoder(
    config: TransformerConfig, vcfg: VisionConfig, pg_collection: ProcessGroupCollection
) -> MegatronModule:
    """The vision encoder of ``vcfg.style`` (layout already decided in ``config``)."""
    return vision_encoder_class(vcfg.style).build(config, vcfg, pg_collection)


def hold_key_bias(qkv_bias: torch.Tensor, num_heads: int) -> None:
    """Mask the key thirds of a megatron fused QKV bias out of its gradient (a tensor hook).

    Megatron's ``linear_qkv`` bias is grouped per head, ``[q_h, k_h, v_h]`` (MHA); a TP rank
    holds ``num_heads`` whole heads. The true gradient of a key bias is zero; backward returns
    rounding noise (~1e-10 here, next to ~1e-3 for the query/value biases), which Adam would
    turn into a full-size step. Masked, it stays at its loaded value under Adam or SGD (megatron
    applies no weight decay to biases).

    Args:
        qkv_bias: one layer's (local) ``linear_qkv.bias`` ``[num_heads * 3 * d]``.
        num_heads: heads on this rank.
    """

    def mask(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone().view(num_heads, 3, -1)  # [heads, (q, k, v), d]
        grad[:, 1] = 0
        return grad.view(-1)

    if qkv_bias.requires_grad:
        qkv_bias.register_hook(mask)


@register_vision_encoder("clip", "siglip", "blip2")
class VisionEncoder(MegatronModule):
    """images [N, C, H, W] -> features [N, T, h] (T = ``vcfg.num_output_tokens``).

    Args:
        config: the ViT's TransformerConfig.
        vcfg: the VisionConfig (style, sizes, feature selection).
        layer_spec: block spec (or ModuleSpec of one encoder layer), local or TE.
        pg_collection: process groups (TP is used by the transformer layers).
    """

    def __init__(
        self,
        config: TransformerConfig,
        vcfg: VisionConfig,
        layer_spec: ModuleSpec | TransformerBlockSubmodules,
        pg_collection: ProcessGroupCollection,
    ):
        super().__init__(config=config)
        self.vcfg = vcfg
        h = vcfg.hidden_size
        style = vit_style(vcfg.style)
        self.conv1 = torch.nn.Conv2d(
            vcfg.num_channels,
            h,
            kernel_size=vcfg.patch_size,
            stride=vcfg.patch_size,
            bias=style.conv_bias,
            dtype=config.params_dtype,
        )
        if vcfg.has_class_token:
            self.class_token = torch.nn.Parameter(torch.zeros(1, 1, h, dtype=config.params_dtype))
        self.position_embeddings = torch.nn.Embedding(
            vcfg.num_positions, h, dtype=config.params_dtype
        )
        # Pre/post-LN run on the full sequence, outside the sequence-parallel region.
        self.pre_layernorm = (
            LocalNorm(config, h, eps=vcfg.layernorm_eps, sequence_parallel=False)
            if style.pre_layernorm
            else None
        )
        self.decoder = TransformerBlock(
            config=config,
            spec=layer_spec,
            pre_process=True,
            post_process=False,
            pg_collection=pg_collection,
        )
        self.post_layernorm = (
            self._post_layernorm(config, vcfg) if vcfg.apply_post_layernorm else None
        )
        self.tp_group = pg_collection.tp
        self.sequence_parallel = config.sequence_parallel
        self.tp_size = config.tensor_model_parallel_size
        self._init_embeddings(config.init_method_std)
        if not style.key_bias:
            heads = vcfg.num_attention_heads // self.tp_size
            for layer in self.decoder.layers:
                bias = layer.self_attention.linear_qkv.bias
                with torch.no_grad():  # fresh weights: megatron's bias init is zero already
                    bias.view(heads, 3, -1)[:, 1] = 0
                hold_key_bias(bias, heads)

    def _post_layernorm(self, config: TransformerConfig, vcfg: VisionConfig) -> LocalNorm:
        """The final LayerNorm (run on the full sequence, outside the SP region)."""
        return LocalNorm(config, vcfg.hidden_size, eps=vcfg.layernorm_eps, sequence_parallel=False)

    def _init_embeddings(self, std: float) -> None:
        with torch.no_grad():
            torch.nn.init.normal_(self.position_embeddings.weight, std=std)
            torch.nn.init.normal_(self.conv1.weight, std=std)
            if self.conv1.bias is not None:
                self.conv1.bias.zero_()
            if self.vcfg.has_class_token:
                torch.nn.init.normal_(self.class_token, std=std)

    @classmethod
    def build(
        cls, config: TransformerConfig, vcfg: VisionConfig, pg_collection: ProcessGroupCollection
    ) -> VisionEncoder:
        """The encoder with its block spec (padded attention when SP must pad the positions)."""
        if vcfg.hires.enabled:
            raise ValueError(
                f"vision.hires.type={vcfg.hires.type!r} needs a dual-encoder vision.style (mgm), "
                f"not {vcfg.style!r}"
            )
        tp = config.tensor_model_parallel_size
        padded = config.sequence_parallel and vcfg.num_positions % tp != 0
        spec = block_spec(vit_layer_spec(vcfg.spec, padded=padded), vcfg.spec, config)
        return cls(config, vcfg, spec, pg_collection)

    @staticmethod
    def forward_flops(vcfg: VisionConfig, num_images: int = 1) -> int:
        """Model FLOPs of one forward pass over ``num_images`` images (only the layers built).

        Per image with ``p`` positions (patches + class token), width ``h``, MLP width ``f``:
        the patch conv ``2 * (C * k^2 * h) * patches``, then per layer the matmuls
        ``2 * p * (4 h^2 + 2 h f)`` (QKV, output, fc1, fc2) and bidirectional attention
        ``4 * p^2 * h`` (``QK^T`` and ``AV``, nothing masked). Norms, biases and activations are
        ignored (architecture.md, "FLOPs for MFU").
        """
        h, f, p = vcfg.hidden_size, vcfg.ffn_hidden_size, vcfg.num_positions
        patch = 2 * (vcfg.num_channels * vcfg.patch_size * vcfg.patch_size * h) * vcfg.num_patches
        per_layer = 2 * p * (4 * h * h + 2 * h * f) + 4 * p * p * h
        return num_images * (patch + vcfg.num_layers_built * per_layer)

    @staticmethod
    def connector_forward_flops(vcfg: VisionConfig, num_images: int = 1) -> int:
        """FLOPs of parts that train with the projector (none here; MGM's mining has some)."""
        return 0

    @staticmethod
    def connector_activation_elements(vcfg: VisionConfig) -> int:
        """Elements the connector parts save per image for backward (none here)."""
        return 0

    def connector_modules(self) -> list[torch.nn.Module]:
        """Submodules frozen and trained with the projector, not the encoder (none here)."""
        return []

    def set_input_tensor(self, input_tensor) -> None:
        """The ViT is never pipelined; megatron's schedules may still call this."""
        return None

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Transformer layers -> the feature layers, concatenated: [s, N, h] -> [s, N, k * h].

        Several feature layers come from megatron's ``extract_layer_indices`` (one pass).
        Under sequence parallel: pad to a multiple of TP, scatter, mask the padding keys, and
        gather every selected layer back.
        """
        wanted = self.vcfg.feature_layers  # hidden_states indices, 0 = the embeddings
        last = self.vcfg.num_layers_built
        inner = sorted({i for i in wanted if 0 < i < last})  # HF index i = output of layer i-1
        extract = {i - 1 for i in inner} or None
        sp = self.sequence_parallel and self.tp_size > 1
        s = x.shape[0]
        states = {0: x}
        mask = None
        if sp:
            pad = -s % self.tp_size
            if pad:
                x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])  # [s + pad, N, h]
                # megatron convention: True = masked out; [1, 1, 1, s + pad] over keys
                mask = torch.zeros(1, 1, 1, s + pad, dtype=torch.bool, device=x.device)
                mask[..., s:] = True
            x = tensor_parallel.scatter_to_sequence_parallel_region(x, group=self.tp_group)
        out = self.decoder(hidden_states=x, attention_mask=mask, extract_layer_indices=extract)
        found = [out] if extract is None else [out[0], *out[1]]
        for i, t in zip([last, *inner], found):
            if sp:  # [(s + pad) / tp, N, h] -> [s, N, h]; every TP rank continues with the whole
                t = tensor_parallel.gather_from_sequence_parallel_region(
                    t, tensor_parallel_output_grad=False, group=self.tp_group
                )[:s]
            states[i] = t
        if len(wanted) == 1:
            return states[wanted[0]]
        return torch.cat([states[i] for i in wanted], dim=-1)  # [s, N, k * h]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [N, h, g, g]
        x = x.flatten(2).transpose(1, 2)  # [N, P, h]
        if self.vcfg.has_class_token:
            x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)  # [N, 1+P, h]
        x = x + self.position_embeddings.weight.unsqueeze(0)  # [N, s, h]
        if self.pre_layernorm is not None:
            x = self.pre_layernorm(x)
        x = x.transpose(0, 1).contiguous()  # [s, N, h]
        x = self._encode(x)  # [s, N, k * h] (k feature layers, usually 1)
        if self.post_layernorm is not None:
            x = self.post_layernorm(x)
        x = x.transpose(0, 1)  # [N, s, k * h]
        if self.vcfg.has_class_token and self.vcfg.drop_class_token:
            x = x[:, 1:]  # [N, P, k * h]
        return x.contiguous()


# Encoders defined in their own modules register themselves on import.
from mm_megatron.model import internvit, mgm  # noqa: E402, F401
