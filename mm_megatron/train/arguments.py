"""The train command's arguments: ``argv`` -> a resolved ``JobConfig``.

What this file does: builds the parser of ``mm-megatron train`` (``--preset``, ``--config``,
``--bf16``/``--fp32``, ``--transformer-impl``, ``--print-config`` and every Megatron-style flag a
config field declares in its metadata, with the field's docstring as help), turns flags and
dotted ``--section.key=value`` overrides into one override tree, resolves the job
(``resolve_job``), and refuses the TE spec in one line where Transformer Engine does not import.
The launchers' preflight uses the same resolution, so a layout is checked exactly as the trainer
will see it.

What it does not do: run anything (``mm_megatron.commands.train_cmd`` runs the trainer).
"""

from __future__ import annotations

import argparse

import yaml

TRANSFORMER_IMPLS = {"transformer_engine": "te", "local": "local"}
"""Megatron-LM's ``--transformer-impl`` values -> our spec name (for every component)."""

SPEC_KEYS = ("model.vision.spec", "model.projector.spec", "model.lm.spec")
"""The per-component spec fields ``--transformer-impl`` sets (dotted overrides still win)."""


def megatron_flags() -> list:
    """The Megatron-style flags: every config field that declares one in its metadata."""
    from mm_megatron.config.fields import flag_fields
    from mm_megatron.train.config import JobConfig

    return list(flag_fields(JobConfig, ""))


def build_train_parser() -> argparse.ArgumentParser:
    """The parser of the train command's own arguments (dotted overrides are left over)."""
    p = argparse.ArgumentParser(
        prog="mm-megatron train",
        description="Train a LLaVA-style model on megatron-core (any TP x PP x CP x DP layout).",
        epilog="Any field can also be set as --section.key=value (sections: model, parallel, "
        "data, train), e.g. --train.lr=1e-3 --model.freeze_lm=false.",
    )
    p.add_argument("--preset", help="model preset (see `mm-megatron model presets`)")
    p.add_argument("--config", help="job YAML (see examples/)")
    p.add_argument("--bf16", action="store_true", help="bf16 weights (fp32 main params)")
    p.add_argument("--fp32", action="store_true", help="fp32 weights")
    p.add_argument(
        "--transformer-impl",
        choices=sorted(TRANSFORMER_IMPLS),
        help="spec of every component (vision, projector, LM): transformer_engine (TE, needs a "
        "GPU) or local; --model.<part>.spec=... still wins for one part",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    for f in megatron_flags():
        text = f"{f.help} (sets {f.key})".replace("%", "%%")
        if f.is_switch:
            p.add_argument(f.flag, dest=f.key, action="store_true", default=None, help=text)
        else:
            metavar = f.flag.lstrip("-").replace("-", "_").upper()
            p.add_argument(
                f.flag, dest=f.key, type=f.value_type, default=None, metavar=metavar, help=text
            )
    return p


def parse_train_args(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """Parse `argv` -> (namespace, nested override tree from flags and dotted overrides)."""
    from mm_megatron.config.fields import merge_trees, set_dotted
    from mm_megatron.train.config import parse_dotted

    parser = build_train_parser()
    args, rest = parser.parse_known_args(argv)
    dotted, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--") or item == "--":
            parser.error(f"unexpected argument {item!r}")
        body = item[2:]
        if "=" not in body:  # --train.lr 1e-3
            if i + 1 >= len(rest) or "." not in body:
                parser.error(f"unknown option {item!r}")
            body = f"{body}={rest[i + 1]}"
            i += 1
        if "." not in body.partition("=")[0]:
            parser.error(f"unknown option {item!r}")
        dotted.append(body)
        i += 1
    tree: dict = {}
    if args.transformer_impl is not None:
        for key in SPEC_KEYS:
            set_dotted(tree, key, TRANSFORMER_IMPLS[args.transformer_impl])
    for f in megatron_flags():
        value = getattr(args, f.key)
        if value is not None:
            set_dotted(tree, f.key, value)
    if args.bf16 and args.fp32:
        parser.error("--bf16 and --fp32 exclude each other")
    if args.bf16 or args.fp32:
        set_dotted(tree, "train.precision", "bf16" if args.bf16 else "fp32")
    tree = merge_trees(tree, parse_dotted(dotted))
    return args, tree


def check_transformer_engine(job) -> None:
    """ValueError (one line) when the job asks for the TE spec and TE does not import here."""
    te_parts = [key for key in SPEC_KEYS if _get(job, key) == "te"]
    if not te_parts:
        return
    from mm_megatron.model.specs import have_te

    if not have_te():
        raise ValueError(
            f"{', '.join(f'{k}=te' for k in te_parts)} (--transformer-impl transformer_engine) "
            "needs Transformer Engine, which does not import on this machine; use "
            "--transformer-impl local, or install mm_megatron[te] on a CUDA machine"
        )


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_job(argv: list[str]):
    """`argv` -> (JobConfig, namespace)."""
    from mm_megatron.train.config import load_job_config

    args, tree = parse_train_args(argv)
    base_model = None
    load = (tree.get("train") or {}).get("load")
    if args.preset is None and load and not args.config:
        from mm_megatron.checkpoint.model_io import read_run_config

        base_model = read_run_config(load).model
    try:
        job = load_job_config(args.preset, args.config, tree, base_model=base_model)
    except yaml.YAMLError as e:
        from mm_megatron.train.preflight import yaml_error_line

        where = args.config or "a --section.key=value override"
        raise ValueError(yaml_error_line(where, e)) from None
    return job, args
