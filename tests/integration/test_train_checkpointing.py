"""Full-state checkpoints in one process: exact resume, format, keep-last, --load, async, bf16."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mm_megatron.checkpoint import model_io
from mm_megatron.train import checkpointing as ckpt
from mm_megatron.train import trainer as trainer_mod
from tests.train_helpers import tiny_job, write_tiny_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_tiny_dataset(out)
    return out


def _stop_after(monkeypatch, iteration: int) -> None:
    """Make the trainer behave as if SIGTERM arrived during step `iteration`."""
    original = trainer_mod.Trainer.train_step

    def step(self):
        out = original(self)
        if self.iteration == iteration:
            self.stop_requested = True
        return out

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step)


def test_resume_is_bit_identical(data_dir, tmp_path, monkeypatch):
    kw = dict(train_iters=6, save_interval=2)
    ref = trainer_mod.train(tiny_job(data_dir, tmp_path / "a", save=str(tmp_path / "a/ck"), **kw))
    assert ref.exit_reason == "done" and sorted(ref.losses) == [1, 2, 3, 4, 5, 6]

    save = str(tmp_path / "b/ck")
    with monkeypatch.context() as m:
        _stop_after(m, 3)  # between the periodic saves at 2 and 4
        first = trainer_mod.train(tiny_job(data_dir, tmp_path / "b", save=save, **kw))
    assert first.exit_reason == "signal" and first.iteration == 3
    assert model_io.read_tracker(save) == 3
    second = trainer_mod.train(tiny_job(data_dir, tmp_path / "b", save=save, **kw))
    assert second.resumed_from == 3 and sorted(second.losses) == [4, 5, 6]
    for it, loss in second.losses.items():
        assert loss == ref.losses[it], (it, loss, ref.losses[it])  # bit-identical


def test_checkpoint_format_and_keep_last(data_dir, tmp_path):
    save = tmp_path / "ck"
    job = tiny_job(data_dir, tmp_path, train_iters=4, save=str(save), save_interval=1, keep_last=2)
    trainer_mod.train(job)
    assert ckpt.complete_iterations(save) == [3, 4]
    assert model_io.read_tracker(save) == 4
    assert not [p for p in save.iterdir() if p.name.startswith(".")]
    state = json.loads((save / "iter_0000004" / ckpt.TRAIN_STATE_JSON).read_text())
    assert state["iteration"] == 4 and state["consumed_samples"] == 32
    assert state["layout"] == {"tp": 1, "pp": 1, "cp": 1, "dp": 1}
    assert model_io.read_run_config(save).model == job.model
    keys = model_io.stored_tensors(save / "iter_0000004")
    assert any(k.startswith("model.language_model.") for k in keys)
    assert any(k.startswith("optimizer.state.exp_avg.model.") for k in keys)


def test_load_gives_initial_weights_only(data_dir, tmp_path):
    """--load: weights of the latest checkpoint, fresh optimizer, iteration 0."""
    src = tmp_path / "src"
    trainer_mod.train(tiny_job(data_dir, tmp_path / "r1", train_iters=2, save=str(src)))
    job = tiny_job(
        data_dir, tmp_path / "r2", train_iters=1, load=str(src), save=str(tmp_path / "new")
    )
    t = trainer_mod.Trainer(job)
    try:
        t.setup()
        assert t.iteration == 0 and t.result.resumed_from == 2
        mine = t.chunks[0].module.state_dict()
        from mm_megatron.model.build import build_llava_model

        fresh = build_llava_model(job.model)
        model_io.load_checkpoint(fresh, src)
        for k, v in fresh.state_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, mine[k]), k
        assert t.scheduler.num_steps == 0
    finally:
        t.close()


def test_load_refuses_a_different_model(data_dir, tmp_path):
    src = tmp_path / "src"
    trainer_mod.train(tiny_job(data_dir, tmp_path / "r1", train_iters=1, save=str(src)))
    job = tiny_job(data_dir, tmp_path / "r2", train_iters=1, load=str(src))
    job.model.lm.num_layers = 4
    with pytest.raises(ValueError, match="lm.num_layers: 2 vs 4"):
        trainer_mod.train(job)


def test_tracker_fallback_and_stale_temp_dirs(data_dir, tmp_path):
    save = tmp_path / "ck"
    trainer_mod.train(tiny_job(data_dir, tmp_path, train_iters=2, save=str(save), save_interval=1))
    (save / model_io.TRACKER).write_text("7\n")  # points at a checkpoint that does not exist
    (save / ".tmp_iter_0000003").mkdir()
    assert ckpt.latest_iteration(save) == 2
    result = trainer_mod.train(tiny_job(data_dir, tmp_path, train_iters=3, save=str(save)))
    assert result.resumed_from == 2 and sorted(result.losses) == [3]
    assert not (save / ".tmp_iter_0000003").exists()
    assert model_io.read_tracker(save) == 3


def test_async_save_then_resume(data_dir, tmp_path):
    save = tmp_path / "ck"
    job = tiny_job(
        data_dir, tmp_path, train_iters=4, save=str(save), save_interval=2, async_save=True
    )
    trainer_mod.train(job)
    assert ckpt.complete_iterations(save) == [2, 4] and model_io.read_tracker(save) == 4
    job = tiny_job(data_dir, tmp_path, train_iters=5, save=str(save), async_save=True)
    result = trainer_mod.train(job)
    assert result.resumed_from == 4 and sorted(result.losses) == [5]


def test_bf16_steps_and_resume(data_dir, tmp_path, monkeypatch):
    kw = dict(train_iters=3, precision="bf16", save_interval=1)
    ref = trainer_mod.train(tiny_job(data_dir, tmp_path / "a", save=str(tmp_path / "a/ck"), **kw))
    assert all(math.isfinite(v) for v in ref.losses.values())
    save = str(tmp_path / "b/ck")
    with monkeypatch.context() as m:
        _stop_after(m, 1)
        trainer_mod.train(tiny_job(data_dir, tmp_path / "b", save=save, **kw))
    second = trainer_mod.train(tiny_job(data_dir, tmp_path / "b", save=save, **kw))
    assert {k: ref.losses[k] for k in (2, 3)} == second.losses


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_runs_and_changes_nothing(data_dir, tmp_path, monkeypatch, granularity):
    import megatron.core.transformer.transformer_block as block_mod
    from megatron.core.transformer.attention import Attention

    calls = []
    full = block_mod.checkpointed_forward
    selective = Attention._checkpointed_attention_forward

    def full_wrapped(*a, **k):
        calls.append("full")
        return full(*a, **k)

    def selective_wrapped(self, *a, **k):
        calls.append("selective")
        return selective(self, *a, **k)

    monkeypatch.setattr(block_mod, "checkpointed_forward", full_wrapped)
    monkeypatch.setattr(Attention, "_checkpointed_attention_forward", selective_wrapped)
    ref = trainer_mod.train(tiny_job(data_dir, tmp_path / "a", train_iters=2))
    assert not calls
    extra = (
        {"recompute_method": "uniform", "recompute_num_layers": 1} if granularity == "full" else {}
    )
    got = trainer_mod.train(
        tiny_job(
            data_dir, tmp_path / "b", train_iters=2, recompute_granularity=granularity, **extra
        )
    )
    assert granularity in calls
    for it in (1, 2):
        assert got.losses[it] == pytest.approx(ref.losses[it], rel=1e-6)


def test_run_config_written_before_projector_extra_was_removed_still_reads(tmp_path):
    from mm_megatron.config import get_preset

    cfg = get_preset("debug-tiny")
    model_io.write_run_config(tmp_path, cfg)
    doc = json.loads((tmp_path / model_io.RUN_CONFIG).read_text())
    doc["model"]["projector"]["extra"] = {}  # what older versions wrote
    (tmp_path / model_io.RUN_CONFIG).write_text(json.dumps(doc))
    assert model_io.read_run_config(tmp_path).model == cfg
    doc["model"]["projector"]["extra"] = {"queries": 64}  # a non-empty one is not silently lost
    (tmp_path / model_io.RUN_CONFIG).write_text(json.dumps(doc))
    with pytest.raises(model_io.CheckpointFormatError, match=r"model\.projector\.extra"):
        model_io.read_run_config(tmp_path)
