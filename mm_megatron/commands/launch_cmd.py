"""``mm-megatron launch``: start training with torchrun or SLURM, and check a job before it runs.

Commands (everything after ``--`` goes to ``mm-megatron train``)::

    # this node, 8 GPUs (or CPU ranks on gloo); per-rank logs under --log-dir
    mm-megatron launch torchrun --nproc-per-node 8 --log-dir runs/s1/logs -- \\
        --config examples/llava-1.5-7b-stage1.yaml
    # 4 nodes x 8 GPUs on SLURM, stage 1 then stage 2 (afterok), requeue on preemption
    mm-megatron launch slurm --nodes 4 --gpus-per-node 8 --time 04:00:00 --output-dir runs/l7b \\
        --stages examples/llava-1.5-7b-stage1.yaml,examples/llava-1.5-7b-stage2.yaml
    mm-megatron launch slurm ... --dry-run        # print the sbatch script(s), submit nothing
    # preflight: layout + rendezvous host/port (what every job runs first)
    mm-megatron launch check --nodes 4 --gpus-per-node 8 --rdzv-host node001 -- --config a.yaml

This module only parses; `mm_megatron.launch` does the work.
"""

from __future__ import annotations

import argparse
import sys


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _torchrun_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mm-megatron launch torchrun",
        description="Run this node's ranks with torchrun; arguments after -- go to `train`.",
    )
    p.add_argument("--nproc-per-node", type=int, required=True, help="ranks on this node")
    p.add_argument("--nnodes", type=int, default=1, help="nodes in the job")
    p.add_argument("--node-rank", type=int, default=None, help="this node's index (echo only)")
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the c10d rendezvous")
    p.add_argument("--rdzv-id", default=None, help="rendezvous id (default: SLURM_JOB_ID)")
    p.add_argument("--log-dir", default=None, help="one log file per rank under this directory")
    p.add_argument("--echo-all", action="store_true", help="every rank echoes to the console")
    return p


def _slurm_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mm-megatron launch slurm",
        description="Write an sbatch script into --output-dir and submit it; arguments after -- "
        "go to `train`.",
    )
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="0: one CPU rank per node")
    p.add_argument("--output-dir", required=True, help="script, logs/ and checkpoints go here")
    for flag in ("--partition", "--account", "--qos", "--time", "--dependency"):
        p.add_argument(flag, default=None)
    p.add_argument("--job-name", default="mm-megatron")
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--container-image", default=None, help="pyxis image for srun")
    p.add_argument("--container-mounts", default=None, help="pyxis mounts for srun")
    p.add_argument("--max-restarts", type=int, default=3, help="requeues after SIGUSR1")
    p.add_argument("--signal-lead", type=int, default=300, help="seconds of SIGUSR1 warning")
    p.add_argument("--python", default=None, help="python command on the nodes")
    p.add_argument("--preflight-timeout", type=int, default=60, help="all-reduce check, seconds")
    p.add_argument("--stages", default=None, help="a.yaml,b.yaml: one job per stage, afterok")
    p.add_argument("--dry-run", action="store_true", help="print the script(s), submit nothing")
    return p


def _check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mm-megatron launch check",
        description="Preflight: layout fits; rendezvous host routable and port free; all-reduce.",
    )
    p.add_argument("--nodes", type=int, default=None, help="with --gpus-per-node: check layout")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--rdzv-host", default=None, help="must resolve to a non-loopback address")
    p.add_argument("--rdzv-port", type=int, default=None)
    p.add_argument("--head", action="store_true", help="this is the head node: address + port")
    p.add_argument("--print-address", action="store_true", help="print the resolved address")
    p.add_argument("--all-reduce", default=None, metavar="ADDR:PORT", help="all-reduce check")
    p.add_argument("--timeout", type=float, default=60.0, help="all-reduce check, seconds")
    return p


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="torchrun | slurm | check (`mm-megatron launch torchrun --help`)",
        prefix_chars="+",
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help="torchrun | slurm | check ...")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    rest = list(args.rest)
    commands = {"torchrun": _torchrun, "slurm": _slurm, "check": _check}
    if not rest or rest[0] not in commands:
        print("usage: mm-megatron launch {torchrun,slurm,check} [options] [-- train args]")
        return 0 if rest and rest[0] in ("-h", "--help") else 2
    own, train_args = _split(rest[1:])
    return commands[rest[0]](own, train_args)


def _torchrun(own: list[str], train_args: list[str]) -> int:
    from mm_megatron.launch.torchrun import TorchrunOptions, run

    a = _torchrun_parser().parse_args(own)
    return run(TorchrunOptions(**vars(a), train_args=train_args))


def _slurm(own: list[str], train_args: list[str]) -> int:
    from mm_megatron.launch import sbatch
    from mm_megatron.launch.preflight import check_layout

    a = vars(_slurm_parser().parse_args(own))
    dry_run, stages = a.pop("dry_run"), a.pop("stages")
    opts = sbatch.SlurmOptions(**a, train_args=train_args)
    jobs = sbatch.stage_options(opts, stages.split(",")) if stages else [opts]
    for job in jobs:  # refuse a layout that cannot fit before anything is submitted
        summary = check_layout(job.train_args, job.nodes, job.gpus_per_node)
        print(f"# {job.job_name}: {summary}", file=sys.stderr)
    previous = None
    for k, job in enumerate(jobs):
        if k and previous is not None:
            job.dependency = f"afterok:{previous}"
        if dry_run:
            if k:
                job.dependency = f"afterok:<job id of stage {k}>"
            print(f"# ---- {job.script_path} ----")
            print(sbatch.render(job))
            continue
        previous = sbatch.submit(job)
        print(f"submitted {job.job_name}: job {previous}, script {job.script_path}")
    return 0


def _check(own: list[str], train_args: list[str]) -> int:
    from mm_megatron.launch import env, preflight
    from mm_megatron.launch.env import LaunchError, read_rank_env

    a = _check_parser().parse_args(own)
    say = (lambda m: print(m, file=sys.stderr)) if a.print_address else print
    if a.all_reduce:
        host, _, port = a.all_reduce.rpartition(":")
        info = read_rank_env()
        say(preflight.check_all_reduce(host, int(port), info.rank, info.world_size, a.timeout))
        return 0
    if a.nodes is not None:
        summary = preflight.check_layout(train_args, a.nodes, a.gpus_per_node)
        say(f"preflight: layout ok: {summary}")
    if a.rdzv_host:
        addr = env.resolve_address(a.rdzv_host)
        if a.head:
            if a.rdzv_port is None:
                raise LaunchError("--head needs --rdzv-port")
            preflight.check_head(addr, a.rdzv_port)
        where = f"{addr}:{a.rdzv_port}" if a.rdzv_port else addr
        say(f"preflight: node {env.this_node()}: rendezvous {a.rdzv_host} -> {where} ok")
        if a.print_address:
            print(addr)
    return 0
