"""``convert verify-parts``: check an assembled checkpoint against the two HF parts it came from.

Two checks, printed as ``convert verify``'s pass/fail table, with our model loaded from the
checkpoint at TP x PP (fp32, local spec; more than one rank runs as local gloo processes):

1. **vision features**: our vision encoder's output on random images equals transformers' vision
   model's ``hidden_states[vision_feature_layer]`` (``last_hidden_state`` where the final
   LayerNorm is applied: BLIP-2; class token dropped where the checkpoint drops it), fp32 eager
   attention: max |difference| <= ``atol``.
2. **LM logits**: our model's logits on text-only input (random ids of the LM's own vocabulary,
   never the image placeholder)
   equal the HF causal LM's on the LM's original vocabulary (the columns past it belong to the
   added tokens): max |difference| <= ``atol`` and identical argmax.

The projector is new, so there is nothing to compare it with. Memory: transformers' vision model,
then its LM, and our model are each held in fp32 (the HF ones one at a time, before ours).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from mm_megatron.checkpoint import model_io
from mm_megatron.convert.common import single_rank
from mm_megatron.convert.parts import read_vision_part
from mm_megatron.convert.verify import Check, forward_logits

_VISION_MODELS = {  # part class (substring) -> the transformers vision model of its tower
    "Siglip": "SiglipVisionModel",
    "InstructBlip": "InstructBlipVisionModel",
    "Blip2": "Blip2VisionModel",
}
_UNNESTED = ("InstructBlipVisionModel", "Blip2VisionModel")


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' load reports (e.g. a CLIPModel's unused text half) are not our output."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


@torch.no_grad()
def hf_references(vision_dir: Path, lm_dir: Path, cfg, seed: int = 0, text_len: int = 12):
    """(inputs, references) from transformers: ``images``/``input_ids`` and the vision features
    [N, T, h_v] and LM logits [b, s, original vocab] (fp32)."""
    import transformers

    gen = torch.Generator().manual_seed(seed)
    v = cfg.vision
    images = torch.randn(2, v.num_channels, v.image_size, v.image_size, generator=gen)
    part = read_vision_part(vision_dir)
    name = next((c for k, c in _VISION_MODELS.items() if k in part.cls), "CLIPVisionModel")
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    vkw = dict(kw)
    if name in _UNNESTED and part.composite:  # a BLIP-2's vision half: no vision_model. level
        vkw["key_mapping"] = {r"^vision_model\.": ""}
    with _quiet_transformers():
        vision = getattr(transformers, name).from_pretrained(str(vision_dir), **vkw).eval()
        out = vision(pixel_values=images, output_hidden_states=True)
        # [N, s, k * h_v]: the feature layers, concatenated as the model does
        feats = torch.cat([out.hidden_states[i] for i in v.feature_layers], dim=-1)
        if v.apply_post_layernorm:  # only with the last layer read: BLIP-2's last_hidden_state
            feats = out.last_hidden_state
        if v.has_class_token and v.drop_class_token:
            feats = feats[:, 1:]
        del vision, out
        lm = transformers.AutoModelForCausalLM.from_pretrained(str(lm_dir), **kw).eval()
        ids = torch.randint(0, lm.config.vocab_size, (2, text_len), generator=gen)
        ids[ids == cfg.image_token_id] = 0  # an added token inside the LM's table (Qwen2)
        logits = lm(input_ids=ids, use_cache=False).logits.float()  # [b, s, V]
    return {"images": images, "input_ids": ids}, {"features": feats, "logits": logits}


def _ours(model, inputs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(vision features or None off the first stage, logits or None off the last stage)."""
    model.eval()
    feats = None
    if model.vision_model is not None:
        with torch.no_grad():
            feats = model.vision_model(inputs["images"])  # [N, T, h_v]
    ids = inputs["input_ids"]
    batch = {"images": None, "input_ids": ids, "num_images": torch.zeros(len(ids), dtype=int)}
    return feats, forward_logits(model, batch)


def _build(ckpt_dir: Path, par):
    from mm_megatron.model.build import build_llava_model

    cfg = copy.deepcopy(model_io.read_run_config(ckpt_dir).model)
    cfg.set_spec("local")  # weights are spec-independent; TE needs a GPU
    model = build_llava_model(cfg, par)
    model_io.load_checkpoint(model, ckpt_dir)
    return model


def _layout_worker(rank, world_size, ckpt_dir, inputs, tp, pp):
    """One rank of a TP x PP world: our outputs on the first TP/DP rank, Nones elsewhere."""
    from megatron.core import parallel_state as ps

    from mm_megatron.config.parallel_config import ParallelConfig
    from mm_megatron.runtime import distributed

    par = ParallelConfig(tp=tp, pp=pp)
    distributed.initialize(par)
    try:
        feats, logits = _ours(_build(Path(ckpt_dir), par), inputs)
        first = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        return (feats, logits) if first else (None, None)
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()


def our_outputs(ckpt_dir: Path, inputs: dict, tp: int = 1, pp: int = 1):
    """(vision features, logits) of our model at TP x PP (spawns TP*PP local ranks if > 1)."""
    if tp * pp == 1:
        from mm_megatron.config.parallel_config import ParallelConfig

        with single_rank():
            return _ours(_build(ckpt_dir, ParallelConfig()), inputs)
    from mm_megatron.runtime.spawn import run_world

    results = run_world(_layout_worker, tp * pp, str(ckpt_dir), inputs, tp, pp)
    feats = next(f for f, _ in results if f is not None)
    logits = next(lg for _, lg in results if lg is not None)
    return feats, logits


def compare(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float, argmax: bool) -> Check:
    """One table row: shapes, max |difference| and (for logits) argmax agreement."""
    if ours.shape != ref.shape:
        return Check(name, False, f"shape {list(ours.shape)} vs HF {list(ref.shape)}")
    diff = (ours.float() - ref.float()).abs().max().item()
    detail = f"max |diff| {diff:.3g} (atol {atol:g})"
    ok = diff <= atol
    if argmax:
        agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
        ok = ok and agree == 1.0
        detail += f", argmax agree {agree:.1%}"
    return Check(name, ok, detail)


def verify_parts(
    vision_dir: Path, lm_dir: Path, ckpt_dir: Path, *, tp: int = 1, pp: int = 1, atol=1e-4
) -> list[Check]:
    """Run both checks at TP x PP; returns the rows (see :func:`~.verify.format_table`)."""
    vision_dir, lm_dir, ckpt_dir = Path(vision_dir), Path(lm_dir), Path(ckpt_dir)
    cfg = model_io.read_run_config(ckpt_dir).model
    inputs, refs = hf_references(vision_dir, lm_dir, cfg)
    feats, logits = our_outputs(ckpt_dir, inputs, tp, pp)
    vocab = refs["logits"].shape[-1]
    layout = f"TP{tp}xPP{pp}"
    row = compare(f"LM logits {layout}", logits[..., :vocab], refs["logits"], atol, argmax=True)
    if logits.shape[-1] != cfg.lm.vocab_size:
        row = Check(row.name, False, f"{logits.shape[-1]} vocab columns, want {cfg.lm.vocab_size}")
    row.detail += f" on the LM's {vocab} of {cfg.lm.vocab_size} tokens"
    return [compare(f"vision features {layout}", feats, refs["features"], atol, False), row]
