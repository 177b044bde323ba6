"""The Q-Former connector from a transformers BLIP-2 / InstructBLIP checkpoint (MiniGPT-4's init).

MiniGPT-4 initialised its connector from BLIP-2's trained Q-Former and query tokens; this module
does the same for the ``qformer`` projector (:mod:`mm_megatron.model.projector_qformer`):

* :func:`qformer_config_from_hf`: ``Blip2Config`` / ``InstructBlipConfig`` -> ``QFormerConfig``;
* :class:`QFormerNaming`: stored HF keys <-> our projector's parameter names (one to one);
* :func:`hf_qformer_tensors`: an HF state dict (in memory) -> ``{our name: tensor}``;
* :func:`read_hf_qformer`: the same from a checkpoint directory (only the Q-Former's tensors are
  read);
* :func:`init_qformer`: fresh projector tensors overwritten by the HF ones, with every name and
  shape checked. ``language_projection`` is taken only when its shape fits (BLIP-2's LM has the
  same width as ours); otherwise it stays freshly initialised and a note says so.

``mm-megatron convert assemble --qformer-from DIR`` uses these (:mod:`.assemble`).

HF key -> ours (``L`` = ``qformer.encoder.layer.{i}.``; an optional leading ``model.`` is
accepted)::

    query_tokens                              query_tokens
    qformer[.embeddings].layernorm.*          layernorm.*  (InstructBLIP: .embeddings)
    L attention.attention.{query,key,value}.* layers.{i}.attention.{query,key,value}.*
    L attention.output.dense.*                layers.{i}.attention.dense.*
    L attention.output.LayerNorm.*            layers.{i}.attention.layernorm.*
    L crossattention.(same)                   layers.{i}.crossattention.(same)
    L intermediate_query.dense.*              layers.{i}.intermediate.*
    L output_query.dense.*                    layers.{i}.output.*
    L output_query.LayerNorm.*                layers.{i}.output_layernorm.*
    language_projection.*                     language_projection.*

Not used: the vision tower and LM of the checkpoint, and InstructBLIP's instruction-text path
(``qformer.embeddings.word/position_embeddings``, ``L intermediate.*``, ``L output.*``): the
connector runs the queries alone, which is what both models do without an instruction.
Not here: the export back to HF, and the EVA vision tower (:mod:`.blip2_vision`, which
``convert assemble --vision BLIP2_DIR`` uses).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mm_megatron.checkpoint.errors import ConversionError, UnsupportedModelError
from mm_megatron.config.qformer_config import QFormerConfig

MODEL_TYPES = ("blip-2", "instructblip")
"""HF ``model_type`` values whose ``qformer`` + ``query_tokens`` this module reads."""

_LAYER = {  # HF suffix after "qformer.encoder.layer.{i}." -> ours after "layers.{i}."
    "intermediate_query.dense.": "intermediate.",
    "output_query.dense.": "output.",
    "output_query.LayerNorm.": "output_layernorm.",
}
for _att in ("attention", "crossattention"):
    for _lin in ("query", "key", "value"):
        _LAYER[f"{_att}.attention.{_lin}."] = f"{_att}.{_lin}."
    _LAYER[f"{_att}.output.dense."] = f"{_att}.dense."
    _LAYER[f"{_att}.output.LayerNorm."] = f"{_att}.layernorm."
_LAYER_RE = re.compile(r"qformer\.encoder\.layer\.(\d+)\.(.*)")
_OURS_LAYER_RE = re.compile(r"layers\.(\d+)\.(.*)")


@dataclass(frozen=True)
class QFormerNaming:
    """Stored keys of a BLIP-2 / InstructBLIP checkpoint <-> our projector's parameter names."""

    prefix: str = ""
    """``model.`` or empty, in front of every stored key."""
    embeddings_layernorm: bool = False
    """InstructBLIP keeps the query LayerNorm in ``qformer.embeddings.layernorm``."""

    def to_canonical(self, key: str) -> str | None:
        """Stored key -> our parameter name; None for tensors the connector does not use."""
        if not key.startswith(self.prefix):
            return None
        key = key[len(self.prefix) :]
        if key == "query_tokens" or key.startswith("language_projection."):
            return key
        for norm in ("qformer.layernorm.", "qformer.embeddings.layernorm."):
            if key.startswith(norm):
                return "layernorm." + key[len(norm) :]
        m = _LAYER_RE.fullmatch(key)
        if m:
            for hf, ours in _LAYER.items():
                if m.group(2).startswith(hf):
                    return f"layers.{m.group(1)}.{ours}{m.group(2)[len(hf) :]}"
        return None

    def to_file(self, name: str) -> str:
        """Our parameter name -> stored key."""
        if name.startswith("layernorm."):
            norm = "qformer.embeddings." if self.embeddings_layernorm else "qformer."
            return self.prefix + norm + name
        m = _OURS_LAYER_RE.fullmatch(name)
        if m:
            for hf, ours in _LAYER.items():
                if m.group(2).startswith(ours):
                    rest = m.group(2)[len(ours) :]
                    return f"{self.prefix}qformer.encoder.layer.{m.group(1)}.{hf}{rest}"
        return self.prefix + name

    @classmethod
    def detect(cls, keys) -> QFormerNaming:
        """The naming of a checkpoint's key set."""
        keys = list(keys)
        prefix = "model." if any(k.startswith("model.qformer.") for k in keys) else ""
        emb = any(k.startswith(prefix + "qformer.embeddings.layernorm.") for k in keys)
        return cls(prefix, emb)


