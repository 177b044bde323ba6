"""InternViT (InternVL's vision encoder) as a megatron-core spec: ``vision.style="internvit"``.

InternViT is a pre-norm ViT like CLIP's, with these differences, each a spec or config edit of the
shared ViT layer (``model/specs.py:vit_layer_spec``), so TE vs local stays a spec choice:

* layer scale: both residual branches are scaled per channel (HF ``lambda_1``/``lambda_2``) —
  :class:`LayerScaleBiasDropoutAdd` replaces megatron's bias-dropout-add;
* optional QK normalisation (InternViT-6B): RMSNorm over the *whole* query / key width, not per
  head — :class:`FullWidthQKRMSNorm` sums the squares over the TP group;
* LayerNorm or RMSNorm layers (``vision.norm``), exact GELU, QKV bias optional
  (``vision.qkv_bias``), patch conv with bias, no pre-LayerNorm;
* the class token is prepended and has a position embedding, as in transformers'
  ``InternVLVisionEmbeddings``; ``vision.drop_class_token`` is HF's
  ``vision_feature_select_strategy="default"`` and ``vision.feature_layer`` its
  ``vision_feature_layer`` (only the layers up to it are built).

The forward pass is :class:`~mm_megatron.model.vision.VisionEncoder`'s (sequence-parallel padding
included). What this file does not do: pixel shuffle (``model/projector_pixel_shuffle.py``), tile
images (``data/tiling_internvl.py``) or map HF keys (``convert/internvl.py``).

This module computes; its process group arrives in ``pg_collection``.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from mm_megatron.config.model_config import VisionConfig
from mm_megatron.model.norm import LocalNorm
from mm_megatron.model.specs import block_spec, vit_layer_spec
from mm_megatron.model.vision import VisionEncoder, register_vision_encoder


class LayerScaleBiasDropoutAdd(torch.nn.Module):
    """``residual + dropout(lambda * (x + bias))``: megatron's bias-dropout-add with layer scale.

    Megatron's layer calls ``bda(training, fused)(x_with_bias, residual, prob)``; this module's
    ``forward`` returns that function, so it drops into ``self_attn_bda`` / ``mlp_bda``.

    Args:
        hidden_size: width of the residual stream.
        init_value: initial scale (HF ``layer_scale_init_value``).
        params_dtype: parameter dtype.
        sequence_parallel: the layer runs on a sequence shard (its gradient is then summed
            over TP by ``finalize_model_grads``).
    """

    def __init__(
        self,
        hidden_size: int,
        init_value: float,
        params_dtype: torch.dtype = torch.float32,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), init_value, dtype=params_dtype))
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, training: bool, fused: bool = False):
        del fused  # the unfused path is exact everywhere

        def bda(x_with_bias, residual: torch.Tensor, prob: float) -> torch.Tensor:
            x, bias = x_with_bias  # [s, b, h], [h] or None
            if bias is not None:
                x = x + bias
            x = F.dropout(self.weight * x, p=prob, training=training)
            return residual + x

        return bda


class FullWidthQKRMSNorm(torch.nn.Module):
    """RMSNorm over all heads of a query or key (HF ``q_norm``/``k_norm``), TP-sharded by head.

    Megatron applies ``q_layernorm`` per head (``[s, b, np, hn]``); InternViT-6B normalises the
    whole ``np * hn`` width. Under TP each rank holds ``np / tp`` heads and its slice of the
    weight, so the mean of squares is summed over the TP group (forward all-reduce, backward
    all-reduce: every rank's output depends on every rank's input).

    Args:
        hidden_size: per-head width (what megatron passes); the weight is ``np/tp * hn`` wide.
        config: the ViT's TransformerConfig.
        eps: epsilon (megatron passes ``layernorm_epsilon``).
        tp_group: the tensor-parallel group.
    """

    def __init__(self, hidden_size: int, config: TransformerConfig, eps: float, tp_group=None):
        super().__init__()
        tp = config.tensor_model_parallel_size
        self.full_width = config.num_attention_heads * hidden_size
        local = self.full_width // tp
        self.eps = eps
        self.tp = tp
        self.tp_group = tp_group
        self.weight = torch.nn.Parameter(torch.ones(local, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # [s, b, np/tp, hn]
        x = x.flatten(-2)  # [s, b, np/tp * hn]
        dtype = x.dtype
        xf = x.float()
        sq = xf.pow(2).sum(-1, keepdim=True)  # [s, b, 1]
        if self.tp > 1:
            sq = reduce_from_tensor_model_parallel_region(
                copy_to_tensor_model_parallel_region(sq, self.tp_group), self.tp_group
            )
        out = xf * torch.rsqrt(sq / self.full_width + self.eps)
        return (self.weight * out.to(dtype)).view(shape)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The weight is split over TP along its only axis."""
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {"weight": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=(metadata or {}).get("dp_cp_group"),
        )


def internvit_layer_spec(
    vcfg: VisionConfig, config: TransformerConfig, pg_collection, padded: bool
) -> ModuleSpec:
    """The shared ViT layer spec with InternViT's layer scale and QK norm swapped in."""
    layer = vit_layer_spec(vcfg.spec, padded=padded)
    sub = layer.submodules
    changes = {}
    if vcfg.layer_scale_init is not None:
        scale = ModuleSpec(
            module=LayerScaleBiasDropoutAdd,
            params=dict(
                hidden_size=vcfg.hidden_size,
                init_value=vcfg.layer_scale_init,
                params_dtype=config.params_dtype,
                sequence_parallel=config.sequence_parallel,
            ),
        )
        changes.update(self_attn_bda=scale, mlp_bda=scale)
    if vcfg.qk_norm:
        norm = functools.partial(FullWidthQKRMSNorm, tp_group=pg_collection.tp)
        attn_sub = dataclasses.replace(
            sub.self_attention.submodules, q_layernorm=norm, k_layernorm=norm
        )
        changes["self_attention"] = dataclasses.replace(sub.self_attention, submodules=attn_sub)
    return dataclasses.replace(layer, submodules=dataclasses.replace(sub, **changes))


@register_vision_encoder("internvit")
class InternViTEncoder(VisionEncoder):
    """images [N, C, H, W] -> features [N, T, h]; see the module docstring.

    Args:
        config: the ViT's TransformerConfig.
        vcfg: the VisionConfig (``style="internvit"``).
        layer_spec: block spec built by :meth:`build`.
        pg_collection: process groups (TP).
    """

    def _post_layernorm(self, config: TransformerConfig, vcfg: VisionConfig) -> LocalNorm:
        # HF's final ``layernorm``: a LayerNorm even when the layers use RMSNorm.
        return LocalNorm(
            config,
            vcfg.hidden_size,
            eps=vcfg.layernorm_eps,
            normalization="LayerNorm",
            sequence_parallel=False,
        )

    @classmethod
    def build(
        cls, config: TransformerConfig, vcfg: VisionConfig, pg_collection: ProcessGroupCollection
    ) -> InternViTEncoder:
        """The encoder with its InternViT block spec."""
        tp = config.tensor_model_parallel_size
        padded = config.sequence_parallel and vcfg.num_positions % tp != 0
        layer = internvit_layer_spec(vcfg, config, pg_collection, padded)
        return cls(config, vcfg, block_spec(layer, vcfg.spec, config), pg_collection)
