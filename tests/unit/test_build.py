"""The build function owns layout and rank knowledge: model code imports no process-group API,
ranks and recompute arrive through the build, one process."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mm_megatron.model
from mm_megatron.config import ParallelConfig, get_preset
from mm_megatron.model.build import build_llava_model
from mm_megatron.model.transformer_configs import Recompute, lm_transformer_config

_FORBIDDEN = ("torch.distributed", "megatron.core.parallel_state")


def _imports(path: Path) -> set[str]:
    """Every module a file imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_only_the_build_function_imports_process_group_apis():
    root = Path(mm_megatron.model.__file__).parent
    offenders = {
        p.name: sorted(m for m in _imports(p) if m.startswith(_FORBIDDEN))
        for p in sorted(root.glob("*.py"))
        if p.name != "build.py"
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert any(m.startswith(_FORBIDDEN) for m in _imports(root / "build.py"))


def test_ranks_come_from_the_build(single_rank):
    model = build_llava_model(get_preset("debug-tiny"))
    assert (model.tp_rank, model.padder.cp_rank) == (0, 0)
    assert model.pre_process and model.post_process and model.vision_model is not None


@pytest.mark.parametrize(
    "recompute, want",
    [
        (None, (None, None, None)),
        (Recompute("full", "uniform", 2), ("full", "uniform", 2)),
        (Recompute("full", "block", 1), ("full", "block", 1)),
        (Recompute("selective", "uniform", 3), ("selective", None, None)),
    ],
)
def test_recompute_is_set_where_the_config_is_built(recompute, want):
    c = lm_transformer_config(get_preset("debug-tiny"), ParallelConfig(), recompute=recompute)
    assert (c.recompute_granularity, c.recompute_method, c.recompute_num_layers) == want


def test_selective_recompute_reaches_the_attention_modules(single_rank):
    from megatron.core.transformer.attention import SelfAttention

    def flags(recompute):
        model = build_llava_model(get_preset("debug-tiny"), recompute=recompute)
        lm = [m for m in model.language_model.modules() if isinstance(m, SelfAttention)]
        vit = [m for m in model.vision_model.modules() if isinstance(m, SelfAttention)]
        assert lm and vit
        return {m.checkpoint_core_attention for m in lm}, {m.checkpoint_core_attention for m in vit}

    assert flags(None) == ({False}, {False})
    with pytest.warns(UserWarning, match="core_attn"):  # megatron's note about fused TE attention
        assert flags(Recompute("selective")) == ({True}, {False})  # the LM only


def test_vision_encoders_are_found_by_style():
    from mm_megatron.model.vision import (
        VisionEncoder,
        register_vision_encoder,
        vision_encoder_class,
    )

    assert vision_encoder_class("clip") is VisionEncoder is vision_encoder_class("siglip")
    with pytest.raises(ValueError, match=r"vision.style='nope'; choose one of \['blip2', 'clip', "):
        vision_encoder_class("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_vision_encoder("clip")(VisionEncoder)
