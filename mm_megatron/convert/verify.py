"""``convert verify``: check an mm_megatron checkpoint against the HF checkpoint it came from.

Three checks, printed as a pass/fail table:

1. **config**: ``config.json`` maps to the same architecture as the checkpoint's run config.
2. **weights**: every HF tensor equals the checkpoint's (split back into HF layout, compared in
   the checkpoint's dtype, bit-exact), streaming one layer at a time; passthrough tensors too.
3. **logits**: transformers' model (``AutoModelForImageTextToText``: LLaVA, LLaVA-NeXT,
   LLaVA-OneVision, InternVL; fp32, eager attention) and our model loaded from the checkpoint at
   TP x PP (fp32, local spec) agree on a random batch of a
   few hundred tokens per sample (several images in order, a text-only sample, right padding;
   `verify_inputs.py`), placeholders expanded by the tower's real token count: max |logit
   difference| <= ``rtol`` x max |logit| (or ``atol``) and identical argmax. With TP*PP > 1 the
   layout runs on that many local gloo processes; pipeline stages go through megatron's own
   schedule.

The logits check holds two fp32 copies of the model in memory; skip it (``logits=False``) for
checkpoints too large for that.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from mm_megatron.checkpoint import model_io
from mm_megatron.checkpoint.errors import ConversionError
from mm_megatron.checkpoint.safetensors_io import read_header, read_tensor
from mm_megatron.convert.common import HFCheckpoint, single_rank
from mm_megatron.convert.hf_config import (
    HF_FAMILIES,
    architecture_dict,
    llava_config_from_hf,
    load_hf_config,
)
from mm_megatron.convert.keys import KeySpelling
from mm_megatron.convert.mapping import build_rules, groups_in_order


@dataclass
class Check:
    """One row of the verify table."""

    name: str
    ok: bool
    detail: str


def format_table(checks: list[Check]) -> str:
    """The pass/fail table ``convert verify`` prints."""
    w = max(len(c.name) for c in checks)
    lines = [f"{'check':<{w}}  result  detail", f"{'-' * w}  ------  ------"]
    for c in checks:
        lines.append(f"{c.name:<{w}}  {'PASS' if c.ok else 'FAIL':<6}  {c.detail}")
    verdict = "PASS" if all(c.ok for c in checks) else "FAIL"
    lines.append(f"overall: {verdict}")
    return "\n".join(lines)


# --- running our model at a layout ------------------------------------------------------------


def forward_logits(model, batch: dict) -> torch.Tensor | None:
    """Logits [b, s, vocab] of ``model`` (this rank's stage) on ``batch``; None off the last stage.

    Uses megatron's pipeline schedule (forward only) when PP > 1, a plain call otherwise.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.eval()
    with torch.no_grad():
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return model(**batch)
        plan = model.plan(
            batch["input_ids"],
            None,
            batch.get("num_images"),
            image_tokens=batch.get("image_tokens"),
        )

        def step(data_iterator, m):
            return m(**next(data_iterator)), None  # no loss_func: the output is collected

        out = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([batch]),
            model=[model],
            num_microbatches=1,
            seq_length=plan.seq_len,
            micro_batch_size=batch["input_ids"].shape[0],
            forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return out[0]


def layout_logits(ckpt_dir: Path, batch: dict, tp: int = 1, pp: int = 1) -> torch.Tensor | None:
    """Build our model at TP x PP on this rank, load ``ckpt_dir``, return logits (last stage).

    Requires torch.distributed to be initialised with a world size divisible by TP*PP.
    Returns the logits on the first TP/DP rank of the last stage, None elsewhere.
    """
    from megatron.core import parallel_state

    from mm_megatron.config.parallel_config import ParallelConfig
    from mm_megatron.model.build import build_llava_model
    from mm_megatron.runtime import distributed

    distributed.initialize(ParallelConfig(tp=tp, pp=pp))
    try:
        cfg = copy.deepcopy(model_io.read_run_config(ckpt_dir).model)
        cfg.set_spec("local")  # weights are spec-independent; TE needs a GPU
        model = build_llava_model(cfg, ParallelConfig(tp=tp, pp=pp))
        model_io.load_checkpoint(model, ckpt_dir)
        logits = forward_logits(model, batch)
        first = (
            parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0
        )
        return logits if logits is not None and first else None
    finally:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()


def _layout_worker(rank, world_size, ckpt_dir, batch, tp, pp):
    return layout_logits(ckpt_dir, batch, tp, pp)


# --- the checks -------------------------------------------------------------------------------


def _as_built(cfg) -> dict:
    """``architecture_dict`` with the vision tower as built: the layers up to the deepest feature
    layer, the feature layers as absolute indices and the final LayerNorm resolved (an export of
    a run trained here keeps only the built layers and reads the last one: the same model)."""
    d = architecture_dict(cfg)
    v = cfg.vision
    d["vision"]["num_layers"] = v.num_layers_built
    d["vision"]["feature_layer"] = list(v.feature_layers)
    d["vision"]["post_layernorm"] = v.apply_post_layernorm  # None: the style's default
    return d


def check_config(hf_dir: Path, run) -> Check:
    theirs, _ = llava_config_from_hf(load_hf_config(hf_dir))
    a, b = _as_built(theirs), _as_built(run.model)
    if a == b:
        return Check("config", True, "config.json matches the checkpoint's model config")
    for part in a:
        if a[part] != b.get(part):
            if isinstance(a[part], dict):
                diff = [k for k in a[part] if a[part][k] != b[part].get(k)]
                return Check("config", False, f"{part}.{diff[0]}: HF {a[part][diff[0]]!r} vs "
                             f"checkpoint {b[part].get(diff[0])!r}")  # fmt: skip
            return Check("config", False, f"{part}: HF {a[part]!r} vs checkpoint {b.get(part)!r}")
    return Check("config", False, "configs differ")


def check_weights(hf: HFCheckpoint, ckpt_dir: Path, run) -> Check:
    from mm_megatron.convert.mcore_to_hf import GroupLoader

    cfg = run.model
    rules = build_rules(cfg)
    missing = [k for r in rules for k in r.hf if k not in hf.infos]
    if missing:
        return Check("weights", False, f"HF checkpoint lacks {hf.spelling.to_file(missing[0])!r}")
    loader = GroupLoader(cfg, model_io.dist_checkpoint_dir(ckpt_dir))
    n, bad, worst = 0, [], 0.0
    for group in groups_in_order(rules):
        members = [r for r in rules if r.group == group]
        loaded = loader.load([r.param for r in members])
        for rule in members:
            for key, mine in zip(rule.hf, rule.to_hf(loaded.pop(rule.param))):
                ref = hf.read(key).to(mine.dtype)
                n += 1
                if ref.shape != mine.shape or not torch.equal(ref, mine):
                    bad.append(hf.file_keys[key])
                    if ref.shape == mine.shape:
                        worst = max(worst, (ref.float() - mine.float()).abs().max().item())
    passthrough = ckpt_dir / model_io.PASSTHROUGH
    if passthrough.is_file():
        spelling = KeySpelling.from_dict(run.source.get("key_spelling"))
        for fkey, info in read_header(passthrough)[0].items():
            key = spelling.to_canonical(fkey)
            n += 1
            if key not in hf.infos or not torch.equal(hf.read(key), read_tensor(info)):
                bad.append(fkey)
    if bad:
        return Check("weights", False, f"{len(bad)}/{n} tensors differ, e.g. {bad[0]!r} "
                     f"(max |diff| {worst:.3g})")  # fmt: skip
    return Check("weights", True, f"{n}/{n} tensors identical")


def check_logits(
    hf_dir: Path,
    ckpt_dir: Path,
    tp: int,
    pp: int,
    atol: float | None = None,
    seed: int = 0,
    rtol: float = 1e-5,
) -> Check:
    from transformers import AutoModelForImageTextToText  # LLaVA, InternVL

    from mm_megatron.convert.verify_inputs import (
        compare_logits,
        image_side,
        make_verify_inputs,
        tower_tokens_per_image,
    )

    name = f"logits TP{tp}xPP{pp}"
    model = AutoModelForImageTextToText.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    family = HF_FAMILIES[model.config.model_type]
    if family.verify_inputs is not None:  # tiled images: the family builds tiles and counts
        ours_cfg = model_io.read_run_config(ckpt_dir).model
        batch = family.verify_inputs(model.config, ours_cfg, seed=seed)
    else:
        size = image_side(model.config)
        tokens = tower_tokens_per_image(model, torch.zeros(1, 3, size, size))
        batch = make_verify_inputs(model.config, tokens, seed=seed)
    with torch.no_grad():
        ref = model(**batch["hf"], use_cache=False).logits.float()
    del model
    if tp * pp == 1:
        with single_rank():
            cfg = copy.deepcopy(model_io.read_run_config(ckpt_dir).model)
            cfg.set_spec("local")
            from mm_megatron.model.build import build_llava_model

            ours_model = build_llava_model(cfg)
            model_io.load_checkpoint(ours_model, ckpt_dir)
            ours = forward_logits(ours_model, batch["ours"])
    else:
        from mm_megatron.runtime.spawn import run_world

        results = run_world(_layout_worker, tp * pp, str(ckpt_dir), batch["ours"], tp, pp)
        ours = next(r for r in results if r is not None)
    if atol is not None:  # an absolute bound instead: as a fraction of this batch's scale
        rtol = atol / max(ref.abs().max().item(), 1e-30)
    ok, detail = compare_logits(ours, ref, batch["lengths"], rtol)
    return Check(name, ok, detail)


def verify(
    hf_dir: Path,
    ckpt_dir: Path,
    *,
    tp: int = 1,
    pp: int = 1,
    atol: float | None = None,
    logits: bool = True,
    rtol: float = 1e-5,
) -> list[Check]:
    """Run the checks; returns the rows (see :func:`format_table`)."""
    hf_dir, ckpt_dir = Path(hf_dir), Path(ckpt_dir)
    run = model_io.read_run_config(ckpt_dir)
    hf = HFCheckpoint(hf_dir)
    checks = [check_config(hf_dir, run)]
    if not checks[0].ok:
        return checks  # weights and logits would be meaningless
    with single_rank():
        try:
            checks.append(check_weights(hf, ckpt_dir, run))
        except ConversionError as e:
            checks.append(Check("weights", False, str(e)))
    if logits:
        checks.append(check_logits(hf_dir, ckpt_dir, tp, pp, atol, rtol=rtol))
    return checks
