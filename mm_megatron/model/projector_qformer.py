"""The Q-Former connector of BLIP-2 / InstructBLIP / MiniGPT-4, as a registered projector.

``qformer``: ``num_query_tokens`` learnable queries (LayerNorm'd) pass through
``num_layers`` BERT-style post-LN layers. Each layer runs self-attention over the queries,
cross-attention to the image features when ``i % cross_attention_frequency == 0``, and an MLP,
each as ``LayerNorm(x + dense(f(x)))``; a linear layer then maps the queries to the LM width
(Li et al. 2023, "BLIP-2", sec. 3.1; transformers' ``Blip2QFormerModel`` + ``language_projection``).
So every image (or tile) becomes ``num_query_tokens`` LM embeddings, whatever its patch count.

Tensor parallel: heads are split over TP (query/key/value column-parallel, the attention output
row-parallel), the MLP is column- then row-parallel, the final projection column-parallel with
its output gathered. LayerNorms and the queries are replicated. Sequence parallelism does not
apply (the connector runs outside the LM's SP region, like every projector).

Parameter names (``layers.{i}.attention.query.weight``, ...) map one to one onto the HF keys;
the mapping is :mod:`mm_megatron.convert.qformer`. This module computes; it never looks up
process groups itself (they arrive in ``pg_collection``) and does not read checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from mm_megatron.config.qformer_config import QFormerConfig
from mm_megatron.model.projector import Projector, register_projector
from mm_megatron.model.specs import projector_linears
from mm_megatron.model.transformer_configs import PROJECTOR_ACTIVATION_FUNCS


def _layernorm(config, qcfg: QFormerConfig) -> torch.nn.LayerNorm:
    return torch.nn.LayerNorm(qcfg.hidden_size, eps=qcfg.layernorm_eps, dtype=config.params_dtype)


class QFormerAttention(MegatronModule):
    """``LayerNorm(x + dense(attention(query(x), key(kv), value(kv))))``, heads split over TP.

    Args:
        config: the projector's TransformerConfig (dtype, init, TP size).
        qcfg: the Q-Former shape.
        kv_width: width of the keys' source (Q-Former width for self-attention, the vision
            width for cross-attention).
        linears: (column-parallel, row-parallel) linear classes of the spec.
        tp_group: the tensor-parallel group.
    """

    def __init__(self, config, qcfg: QFormerConfig, kv_width: int, linears, tp_group):
        super().__init__(config=config)
        col, row = linears
        h = qcfg.hidden_size
        common = dict(config=config, bias=True, tp_group=tp_group)
        cols = dict(common, init_method=config.init_method, gather_output=False)
        self.query = col(h, h, **cols)
        self.key = col(kv_width, h, **cols)
        self.value = col(kv_width, h, **cols)
        self.dense = row(
            h,
            h,
            **common,
            init_method=config.output_layer_init_method,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        self.layernorm = _layernorm(config, qcfg)
        self.tp_group = tp_group
        self.head_dim = h // qcfg.num_attention_heads

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        # x [Q, N, h], kv [T, N, h_kv] -> [Q, N, h]
        q, _ = self.query(x)  # [Q, N, h/tp]
        k, _ = self.key(kv)  # [T, N, h/tp]
        v, _ = self.value(kv)

        def heads(t: torch.Tensor) -> torch.Tensor:
            s, n, _ = t.shape
            return t.view(s, n, -1, self.head_dim).permute(1, 2, 0, 3)  # [N, nh/tp, s, d]

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # [N, nh/tp, Q, d]
        out = out.permute(2, 0, 1, 3).flatten(2)  # [Q, N, h/tp]
        out, _ = self.dense(out)  # [Q, N, h] (all-reduced over TP)
        return self.layernorm(out + x)


class QFormerLayers(torch.nn.ModuleList):
    """The layers; saved with each layer's own TP sharding (a plain ModuleList would be saved by
    megatron as replicated tensors)."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        out = {}
        for i, layer in enumerate(self):
            out.update(layer.sharded_state_dict(f"{prefix}{i}.", sharded_offsets, metadata))
        return out


class QFormerLayer(MegatronModule):
    """Self-attention, optional cross-attention to the image, then the MLP (each post-LN).

    Args:
        config / qcfg / linears / tp_group: as :class:`QFormerAttention`.
        vision_hidden: width of the image features.
        cross: this layer cross-attends to the image.
    """

    def __init__(self, config, qcfg: QFormerConfig, vision_hidden: int, linears, tp_group, cross):
        super().__init__(config=config)
        col, row = linears
        h, f = qcfg.hidden_size, qcfg.intermediate_size
        self.attention = QFormerAttention(config, qcfg, h, linears, tp_group)
        self.crossattention = (
            QFormerAttention(config, qcfg, vision_hidden, linears, tp_group) if cross else None
        )
        self.intermediate = col(
            h,
            f,
            config=config,
            init_method=config.init_method,
            bias=True,
            gather_output=False,
            tp_group=tp_group,
        )
        self.output = row(
            f,
            h,
            config=config,
            init_method=config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=tp_group,
        )
        self.output_layernorm = _layernorm(config, qcfg)
        self.activation = PROJECTOR_ACTIVATION_FUNCS[qcfg.activation]
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        # x [Q, N, h], image [T, N, h_v] -> [Q, N, h]
        x = self.attention(x, x)
        if self.crossattention is not None:
            x = self.crossattention(x, image)
        y, _ = self.intermediate(x)  # [Q, N, f/tp]
        y, _ = self.output(self.activation(y))  # [Q, N, h]
        return self.output_layernorm(y + x)


