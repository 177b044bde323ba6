"""Training config: every example YAML loads, overrides coerce and fail clearly, CLI flags map."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mm_megatron.train.arguments import parse_train_args, resolve_job
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
    job = load_job_config("debug-tiny", overrides=["model.vision.image_size=32"])
    assert job.data.image_size == job.model.vision.image_size == 32
    job = load_job_config("debug-tiny", overrides=["data.image_size=64"])  # agreeing is fine
    with pytest.raises(ValueError, match=r"^data\.image_size=32 but model\.vision\.image_size=64"):
        load_job_config("debug-tiny", overrides={"data": {"image_size": 32}})


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


# --- one mechanism: model config, job config and CLI flags ---------------------------------------


def test_model_and_job_configs_share_coercion_and_key_errors():
    from mm_megatron.config import LlavaConfig

    cfg = LlavaConfig.from_dict({"lm": {"num_layers": "4", "rope_theta": "1e4"}, "freeze_lm": "no"})
    assert cfg.lm.num_layers == 4 and cfg.lm.rope_theta == 1e4 and cfg.freeze_lm is False
    with pytest.raises(ValueError, match=r"^model\.lm\.num_layers: expected an integer"):
        LlavaConfig.from_dict({"lm": {"num_layers": "four"}})
    with pytest.raises(ValueError, match=r"^model\.vision must be a mapping"):
        LlavaConfig.from_dict({"vision": 3})
    # the same message shape from the job config's overrides and from a run config
    for make in (
        lambda: load_job_config("debug-tiny", overrides=["model.lm.hiden_size=3"]),
        lambda: LlavaConfig.from_dict({"lm": {"hiden_size": 3}}),
    ):
        with pytest.raises(ValueError, match=r"^unknown key model\.lm\.hiden_size; valid: \["):
            make()
    job = load_job_config("debug-tiny")
    with pytest.raises(ValueError, match=r"^unknown key nope; valid: \["):
        JobConfig.from_dict({**job.to_dict(), "nope": 1})


def test_field_docs_read_the_docstring_under_each_field():
    from mm_megatron.config import ParallelConfig
    from mm_megatron.config.fields import field_docs

    docs = field_docs(TrainConfig)
    assert docs["lr"] == "Peak learning rate."
    assert docs["global_batch_size"].startswith("Rows per optimizer step over all DP ranks;")
    assert "\n" not in docs["global_batch_size"]
    assert field_docs(ParallelConfig)["tp"] == "Tensor-parallel size."


# The Megatron-LM spellings the CLI has always accepted (a regression list, not the source).
MEGATRON_FLAGS = {
    "--tensor-model-parallel-size": "parallel.tp",
    "--pipeline-model-parallel-size": "parallel.pp",
    "--context-parallel-size": "parallel.cp",
    "--sequence-parallel": "parallel.sequence_parallel",
    "--virtual-pipeline-model-parallel-size": "parallel.virtual_pp",
    "--micro-batch-size": "train.micro_batch_size",
    "--global-batch-size": "train.global_batch_size",
    "--train-iters": "train.train_iters",
    "--lr": "train.lr",
    "--min-lr": "train.min_lr",
    "--lr-warmup-iters": "train.lr_warmup_iters",
    "--lr-warmup-fraction": "train.lr_warmup_fraction",
    "--lr-decay-iters": "train.lr_decay_iters",
    "--lr-decay-style": "train.lr_decay_style",
    "--weight-decay": "train.weight_decay",
    "--clip-grad": "train.clip_grad",
    "--adam-beta1": "train.adam_beta1",
    "--adam-beta2": "train.adam_beta2",
    "--adam-eps": "train.adam_eps",
    "--use-distributed-optimizer": "train.use_distributed_optimizer",
    "--overlap-grad-reduce": "train.overlap_grad_reduce",
    "--recompute-granularity": "train.recompute_granularity",
    "--recompute-method": "train.recompute_method",
    "--recompute-num-layers": "train.recompute_num_layers",
    "--save": "train.save",
    "--load": "train.load",
    "--save-interval": "train.save_interval",
    "--async-save": "train.async_save",
    "--seed": "train.seed",
    "--log-interval": "train.log_interval",
    "--eval-interval": "train.eval_interval",
    "--eval-iters": "train.eval_iters",
    "--tensorboard-dir": "train.tensorboard_dir",
    "--run-dir": "train.run_dir",
    "--data-path": "data.train_shards",
    "--tokenizer": "data.tokenizer_path",
}


def test_flags_come_from_field_metadata_and_help_from_docstrings():
    from mm_megatron.config import ParallelConfig
    from mm_megatron.config.fields import field_docs
    from mm_megatron.data.config import DataConfig
    from mm_megatron.train.arguments import build_train_parser, megatron_flags

    sections = {"parallel": ParallelConfig, "train": TrainConfig, "data": DataConfig}
    flags = {f.flag: f for f in megatron_flags()}
    assert {k: f.key for k, f in flags.items()} == MEGATRON_FLAGS
    parser = build_train_parser()
    help_text = parser.format_help()
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    for flag, f in flags.items():
        section, name = f.key.split(".")
        doc = field_docs(sections[section])[name]
        assert f.help == doc and doc
        assert (
            re.search(rf"^  {flag}\b", help_text, re.M) and helps[flag] == f"{doc} (sets {f.key})"
        )
    for extra in ("--transformer-impl", "--bf16", "--fp32", "--preset", "--config"):
        assert extra in help_text


@dataclass
class _Inner:
    rate: float | None = field(default=None, metadata={"flag": "--rate"})
    """How fast."""


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    """Nested."""
    on: bool = field(default=False, metadata={"flag": "--on"})
    """A switch; 100% documented."""
    plain: int = 3
    """No flag."""


def test_a_new_field_with_a_flag_is_one_edit():
    from mm_megatron.config.fields import flag_fields

    got = {f.flag: (f.key, f.value_type, f.is_switch, f.help) for f in flag_fields(_Outer, "x")}
    assert got == {
        "--rate": ("x.inner.rate", float, False, "How fast."),
        "--on": ("x.on", bool, True, "A switch; 100% documented."),
    }


def test_transformer_impl_sets_every_spec_and_dotted_overrides_win():
    job, _ = resolve_job(["--preset", "debug-tiny", "--transformer-impl", "transformer_engine"])
    m = job.model
    assert (m.vision.spec, m.projector.spec, m.lm.spec) == ("te", "te", "te")
    job, _ = resolve_job(
        [
            "--preset", "debug-tiny",
            "--transformer-impl", "transformer_engine",
            "--model.vision.spec=local",
        ]
    )  # fmt: skip
    m = job.model
    assert (m.vision.spec, m.projector.spec, m.lm.spec) == ("local", "te", "te")
    job, _ = resolve_job(["--preset", "debug-tiny", "--transformer-impl", "local"])
    assert {job.model.vision.spec, job.model.projector.spec, job.model.lm.spec} == {"local"}
    with pytest.raises(SystemExit):
        parse_train_args(["--preset", "debug-tiny", "--transformer-impl", "apex"])


def test_transformer_engine_is_refused_in_one_line_without_te(capsys, monkeypatch):
    from mm_megatron.cli import main
    from mm_megatron.model import specs

    monkeypatch.setattr(specs, "have_te", lambda: False)  # as on a CPU machine
    import mm_megatron.train.trainer as trainer

    def must_not_run(job):
        raise AssertionError("training started")

    monkeypatch.setattr(trainer, "train", must_not_run)
    argv = ["train", "--preset", "debug-tiny", "--transformer-impl", "transformer_engine"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("mm-megatron train: error: model.vision.spec=te, ")
    assert "needs Transformer Engine" in err and "--transformer-impl local" in err
    assert main([*argv, "--model.vision.spec=local", "--model.projector.spec=local"]) == 2
    assert "error: model.lm.spec=te (" in capsys.readouterr().err
