"""HF <-> megatron-core checkpoint conversion for LLaVA models.

Public API (imports are lazy so ``mm_megatron.checkpoint.errors`` stays light):

* :func:`mm_megatron.convert.hf_to_mcore.hf_to_mcore` — HF dir -> mm_megatron checkpoint dir.
* :func:`mm_megatron.convert.mcore_to_hf.mcore_to_hf` — mm_megatron checkpoint dir -> HF dir.
* :func:`mm_megatron.convert.verify.verify` — config / weights / logits-parity checks.

Modules: ``hf_config`` (HF config <-> LlavaConfig), ``keys`` (key spellings), ``mapping`` (one
rule per megatron parameter: QKV interleave, SwiGLU, vocab padding), ``safetensors_io``
(streaming reader/writer), ``common`` (HF reader, meta model, atomic output), ``testing`` (tiny
HF checkpoints). The checkpoint directory format lives in :mod:`mm_megatron.checkpoint.model_io`.
"""

from __future__ import annotations

__all__ = ["hf_to_mcore", "mcore_to_hf", "verify"]


def __getattr__(name: str):
    if name == "hf_to_mcore":
        from mm_megatron.convert.hf_to_mcore import hf_to_mcore

        return hf_to_mcore
    if name == "mcore_to_hf":
        from mm_megatron.convert.mcore_to_hf import mcore_to_hf

        return mcore_to_hf
    if name == "verify":
        from mm_megatron.convert.verify import verify

        return verify
    raise AttributeError(name)
