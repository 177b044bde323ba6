"""``mm-megatron train``: train a LLaVA model with megatron-core on any TP x PP x CP x DP layout.

Commands (single process, CPU or one GPU; then N processes with torchrun)::

    mm-megatron train --preset debug-tiny
    mm-megatron train --config examples/minimind-v-stage1.yaml --save runs/mmv-s1
    torchrun --nproc-per-node 8 -m mm_megatron train --config examples/llava-1.5-7b-stage2.yaml \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel \\
        --micro-batch-size 4 --global-batch-size 128 --save /ckpt/llava7b-s2

Precedence: the preset, then ``--config FILE.yaml``, then the Megatron-style flags below, then
dotted overrides ``--section.key=value`` (sections: model, parallel, data, train; e.g.
``--train.lr=1e-3 --model.freeze_lm=false --data.template=plain``).

This module only parses; `mm_megatron.train.trainer.train` does the work. The sub-parser hands
every argument through unparsed (``prefix_chars="+"``) because the dotted overrides are open-ended.
"""

from __future__ import annotations

import argparse
import sys

# Megatron-LM flag -> (dotted key, type); store_true flags have type None.
FLAGS: dict[str, tuple[str, type | None]] = {
    "--tensor-model-parallel-size": ("parallel.tp", int),
    "--pipeline-model-parallel-size": ("parallel.pp", int),
    "--context-parallel-size": ("parallel.cp", int),
    "--sequence-parallel": ("parallel.sequence_parallel", None),
    "--virtual-pipeline-model-parallel-size": ("parallel.virtual_pp", int),
    "--micro-batch-size": ("train.micro_batch_size", int),
    "--global-batch-size": ("train.global_batch_size", int),
    "--train-iters": ("train.train_iters", int),
    "--lr": ("train.lr", float),
    "--min-lr": ("train.min_lr", float),
    "--lr-warmup-iters": ("train.lr_warmup_iters", int),
    "--lr-warmup-fraction": ("train.lr_warmup_fraction", float),
    "--lr-decay-iters": ("train.lr_decay_iters", int),
    "--lr-decay-style": ("train.lr_decay_style", str),
    "--weight-decay": ("train.weight_decay", float),
    "--clip-grad": ("train.clip_grad", float),
    "--adam-beta1": ("train.adam_beta1", float),
    "--adam-beta2": ("train.adam_beta2", float),
    "--adam-eps": ("train.adam_eps", float),
    "--use-distributed-optimizer": ("train.use_distributed_optimizer", None),
    "--overlap-grad-reduce": ("train.overlap_grad_reduce", None),
    "--recompute-granularity": ("train.recompute_granularity", str),
    "--recompute-method": ("train.recompute_method", str),
    "--recompute-num-layers": ("train.recompute_num_layers", int),
    "--save": ("train.save", str),
    "--load": ("train.load", str),
    "--save-interval": ("train.save_interval", int),
    "--async-save": ("train.async_save", None),
    "--seed": ("train.seed", int),
    "--log-interval": ("train.log_interval", int),
    "--eval-interval": ("train.eval_interval", int),
    "--eval-iters": ("train.eval_iters", int),
    "--tensorboard-dir": ("train.tensorboard_dir", str),
    "--run-dir": ("train.run_dir", str),
    "--data-path": ("data.train_shards", str),
    "--tokenizer": ("data.tokenizer_path", str),
}


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
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    for flag, (key, kind) in FLAGS.items():
        if kind is None:
            p.add_argument(flag, action="store_true", default=None, help=f"sets {key}=true")
        else:
            p.add_argument(flag, type=kind, default=None, help=f"sets {key}")
    return p


def parse_train_args(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """Parse `argv` -> (namespace, nested override tree from flags and dotted overrides)."""
    from mm_megatron.train.config import merge_trees, parse_dotted

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
    for flag, (key, _kind) in FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            _set(tree, key, value)
    if args.bf16 and args.fp32:
        parser.error("--bf16 and --fp32 exclude each other")
    if args.bf16 or args.fp32:
        _set(tree, "train.precision", "bf16" if args.bf16 else "fp32")
    tree = merge_trees(tree, parse_dotted(dotted))
    return args, tree


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def resolve_job(argv: list[str]):
    """`argv` -> (JobConfig, namespace)."""
    from mm_megatron.train.config import load_job_config

    args, tree = parse_train_args(argv)
    base_model = None
    load = (tree.get("train") or {}).get("load")
    if args.preset is None and load and not args.config:
        from mm_megatron.checkpoint.model_io import read_run_config

        base_model = read_run_config(load).model
    job = load_job_config(args.preset, args.config, tree, base_model=base_model)
    return job, args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (Megatron-style flags; `mm-megatron train --help`)",
        prefix_chars="+",
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the train command")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import os

    job, targs = resolve_job(list(args.rest))
    if targs.print_config:
        import yaml

        print(yaml.safe_dump(job.to_dict(), sort_keys=False))
        return 0
    from mm_megatron.train.trainer import DataError, NonFiniteLossError, train

    try:
        result = train(job)
    except (NonFiniteLossError, DataError) as e:
        if os.environ.get("MM_MEGATRON_DEBUG") == "1":
            raise
        print(f"mm-megatron train: error: {e}", file=sys.stderr)
        return 1
    if result.exit_reason == "signal":
        print(
            f"mm-megatron train: stopped by signal after iteration {result.iteration}",
            file=sys.stderr,
        )
    return 0
