"""Training config: every example YAML loads, overrides coerce and fail clearly, CLI flags map."""

from __future__ import annotations

from pathlib import Path

import pytest

from mm_megatron.commands.train_cmd import parse_train_args, resolve_job
from mm_megatron.train.config import JobConfig, TrainConfig, load_job_config, parse_dotted

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    for want in (
        "debug-tiny.yaml",
        "minimind-v-stage1.yaml",
        "minimind-v-stage2.yaml",
        "llava-1.5-7b-stage1.yaml",
        "llava-1.5-7b-stage2.yaml",
    ):
        assert want in names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_yaml_loads(path):
    job = load_job_config(config_file=path)
    job.validate()
    assert job.preset is not None
    assert JobConfig.from_dict(job.to_dict()) == job
    if "stage1" in path.name:  # stage 1: projector only, caption template
        assert job.model.freeze_vision and job.model.freeze_lm and not job.model.freeze_projector
        assert job.data.template == "plain"
    if "stage2" in path.name:  # stage 2: LM unfrozen, instruction template, starts from stage 1
        assert not job.model.freeze_lm and job.data.template != "plain"
        assert job.train.load and "stage1" in job.train.load


def test_overrides_are_coerced_to_field_types():
    job = load_job_config(
        "debug-tiny",
        overrides=[
            "train.lr=1e-3",  # PyYAML reads this as a string
            "train.save_interval=null",
            "train.async_save=true",
            "model.lm.num_layers=4",
            "model.freeze_vision=false",
            "parallel.tp=2",
            "data.template=plain",
        ],
    )
    assert job.train.lr == 1e-3 and isinstance(job.train.lr, float)
    assert job.train.save_interval is None and job.train.async_save is True
    assert job.model.lm.num_layers == 4 and job.model.freeze_vision is False
    assert job.parallel.tp == 2 and job.data.template == "plain"


def test_data_defaults_follow_the_model():
    job = load_job_config("debug-tiny")
    assert job.data.image_size == job.model.vision.image_size == 64
    job = load_job_config("debug-tiny", overrides={"data": {"image_size": 32}})
    assert job.data.image_size == 32


def test_bad_values_fail_with_the_key_name():
    with pytest.raises(ValueError, match=r"unknown key train\.lrr"):
        load_job_config("debug-tiny", overrides=["train.lrr=1"])
    with pytest.raises(ValueError, match=r"train\.train_iters: expected an integer"):
        load_job_config("debug-tiny", overrides=["train.train_iters=many"])
    with pytest.raises(ValueError, match="global_batch_size=12 is not a multiple"):
        load_job_config("debug-tiny", overrides=["train.global_batch_size=12"])
    with pytest.raises(ValueError, match="section must be one of"):
        parse_dotted(["trian.lr=1"])
    with pytest.raises(ValueError, match="recompute_method"):
        TrainConfig(recompute_granularity="full").validate()
    with pytest.raises(ValueError, match="no model"):
        load_job_config()


def test_cli_megatron_flags_and_dotted_overrides():
    argv = [
        "--preset", "debug-tiny",
        "--tensor-model-parallel-size", "2",
        "--pipeline-model-parallel-size", "2",
        "--context-parallel-size", "1",
        "--sequence-parallel",
        "--micro-batch-size", "2",
        "--global-batch-size", "8",
        "--train-iters", "7",
        "--lr", "5e-4",
        "--save", "/tmp/x",
        "--load", "/tmp/y",
        "--seed", "3",
        "--bf16",
        "--train.lr", "1e-4",  # dotted overrides win over flags, space or = form
        "--model.freeze_lm=true",
    ]  # fmt: skip
    job, args = resolve_job(argv)
    p, t = job.parallel, job.train
    assert (p.tp, p.pp, p.cp, p.sequence_parallel) == (2, 2, 1, True)
    assert (t.micro_batch_size, t.global_batch_size, t.train_iters) == (2, 8, 7)
    assert (t.save, t.load, t.seed, t.precision) == ("/tmp/x", "/tmp/y", 3, "bf16")
    assert t.lr == 1e-4 and job.model.freeze_lm is True


def test_cli_rejects_unknown_options():
    with pytest.raises(SystemExit):
        parse_train_args(["--preset", "debug-tiny", "--no-such-flag"])


def test_cli_print_config_and_errors(capsys):
    from mm_megatron.cli import main

    assert main(["train", "--config", str(EXAMPLES[0]), "--print-config"]) == 0
    assert "preset:" in capsys.readouterr().out
    assert main(["train", "--preset", "debug-tiny", "--train.nope=1"]) == 2
    assert "unknown key train.nope" in capsys.readouterr().err
