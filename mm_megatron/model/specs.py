"""ModuleSpecs for the transformer stacks: ``local`` (PyTorch + our SDPA) and ``te``.

TE vs local is only a spec choice: the same model classes take either. The local spec uses
:class:`~mm_megatron.model.norm.LocalNorm` (sequence-parallel capable) and
:class:`~mm_megatron.model.attention.SDPAttention` (packed + context parallel capable) with
megatron's own Column/RowParallelLinear; it needs neither TE nor apex. The TE spec is megatron's
(fused LayerNorm+linear, ``TEDotProductAttention``) and is imported lazily, so importing this module
never requires Transformer Engine.

Parameter names: TE fuses the pre-attention / pre-MLP norms into ``linear_qkv.layer_norm_weight`` /
``linear_fc1.layer_norm_weight``; the local spec keeps ``input_layernorm.weight`` /
``pre_mlp_layernorm.weight`` and maps them to the TE names in ``sharded_state_dict`` (as megatron's
own local spec does), so distributed checkpoints load across specs.
"""

from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from mm_megatron.model.attention import SDPAttention
from mm_megatron.model.norm import LocalNorm
from mm_megatron.runtime.startup_warnings import importable

_TE_NORM_NAMES = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def have_te() -> bool:
    """Whether Transformer Engine's PyTorch extension imports."""
    return importable("transformer_engine.pytorch")


def _require_te(what: str) -> None:
    if not have_te():
        raise RuntimeError(
            f"{what}: spec 'te' needs Transformer Engine (pip install 'mm_megatron[te]', GPU "
            "only); use spec 'local' on CPU"
        )


def _layer(
    mask: AttnMaskType,
    *,
    norm: type,
    qkv: type,
    core: type,
    proj: type,
    fc1: type,
    fc2: type,
    keys_map: dict[str, str] | None = None,
) -> ModuleSpec:
    """A pre-norm transformer layer; ``norm`` is IdentityOp when fused into ``qkv``/``fc1``."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=core,
                    linear_proj=proj,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            # NOTE: megatron builds the MLP through this classmethod; handing it a
            # ModuleSpec(module=MLP) makes it rewrap the spec (and log that) on every build.
            mlp=partial(
                MLP.as_mlp_submodule, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2)
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map or {},
        ),
    )


def _local_layer(mask: AttnMaskType) -> ModuleSpec:
    col, row = ColumnParallelLinear, RowParallelLinear
    return _layer(
        mask,
        norm=LocalNorm,
        qkv=col,
        core=SDPAttention,
        proj=row,
        fc1=col,
        fc2=row,
        keys_map=dict(_TE_NORM_NAMES),
    )


def _te_layer(mask: AttnMaskType) -> ModuleSpec:
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    fused, row = TELayerNormColumnParallelLinear, TERowParallelLinear
    return _layer(
        mask,
        norm=IdentityOp,
        qkv=fused,
        core=TEDotProductAttention,
        proj=row,
        fc1=fused,
        fc2=row,
    )


def lm_layer_spec(spec: str) -> ModuleSpec:
    """Decoder layer of the language model (causal attention)."""
    if spec == "te":
        _require_te("lm")
        return _te_layer(AttnMaskType.causal)
    if spec == "local":
        return _local_layer(AttnMaskType.causal)
    raise ValueError(f"unknown lm spec {spec!r} (local|te)")


def vit_layer_spec(spec: str, padded: bool = False) -> ModuleSpec:
    """Encoder layer of the vision transformer (bidirectional attention).

    Args:
        spec: local or te.
        padded: the sequence carries padding keys to mask (sequence parallel pads the ViT's
            sequence to a multiple of TP), so attention takes a padding mask.
    """
    mask = AttnMaskType.padding if padded else AttnMaskType.no_mask
    if spec == "te":
        _require_te("vision")
        return _te_layer(mask)
    if spec == "local":
        return _local_layer(mask)
    raise ValueError(f"unknown vision spec {spec!r} (local|te)")


def projector_linears(spec: str) -> tuple[type, type]:
    """(column-parallel, row-parallel) linear classes for the projector."""
    if spec == "te":
        _require_te("projector")
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TERowParallelLinear,
        )

        return TEColumnParallelLinear, TERowParallelLinear
    if spec == "local":
        return ColumnParallelLinear, RowParallelLinear
    raise ValueError(f"unknown projector spec {spec!r} (local|te)")


def block_spec(
    layer: ModuleSpec,
    spec: str,
    config: TransformerConfig,
    *,
    vp_stage: int | None = None,
    pp_rank: int = 0,
) -> TransformerBlockSubmodules:
    """This stage's block: its layers plus the final norm of the chosen spec.

    NOTE: handing megatron a bare layer spec would build the block's final norm from megatron's
    default ``LayerNormImpl`` (``WrappedTorchNorm`` without apex), which refuses sequence
    parallelism; so the block spec is explicit.
    """
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if spec == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        norm = TENorm
    else:
        norm = LocalNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=norm)
