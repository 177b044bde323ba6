"""HF <-> megatron-core checkpoint conversion for LLaVA models.

Public API (imports are lazy, so importing the package is cheap):

* :func:`mm_megatron.convert.hf_to_mcore.hf_to_mcore` — HF LLaVA dir -> mm_megatron checkpoint.
* :func:`mm_megatron.convert.assemble.assemble` — HF vision tower + HF causal LM + a fresh
  projector -> mm_megatron checkpoint (the start of stage-1 pretraining).
* :func:`mm_megatron.convert.mcore_to_hf.mcore_to_hf` — mm_megatron checkpoint -> HF LLaVA dir, or
  (:func:`mm_megatron.convert.export_parts.mcore_to_hf_parts`) the HF vision model and causal LM.
* :func:`mm_megatron.convert.verify.verify` — config / weights / logits-parity checks against an
  HF LLaVA; :func:`mm_megatron.convert.verify_parts.verify_parts` — vision features and LM logits
  against the two parts.

Modules: ``hf_config`` (HF configs <-> our configs), ``keys`` (key spellings of LLaVA and of the
parts), ``mapping`` (one rule per megatron parameter: QKV interleave, SwiGLU, vocab padding),
``common`` (HF reader, meta model, atomic output), ``parts`` (the assemble inputs: kinds,
tokenizer, image processor), ``tiny_models`` (tiny random HF checkpoints for the walkthroughs and
tests). Below this package: the checkpoint directory format, the safetensors reader/writer and
the error types (:mod:`mm_megatron.checkpoint`).
"""

from __future__ import annotations

__all__ = ["assemble", "hf_to_mcore", "mcore_to_hf", "verify"]


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
    if name == "assemble":
        from mm_megatron.convert.assemble import assemble

        return assemble
    raise AttributeError(name)