def qformer_config_from_hf(config, where: str = "") -> QFormerConfig:
    """Our ``QFormerConfig`` of an HF ``Blip2Config`` / ``InstructBlipConfig``.

    Raises:
        UnsupportedModelError: another model type, or a Q-Former we do not build.
    """
    mtype = getattr(config, "model_type", None)
    if mtype not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"{where}model_type={mtype!r}: a Q-Former comes from one of {MODEL_TYPES}"
        )
    q = config.qformer_config
    if getattr(q, "position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(
            f"{where}qformer_config.position_embedding_type={q.position_embedding_type!r} is not "
            "supported (only 'absolute', which the queries do not use)"
        )
    from mm_megatron.config.model_config import PROJECTOR_ACTIVATIONS

    if q.hidden_act not in PROJECTOR_ACTIVATIONS:
        raise UnsupportedModelError(
            f"{where}qformer_config.hidden_act={q.hidden_act!r}; supported: {PROJECTOR_ACTIVATIONS}"
        )
    return QFormerConfig(
        num_query_tokens=int(config.num_query_tokens),
        hidden_size=int(q.hidden_size),
        num_layers=int(q.num_hidden_layers),
        num_attention_heads=int(q.num_attention_heads),
        intermediate_size=int(q.intermediate_size),
        cross_attention_frequency=int(q.cross_attention_frequency),
        activation=q.hidden_act,
        layernorm_eps=float(q.layer_norm_eps),
    )


def encoder_width(config) -> int:
    """Width of the image features the HF Q-Former cross-attends to."""
    return int(config.qformer_config.encoder_hidden_size)


def hf_qformer_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{our parameter name: tensor}`` from an HF model's ``state_dict()``."""
    naming = QFormerNaming.detect(state)
    out = {}
    for key, t in state.items():
        name = naming.to_canonical(key)
        if name is not None:
            out[name] = t
    return out


def read_hf_qformer(hf_dir: Path) -> tuple[QFormerConfig, int, dict[str, torch.Tensor]]:
    """(Q-Former shape, encoder width, ``{our name: tensor}``) of a BLIP-2/InstructBLIP dir."""
    from transformers import AutoConfig

    from mm_megatron.convert.common import HFCheckpoint

    hf_dir = Path(hf_dir)
    cfg_file = hf_dir / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{cfg_file}: not found (--qformer-from needs an HF model dir)")
    where = f"{cfg_file}: "
    mtype = json.loads(cfg_file.read_text()).get("model_type")
    if mtype not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"{where}model_type={mtype!r}: a Q-Former comes from one of {MODEL_TYPES}"
        )
    config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    qcfg = qformer_config_from_hf(config, where)
    ck = HFCheckpoint(hf_dir, QFormerNaming.detect)
    return qcfg, encoder_width(config), {k: ck.read(k) for k in ck.infos}


def init_qformer(
    fresh: Mapping[str, torch.Tensor],
    hf: Mapping[str, torch.Tensor],
    *,
    prefix: str = "",
    where: str = "the Q-Former checkpoint",
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``fresh`` (our projector's tensors, names under ``prefix``) with the HF tensors put in.

    Args:
        fresh: a newly built ``qformer`` projector's ``{prefix + name: tensor}``.
        hf: ``{name: tensor}`` from :func:`hf_qformer_tensors` / :func:`read_hf_qformer`.
        prefix: the projector's prefix in ``fresh`` (``vision_projection.`` in a checkpoint).
        where: the source, for messages.

    Returns:
        (the tensors, notes).

    Raises:
        ConversionError: a tensor is missing or has another shape (one line, naming it).
    """
    out, notes = dict(fresh), []
    for full, t in fresh.items():
        name = full.removeprefix(prefix)
        src = hf.get(name)
        if name.startswith("language_projection."):
            if src is None or src.shape != t.shape:
                got = "absent" if src is None else tuple(src.shape)
                notes.append(
                    f"{name} kept freshly initialised: {where} has {got}, the LM needs "
                    f"{tuple(t.shape)}"
                )
                continue
        elif src is None:
            hf_key = QFormerNaming().to_file(name)
            raise ConversionError(f"{where}: tensor {hf_key!r} (for {name!r}) not found")
        elif src.shape != t.shape:
            raise ConversionError(
                f"{where}: tensor for {name!r} has shape {tuple(src.shape)}, the connector needs "
                f"{tuple(t.shape)} (check projector.qformer and the vision width)"
            )
        out[full] = src.to(t.dtype).clone()
    return out, notes


def use_hf_qformer(cfg, hf_dir: Path) -> dict[str, torch.Tensor]:
    """Make ``cfg``'s projector the Q-Former of ``hf_dir`` and return its tensors (our names).

    Raises:
        ConversionError: the Q-Former cross-attends to another width than ``cfg``'s vision
            encoder gives, or the checkpoint is not a BLIP-2 / InstructBLIP.
    """
    qcfg, width, tensors = read_hf_qformer(hf_dir)
    if width != cfg.vision.feature_width:
        raise ConversionError(
            f"{Path(hf_dir) / 'config.json'} qformer_config.encoder_hidden_size={width}, but the "
            f"vision encoder gives features of width {cfg.vision.feature_width}"
        )
    cfg.projector.type = "qformer"
    cfg.projector.qformer = qcfg
    try:
        cfg.validate()
    except ValueError as e:
        raise UnsupportedModelError(f"{Path(hf_dir) / 'config.json'}: {e}") from None
    return tensors
