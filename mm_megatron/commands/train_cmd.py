"""``mm-megatron train``: train a LLaVA model with megatron-core on any TP x PP x CP x DP layout.

Commands (single process, CPU or one GPU; then N processes with torchrun)::

    mm-megatron train --preset debug-tiny
    mm-megatron train --config examples/minimind-v-stage1.yaml --save runs/mmv-s1
    torchrun --nproc-per-node 8 -m mm_megatron train --config examples/llava-1.5-7b-stage2.yaml \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel \\
        --micro-batch-size 4 --global-batch-size 128 --save /ckpt/llava7b-s2

Precedence: the preset, then ``--config FILE.yaml``, then the Megatron-style flags, then
dotted overrides ``--section.key=value`` (sections: model, parallel, data, train; e.g.
``--train.lr=1e-3 --model.freeze_lm=false --data.template=plain``). The Megatron-style flags
(``--lr``, ``--tensor-model-parallel-size``, ...) are not listed here: each config field that has
one declares it in its metadata, and its docstring is the ``--help`` text
(``mm_megatron.config.fields``). ``--transformer-impl transformer_engine|local`` sets the spec of
every component at once; on a machine without Transformer Engine, ``transformer_engine`` is
refused in one line before any work.

This module only wires the command: `mm_megatron.train.arguments` parses, and
`mm_megatron.train.trainer.train` does the work. The sub-parser hands
every argument through unparsed (``prefix_chars="+"``) because the dotted overrides are open-ended.
"""

from __future__ import annotations

import argparse
import sys

from mm_megatron.train.arguments import (
    check_transformer_engine,
    resolve_job,
)


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

    from mm_megatron.train.run_outputs import resolve_output_paths

    job, targs = resolve_job(list(args.rest))
    notes = resolve_output_paths(job)  # default run dir, checkpoint dir, TensorBoard dir
    if not targs.print_config:
        from mm_megatron.train.preflight import check_job

        check_job(job)  # every start-up problem, in one line, before megatron is imported
    if targs.print_config:
        import yaml

        print(yaml.safe_dump(job.to_dict(), sort_keys=False))
        return 0
    check_transformer_engine(job)
    from mm_megatron.runtime import startup_warnings

    startup_warnings.announce()  # one line instead of the fallback warnings
    from mm_megatron.checkpoint.integrity import CheckpointDamagedError, CheckpointSaveError
    from mm_megatron.launch.env import export_rank_env
    from mm_megatron.train.trainer import DataError, NonFiniteLossError, PeerFailure, train

    export_rank_env()  # srun starting one task per rank without torchrun: join via SLURM's vars

    if int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            print(note, flush=True)
    try:
        result = train(job)
    except (
        NonFiniteLossError,
        DataError,
        PeerFailure,
        CheckpointSaveError,
        CheckpointDamagedError,
    ) as e:
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
