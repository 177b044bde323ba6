"""Layout parity harness: one training step of the same model and data under any layout.

``run_layout(layout, full_weights, microbatches)`` runs, on every rank of a gloo world of
``TP*PP*CP*DP`` processes: build the layout's model chunks (megatron DDP), load this rank's shards
of the same full weights, one ``forward_backward`` over the global batch (split over DP ranks),
gather the gradients back to full tensors, one Adam step (megatron optimizer; the distributed
optimizer when asked), and gather the parameters. Rank 0 returns loss, grads and params.
"""

from __future__ import annotations

import torch

from mm_megatron.config import ParallelConfig, get_preset


def tiny_config():
    """debug-tiny with dimensions that split up to TP=4 and layers up to PP=4 (x2 virtual)."""
    cfg = get_preset("debug-tiny")
    cfg.lm.num_layers = 8
    cfg.lm.num_attention_heads = 4
    cfg.lm.num_query_groups = 4
    cfg.lm.ffn_hidden_size = 128
    cfg.vision.num_attention_heads = 4
    cfg.vision.image_size = 32
    cfg.vision.patch_size = 8  # 16 patches + class token
    cfg.freeze_vision = False
    return cfg


def full_weights(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Single-rank reference weights (random, non-trivial norms and biases)."""
    from mm_megatron.model.build import build_llava_model
    from mm_megatron.runtime import distributed

    distributed.initialize(ParallelConfig(), seed=seed)
    try:
        torch.manual_seed(seed)
        model = build_llava_model(cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(("layernorm.weight", "final_layernorm.weight")):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif n.endswith(".bias"):
                    p.copy_(0.02 * torch.randn_like(p))
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    finally:
        distributed.destroy()


def make_batches(cfg, seed: int = 0, packed: bool = False) -> list[dict]:
    """Four samples: 2 images / text-only / 1 image / 3 images, varied lengths (mbs 1 each).

    With ``packed``, two micro-batches each packing two samples into one row (THD).
    """
    gen = torch.Generator().manual_seed(seed)
    v = cfg.vision
    specs = [(10, 2), (7, 0), (12, 1), (9, 3)]
    samples = []
    for length, n in specs:
        ids = torch.randint(10, cfg.lm.vocab_size, (length,), generator=gen)
        if n:
            ids[torch.randperm(length - 1, generator=gen)[:n] + 1] = cfg.image_token_id
        labels = ids.clone()
        labels[: length // 3] = -100
        labels[ids == cfg.image_token_id] = -100
        imgs = torch.randn(n, 3, v.image_size, v.image_size, generator=gen)
        samples.append((ids, labels, imgs, n))
    if not packed:
        return [
            dict(
                images=imgs,
                input_ids=ids[None],
                labels=labels[None],
                num_images=torch.tensor([n]),
            )
            for ids, labels, imgs, n in samples
        ]
    out = []
    for a, b in ((0, 1), (2, 3)):
        sa, sb = samples[a], samples[b]
        out.append(
            dict(
                images=torch.cat([sa[2], sb[2]]),
                input_ids=torch.cat([sa[0], sb[0]])[None],
                labels=torch.cat([sa[1], sb[1]])[None],
                num_images=torch.tensor([sa[3] + sb[3]]),
                seq_lens=torch.tensor([[len(sa[0]), len(sb[0])]]),
            )
        )
    return out


def run_layout(rank, world_size, layout: dict, cfg, weights, batches, dist_opt: bool = False):
    """Worker: one step under ``layout``; rank 0 returns loss, full grads and params.

    ``dist_opt`` turns on megatron's distributed optimizer together with overlapped grad
    reduce-scatter (the production DP configuration)."""
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mm_megatron.model.build import build_model_chunks
    from mm_megatron.parallel.schedule import forward_backward
    from mm_megatron.runtime import distributed
    from tests.distributed.resharding import gather_full, load_full_state_dict

    par = ParallelConfig(**layout)
    distributed.initialize(par, seed=1234)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    chunks = build_model_chunks(
        cfg, par, overlap_grad_reduce=dist_opt, use_distributed_optimizer=dist_opt
    )
    load_full_state_dict(chunks, weights, par.tp, tp_rank, pp_rank)
    for c in chunks:
        c.zero_grad_buffer()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = len(batches) // dp
    mine = batches[dp_rank * per : (dp_rank + 1) * per]
    out = forward_backward(chunks, mine)
    # With the distributed optimizer each DP rank holds only its reduce-scattered shard of the
    # gradient buffer, so gradients are compared in the plain-DDP cases; the step still is.
    grads = None if dist_opt else gather_full(chunks, tp_rank=tp_rank, pp_rank=pp_rank, grads=True)
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-3,
            adam_eps=1e-6,
            weight_decay=0.0,
            use_distributed_optimizer=dist_opt,
        ),
        chunks,
    )
    opt.step()
    params = gather_full(chunks, tp_rank=tp_rank, pp_rank=pp_rank)
    if rank == 0:
        return dict(loss=out["loss"], tokens=out["tokens"], grads=grads, params=params)
    return None


def assert_parity(ref: dict, got: dict, rel: float = 1e-5, what: str = "") -> None:
    """Loss, every gradient and every updated parameter within ``rel`` relative (norm-wise)."""
    assert got["tokens"] == ref["tokens"], (what, got["tokens"], ref["tokens"])
    assert abs(got["loss"] - ref["loss"]) <= rel * abs(ref["loss"]), (
        what,
        got["loss"],
        ref["loss"],
    )
    for kind in ("grads", "params"):
        if got[kind] is None:
            continue
        assert set(got[kind]) == set(ref[kind]), (what, kind, set(got[kind]) ^ set(ref[kind]))
        for name, r in ref[kind].items():
            g = got[kind][name]
            assert g.shape == r.shape, (what, kind, name, g.shape, r.shape)
            err = (g - r).norm() / r.norm().clamp_min(1e-12)
            assert err <= rel, f"{what}: {kind} {name} relative error {err:.2e} > {rel:g}"


def run_layouts(rank, world_size, jobs: list[tuple[dict, bool, bool]], cfg, weights, data):
    """Worker: run several ``(layout, packed, dist_opt)`` jobs of one world size in sequence.

    Re-initialising megatron's parallel state per job is far cheaper than spawning a new world
    (each process spends seconds importing megatron), which keeps the matrix affordable.
    """
    out = []
    for layout, packed, dist_opt in jobs:
        out.append(run_layout(rank, world_size, layout, cfg, weights, data[packed], dist_opt))
    return out


CONNECTOR_CASES = [
    (dict(tp=2), False),
    (dict(tp=2, sequence_parallel=True), False),
    (dict(pp=2), False),
    (dict(cp=2), False),
    (dict(cp=2), True),
]
"""The two-rank layouts every connector is proven under, with whether the batches are packed:
TP2, TP2+SP, PP2, CP2 on padded rows and CP2 on packed (THD) rows."""


def check_layouts(
    cases, cfg, weights, data, refs, keep=None, world: int = 2, timeout: float = 900
) -> None:
    """Run ``(layout, packed)`` cases in one gloo world and assert each matches one rank.

    Prints, per case, the loss of both and the worst relative error of any gradient or updated
    parameter (the numbers the closing notes quote).

    Args:
        cases: ``(layout, packed)`` pairs, all of ``world`` ranks.
        cfg, weights, data, refs: as ``loader_parity_setup`` returns them.
        keep: maps a result to the part that must match (e.g. without parameters whose gradient
            is exactly zero); default all of it.
        world: ranks of every case (2-way layouts in a larger world are filled by DP).
        timeout: seconds the world may run.
    """
    from tests.distributed.launcher import run_distributed

    keep = keep or (lambda result: result)
    jobs = [(layout, packed, False) for layout, packed in cases]
    got = run_distributed(run_layouts, world, jobs, cfg, weights, data, timeout=timeout)[0]
    for (layout, packed), result in zip(cases, got):
        ref, result = keep(refs[packed]), keep(result)
        what = f"{layout} packed={packed}"
        assert_parity(ref, result, what=what)
        worst = max(
            float((result[kind][k] - r).norm() / r.norm().clamp_min(1e-12))
            for kind in ("grads", "params")
            for k, r in ref[kind].items()
        )
        print(
            f"{what}: loss {result['loss']:.8f} (one rank {ref['loss']:.8f}), "
            f"worst grad/param relative error {worst:.1e}"
        )


def world_of(layout: dict, dp: int) -> int:
    """Ranks a layout needs."""
    return layout.get("tp", 1) * layout.get("pp", 1) * layout.get("cp", 1) * dp


def loader_batches(
    cfg, data_dir: str, packed: bool, *, max_seq_len: int, image_norm: str = "clip", count: int = 4
) -> list[dict]:
    """``count`` micro-batches of 2 rows from the real loader over ``data_dir``'s val split, with
    the model's tiling scheme and image-token count (model inputs only, sample keys dropped)."""
    import os

    from mm_megatron.data import DataConfig, build_dataloader, validate_batch
    from mm_megatron.model.image_tokens import ImageTokenCounter

    size = cfg.vision.input_image_size
    config = DataConfig(
        val_shards=data_dir,
        tokenizer_path=os.path.join(data_dir, "tokenizer"),
        image_size=size,
        image_norm=image_norm,
        max_seq_len=max_seq_len,
        packing=packed,
        num_workers=0,
        template="plain",
    )
    loader = build_dataloader(
        config,
        dp_rank=0,
        dp_size=1,
        micro_batch_size=2,
        image_tokens=ImageTokenCounter.from_config(cfg),
        seed=0,
        split="val",
        tiling=cfg.tiling,
    )
    assert loader.image_token_id == cfg.image_token_id
    batches = []
    for batch in loader:
        validate_batch(batch, cfg.image_token_id, image_size=size)
        batch.pop("sample_keys")
        batches.append(batch)
        if len(batches) == count:
            return batches
    raise AssertionError(f"the synthetic split is too small for {count} micro-batches")


def _full_weights(rank, world_size, cfg):
    return full_weights(cfg)


def loader_parity_setup(
    cfg,
    data_dir: str,
    *,
    max_seq_len: int,
    image_norm: str = "clip",
    image_size: int | None = None,
    **synthetic,
) -> tuple[dict, dict, dict]:
    """Synthetic shards -> loader batches (padded and packed), one-rank weights and references.

    Args:
        cfg: The model.
        data_dir: Where the synthetic dataset goes.
        max_seq_len: The loader's longest expanded sample.
        image_norm: The data pipeline's normalisation.
        image_size: Side of the synthetic images (default: the model's input size).
        synthetic: Overrides of `write_synthetic_dataset`'s arguments (48 val samples in shards
            of 24, seed 3, 30% two-image and 20% text-only samples by default).

    Returns:
        ``(weights, {packed: batches}, {packed: one-rank reference})``.
    """
    from mm_megatron.data.synthetic import write_synthetic_dataset
    from tests.distributed.launcher import run_distributed

    kw = dict(
        n_train=4,
        n_val=48,
        shard_size=24,
        seed=3,
        multi_image_fraction=0.3,
        text_only_fraction=0.2,
        vocab_size=cfg.lm.vocab_size,
    )
    kw.update(synthetic)
    write_synthetic_dataset(data_dir, image_size=image_size or cfg.vision.input_image_size, **kw)
    data = {
        packed: loader_batches(
            cfg, data_dir, packed, max_seq_len=max_seq_len, image_norm=image_norm
        )
        for packed in (False, True)
    }
    weights = run_distributed(_full_weights, 1, cfg)[0]
    jobs = [({}, False, False), ({}, True, False)]
    refs = run_distributed(run_layouts, 1, jobs, cfg, weights, data)[0]
    return weights, data, {False: refs[0], True: refs[1]}


def assert_sized_as_the_data_says(cfg, batches: list[dict], packed: bool, ref: dict) -> None:
    """The merge expands every packed sample to the length the data pipeline sized it at, and the
    one-rank loss counts every labelled text token exactly once (first tokens carry no label)."""
    from mm_megatron.model.merge import plan_merge

    if packed:
        for b in batches:
            plan = plan_merge(
                b["input_ids"], cfg.image_token_id, b["image_tokens"], seq_lens=b["seq_lens"]
            )
            seg = plan.segment_lengths
            assert seg[seg > 0].tolist() == b["expanded_lens"].tolist()
    labelled = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert ref["tokens"] == labelled
