"""Turn mm_megatron model configs + a parallel layout into megatron-core ``TransformerConfig``s.

One function per stack. This is the only place where our dataclasses meet megatron's config, so
the mapping (activations, norms, biases, RoPE, GQA, fusions off, activation recompute) is
reviewable in one screen. The fields that differ between a CPU (gloo) and a CUDA run come from the
CPU runtime's one switch (``mm_megatron.runtime.cpu_runtime.transformer_config_accommodations``);
nothing here asks torch where it runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.activations import quick_gelu
from megatron.core.transformer.transformer_config import TransformerConfig

from mm_megatron.config.model_config import LanguageConfig, LlavaConfig, VisionConfig
from mm_megatron.config.parallel_config import ParallelConfig
from mm_megatron.config.vit_styles import vit_style
from mm_megatron.runtime import cpu_runtime

gelu_tanh = functools.partial(F.gelu, approximate="tanh")

PROJECTOR_ACTIVATION_FUNCS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "relu": F.relu,
}
"""`ProjectorConfig.activation` name -> function (the HF ``ACT2FN`` entries of those names)."""


def _common(par: ParallelConfig, dtype: torch.dtype, init_std: float) -> dict[str, Any]:
    return dict(
        tensor_model_parallel_size=par.tp,
        context_parallel_size=par.cp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        init_method_std=init_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fusions need CUDA kernels (apex/TE); the unfused paths are exact and run everywhere.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        # CPU initialisation and unbatched pipeline p2p on the CPU runtime (gloo).
        **cpu_runtime.transformer_config_accommodations(),
    )


@dataclass(frozen=True)
class Recompute:
    """Activation recompute of the language model, set in its TransformerConfig at build time.

    Attributes:
        granularity: None (off), ``full`` (whole layers) or ``selective`` (core attention only;
            megatron's ``recompute_modules`` default ``["core_attn"]``).
        method: ``uniform`` or ``block``; full recompute only.
        num_layers: Layers per recompute unit (uniform) or recomputed layers per stage (block);
            full recompute only.
    """

    granularity: str | None = None
    method: str | None = None
    num_layers: int | None = None

    def config_kwargs(self) -> dict[str, Any]:
        """The ``recompute_*`` TransformerConfig fields (megatron validates them)."""
        full = self.granularity == "full"
        return dict(
            recompute_granularity=self.granularity,
            recompute_method=self.method if full else None,
            recompute_num_layers=self.num_layers if full else None,
        )


def lm_transformer_config(
    cfg: LlavaConfig,
    par: ParallelConfig,
    dtype: torch.dtype = torch.float32,
    recompute: Recompute | None = None,
) -> TransformerConfig:
    """Config of the language decoder (pipelined over ``par.pp`` stages).

    Args:
        cfg: The model.
        par: The parallel layout.
        dtype: Parameter dtype.
        recompute: Activation recompute of the decoder layers (default off).
    """
    lm: LanguageConfig = cfg.lm
    return TransformerConfig(
        **_common(par, dtype, cfg.init_method_std),
        **(recompute or Recompute()).config_kwargs(),
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.virtual_pp,
        num_layers_in_first_pipeline_stage=par.first_stage_lm_layers,
        num_layers_in_last_pipeline_stage=par.last_stage_lm_layers,
        sequence_parallel=par.sequence_parallel,
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        ffn_hidden_size=lm.ffn_hidden_size,
        num_attention_heads=lm.num_attention_heads,
        num_query_groups=lm.kv_groups,
        kv_channels=lm.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=lm.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=lm.qkv_bias,
        # Every micro-batch may have its own length (image expansion, packing); megatron then
        # sends each activation's shape before it. With virtual stages the schedule pads all
        # micro-batches to one length (`parallel/schedule.py`), so shapes are fixed and not sent.
        # NOTE: the interleaved schedule's batched shape exchange deadlocks on gloo at PP=4.
        variable_seq_lengths=not par.virtual_pp,
        moe_token_dispatcher_type="alltoall",
        # Loss = sum over tokens; finalize_model_grads divides by the global token count.
        calculate_per_token_loss=True,  # no MoE; megatron rejects the default with the above
    )


def vision_transformer_config(
    cfg: LlavaConfig, par: ParallelConfig, dtype: torch.dtype = torch.float32
) -> TransformerConfig:
    """Config of the ViT: never pipelined (it lives on the first stage), never CP-split; TP and SP
    follow the LM."""
    v: VisionConfig = cfg.vision
    vpar = ParallelConfig(tp=par.tp, pp=1, cp=1, sequence_parallel=par.sequence_parallel)
    common = _common(vpar, dtype, cfg.init_method_std)
    return TransformerConfig(
        **common,
        pipeline_model_parallel_size=1,
        sequence_parallel=par.sequence_parallel,
        num_layers=v.num_layers_built,
        hidden_size=v.hidden_size,
        ffn_hidden_size=v.ffn_hidden_size,
        num_attention_heads=v.num_attention_heads,
        kv_channels=v.hidden_size // v.num_attention_heads,
        normalization=v.norm,
        layernorm_epsilon=v.layernorm_eps,
        gated_linear_unit=False,
        # the style's own when unset: clip quick_gelu, siglip gelu-tanh, internvit/blip2 gelu
        activation_func=PROJECTOR_ACTIVATION_FUNCS[
            v.activation or vit_style(v.vit_style).activation
        ],
        add_bias_linear=True,
        add_qkv_bias=v.qkv_bias,
        qk_layernorm=v.qk_norm,  # the norm itself comes with the encoder's spec
    )


def projector_transformer_config(
    cfg: LlavaConfig, par: ParallelConfig, dtype: torch.dtype = torch.float32
) -> TransformerConfig:
    """Config of the projector MLP: hidden = LM width, ffn = projector inner width."""
    vpar = ParallelConfig(tp=par.tp, pp=1, cp=1, sequence_parallel=False)
    return TransformerConfig(
        **_common(vpar, dtype, cfg.init_method_std),
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        num_layers=1,
        hidden_size=cfg.lm.hidden_size,
        ffn_hidden_size=cfg.projector.hidden_size or cfg.lm.hidden_size,
        num_attention_heads=par.tp,  # unused by the MLP; megatron requires TP to divide it
        gated_linear_unit=False,
        activation_func=PROJECTOR_ACTIVATION_FUNCS[cfg.projector.activation],
        add_bias_linear=cfg.projector.bias,
    )


def rope_kwargs(lm: LanguageConfig) -> dict[str, Any]:
    """GPTModel RoPE arguments for ``lm.rope_theta`` / ``lm.rope_scaling``."""
    kw: dict[str, Any] = dict(position_embedding_type="rope", rotary_base=int(lm.rope_theta))
    rs = lm.rope_scaling
    if rs is None:
        return kw
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        kw["seq_len_interpolation_factor"] = float(rs["factor"])
    elif kind == "llama3":
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
        for k, want in fixed.items():
            if float(rs.get(k, want)) != want:
                raise ValueError(
                    f"lm.rope_scaling.{k}={rs[k]} unsupported: megatron-core's llama3 scaling "
                    f"fixes {k}={want}"
                )
        if int(rs.get("original_max_position_embeddings", 8192)) != 8192:
            raise ValueError(
                "lm.rope_scaling.original_max_position_embeddings must be 8192 for megatron-core"
            )
        kw["rope_scaling"] = True
        kw["rope_scaling_factor"] = float(rs["factor"])
    else:
        raise ValueError(f"lm.rope_scaling type {kind!r} unsupported")
    return kw
