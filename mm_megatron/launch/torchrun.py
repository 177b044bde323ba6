"""``mm-megatron launch torchrun``: torchrun with sane defaults, per-rank logs and clean stops.

What this file does: `torchrun_argv` turns the launcher's options into torchrun's (c10d
rendezvous for several nodes, ``--standalone`` for one; one log file per rank under
``--log-dir`` through torchrun's ``--tee``/``--redirects``; only global rank 0 echoes to the
console unless `echo_all`); `run` sets the default environment (`env.default_env`) and runs
torchrun's elastic agent *in this process*.

Stopping: this process is the agent. It handles SIGTERM, SIGINT and SIGUSR1 itself (torchrun's
own handling is narrowed to SIGHUP/SIGQUIT): it forwards the signal to its worker ranks and goes
on waiting, so each rank saves a checkpoint after its current step and exits 0, and then so does
the launcher. The signal may arrive at the launcher alone, at its whole process group, or from
srun at every process of the step; ranks treat repeats as one. A rank dies with this process
(`mm_megatron.runtime.children`), so a SIGKILLed launcher leaves no rank behind.

What it does not do: decide when to restart a job (the sbatch script does), or check the
rendezvous (`preflight.py`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field

from mm_megatron.launch.env import default_env, read_rank_env

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""Signals forwarded to the ranks (each saves a checkpoint and exits 0)."""

AGENT_SIGNALS = "SIGHUP,SIGQUIT"
"""Signals torchrun's agent still handles itself (it stops the ranks without a checkpoint)."""


@dataclass
class TorchrunOptions:
    """What `mm-megatron launch torchrun` takes besides the train arguments."""

    nproc_per_node: int
    """Ranks on this node."""
    nnodes: int = 1
    """Nodes in the job."""
    node_rank: int | None = None
    """This node's index (default: ``SLURM_NODEID``, else 0); only decides who echoes."""
    rdzv_endpoint: str | None = None
    """``HOST:PORT`` of the c10d rendezvous (needed for more than one node)."""
    rdzv_id: str | None = None
    """Rendezvous id shared by all nodes (default: ``SLURM_JOB_ID``, else ``mm_megatron``)."""
    log_dir: str | None = None
    """Directory of the per-rank log files (default: none, console only)."""
    echo_all: bool = False
    """Every rank echoes to the console, not just rank 0."""
    train_args: list[str] = field(default_factory=list)
    """Arguments of ``mm-megatron train``."""


def _node_rank(opts: TorchrunOptions) -> int:
    if opts.node_rank is not None:
        return opts.node_rank
    return int(os.environ.get("SLURM_NODEID", "0") or 0)


def torchrun_argv(opts: TorchrunOptions) -> list[str]:
    """torchrun's command line (without the program name) for `opts`."""
    argv = ["--nproc-per-node", str(opts.nproc_per_node), "--nnodes", str(opts.nnodes)]
    if opts.nnodes > 1 or opts.rdzv_endpoint:
        if not opts.rdzv_endpoint:
            raise ValueError("--rdzv-endpoint HOST:PORT is needed for more than one node")
        rdzv_id = opts.rdzv_id or os.environ.get("SLURM_JOB_ID") or "mm_megatron"
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", opts.rdzv_endpoint]
        argv += ["--rdzv-id", str(rdzv_id)]
    else:
        argv += ["--standalone"]
    argv += ["--max-restarts", "0", "--signals-to-handle", AGENT_SIGNALS]
    if opts.log_dir:
        head = _node_rank(opts) == 0
        argv += ["--log-dir", opts.log_dir]
        if opts.echo_all:
            argv += ["--tee", "3"]
        elif head:
            argv += ["--tee", "3", "--local-ranks-filter", "0"]
        else:
            argv += ["--redirects", "3"]
    elif not opts.echo_all:
        argv += ["--local-ranks-filter", "0"] if _node_rank(opts) == 0 else []
    return [*argv, "-m", "mm_megatron", "train", *opts.train_args]


def _parallel_sizes(train_args: list[str]) -> tuple[int, int]:
    """(TP, CP) the train arguments ask for; (1, 1) when they cannot be read yet."""
    try:
        from mm_megatron.train.arguments import resolve_job

        job, _ = resolve_job(list(train_args))
        return job.parallel.tp, job.parallel.cp
    except (ValueError, KeyError, FileNotFoundError, SystemExit):
        return 1, 1  # the ranks report the bad argument themselves


def _forward(signum: int, frame) -> None:
    """Pass a stop signal on to the worker ranks (this process's children)."""
    import psutil

    del frame
    me = psutil.Process()
    for child in me.children(recursive=False):
        with contextlib.suppress(psutil.Error):
            child.send_signal(signum)
    name = signal.Signals(signum).name
    print(
        f"[mm-megatron launch] {name}: ranks save a checkpoint after their current step",
        file=sys.stderr,
        flush=True,
    )


def run(opts: TorchrunOptions) -> int:
    """Run the ranks of this node; returns the exit code (0 also after a signalled stop)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    tp, cp = _parallel_sizes(opts.train_args)
    os.environ.update(default_env(opts.nproc_per_node, tp=tp, cp=cp))
    if opts.log_dir:
        os.makedirs(opts.log_dir, exist_ok=True)
    old = {sig: signal.signal(sig, _forward) for sig in STOP_SIGNALS}
    try:
        torchrun(parse_args(torchrun_argv(opts)))
    except ChildFailedError as e:
        failures = []
        for rank, failure in sorted(e.failures.items()):
            code = failure.exitcode
            how = f"signal {failure.signal_name()}" if code < 0 else f"exit {code}"
            failures.append(f"rank {rank} (local {failure.local_rank}) {how}")
        node = read_rank_env().node_rank if opts.node_rank is None else opts.node_rank
        print(
            f"mm-megatron launch torchrun: node {node}: {', '.join(failures)}"
            + (f"; logs in {opts.log_dir}" if opts.log_dir else ""),
            file=sys.stderr,
        )
        return 1
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return 0