@register_projector("qformer")
class QFormerProjector(Projector):
    """Q-Former + language projection: ``[N, T, h_v] -> [N, num_query_tokens, h_lm]``."""

    def __init__(self, config, pcfg, vision_hidden, pg_collection):
        super().__init__(config=config)
        qcfg = pcfg.qformer
        tp = config.tensor_model_parallel_size
        for name in ("num_attention_heads", "intermediate_size"):
            if getattr(qcfg, name) % tp:
                raise ValueError(
                    f"projector.qformer.{name}={getattr(qcfg, name)} is not divisible by TP={tp}"
                )
        linears = projector_linears(pcfg.spec)
        self.tp_group = pg_collection.tp
        h = qcfg.hidden_size
        self.query_tokens = torch.nn.Parameter(
            torch.empty(1, qcfg.num_query_tokens, h, dtype=config.params_dtype)
        )  # [1, Q, h], HF's shape
        torch.nn.init.normal_(self.query_tokens, std=config.init_method_std)
        self.layernorm = _layernorm(config, qcfg)
        self.layers = QFormerLayers(
            QFormerLayer(
                config,
                qcfg,
                vision_hidden,
                linears,
                self.tp_group,
                cross=i % qcfg.cross_attention_frequency == 0,
            )
            for i in range(qcfg.num_layers)
        )
        self.language_projection = linears[0](
            h,
            config.hidden_size,
            config=config,
            init_method=config.init_method,
            bias=pcfg.bias,
            gather_output=False,
            tp_group=self.tp_group,
        )

    @classmethod
    def num_output_tokens(cls, pcfg, tokens_in):
        return pcfg.qformer.num_query_tokens

    @classmethod
    def matmul_params(cls, pcfg, vision_hidden, lm_hidden):
        """Weights each query meets outside attention (cross K/V are per image token)."""
        q = pcfg.qformer
        h, f = q.hidden_size, q.intermediate_size
        per_layer = 4 * h * h + 2 * h * f  # self q, k, v, dense; MLP
        return q.num_layers * per_layer + q.num_cross_layers * 2 * h * h + h * lm_hidden

    @classmethod
    def forward_flops(cls, pcfg, vision_hidden, lm_hidden, tokens_in):
        """Queries ``Q``, image tokens ``T``, width ``h``: the query-side matmuls
        ``2 * Q * matmul_params``; per cross layer the image keys/values ``2 * T * 2 h_v h``; and
        attention ``4 * Q^2 h`` per layer (self) plus ``4 * Q T h`` per cross layer."""
        q = pcfg.qformer
        n, h = q.num_query_tokens, q.hidden_size
        linear = 2 * n * cls.matmul_params(pcfg, vision_hidden, lm_hidden)
        kv = q.num_cross_layers * 2 * tokens_in * 2 * vision_hidden * h
        attn = q.num_layers * 4 * n * n * h + q.num_cross_layers * 4 * n * tokens_in * h
        return linear + kv + attn

    @classmethod
    def activation_elements(cls, pcfg, vision_hidden, lm_hidden, tokens_in, tp):
        """Elements one image's forward keeps for backward (the planner's estimate).

        The image features ``T h_v`` (the cross-attention K/V input) and the queries' LayerNorm
        and projection inputs ``2 Q h``; per attention block over ``kv`` keys: its input and
        LayerNorm input ``2 Q h``, q/k/v ``(Q + 2 kv) h / t``, the attention output ``Q h / t``
        and log-sum-exp ``Q nh / t``; per MLP: input and LayerNorm input ``2 Q h`` plus the
        fc1 output and activation ``2 Q f / t``.
        """
        q = pcfg.qformer
        n, h, f, t = q.num_query_tokens, q.hidden_size, q.intermediate_size, tp
        nh = q.num_attention_heads

        def attention(kv: int) -> float:
            return 2 * n * h + (n + 2 * kv) * h / t + n * h / t + n * nh / t

        mlp = 2 * n * h + 2 * n * f / t
        layers = q.num_layers * (attention(n) + mlp) + q.num_cross_layers * attention(tokens_in)
        return tokens_in * vision_hidden + 2 * n * h + layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = x.transpose(0, 1)  # [N, T, h_v] -> [T, N, h_v]
        n = image.shape[1]
        q = self.layernorm(self.query_tokens.transpose(0, 1).expand(-1, n, -1))  # [Q, N, h]
        for layer in self.layers:
            q = layer(q, image)
        out, _ = self.language_projection(q)  # [Q, N, h_lm/tp]
        out = tensor_parallel.gather_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out.transpose(0, 1).contiguous()  # [N, Q, h_lm]
