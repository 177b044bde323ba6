"""Who is this process in the job, and which environment should its ranks start with.

What this file does:
- `read_rank_env()`: rank, world size, local rank and node of this process, from torchrun's
  variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ...), else from SLURM's (``SLURM_PROCID``,
  ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NODEID``) when srun starts one task per rank
  without torchrun, else a single process;
- `export_rank_env()`: in the srun-one-task-per-rank case, exports torch.distributed's
  ``env://`` variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` = the step's first node,
  ``MASTER_PORT`` derived from the job id, ...) so the trainer joins the job;
- `default_env()`: the launch defaults (``OMP_NUM_THREADS`` = cores / local ranks,
  ``CUDA_DEVICE_MAX_CONNECTIONS=1`` when TP or CP > 1, ``TORCH_NCCL_AVOID_RECORD_STREAMS=1``);
  a value already in the environment always wins;
- `expand_nodelist()` (``scontrol show hostnames``), `port_for_job()`, `this_node()` and
  `resolve_address()` (a non-loopback IPv4 address of a host, or a one-line `LaunchError`).

What it does not do: start processes (`torchrun.py`) or check reachability (`preflight.py`).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

PORT_BASE = 20000
"""Lowest rendezvous port `port_for_job` hands out."""
PORT_SPAN = 20000
"""Ports `port_for_job` cycles through (two jobs collide only if their ids differ by k*span)."""


class LaunchError(ValueError):
    """A launch cannot proceed; the message is one line naming the node, rank or setting."""


@dataclass(frozen=True)
class RankEnv:
    """This process's place in the job."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of ranks."""
    local_rank: int
    """Rank on this node."""
    local_world_size: int
    """Ranks on this node."""
    node_rank: int
    """Index of this node."""
    source: str
    """Where the values came from: torchrun, slurm or single."""


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {key}={value!r} is not an integer") from None


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int:
    # SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE look like "2(x3),1"; take this node's.
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    counts: list[int] = []
    for part in filter(None, spec.split(",")):
        n, _, rep = part.partition("(x")
        counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
    node = _int(env, "SLURM_NODEID", 0)
    return counts[node] if node < len(counts) else 1


def read_rank_env(env: Mapping[str, str] | None = None) -> RankEnv:
    """This process's rank, from torchrun's variables, else SLURM's, else a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankEnv(
            rank=_int(env, "RANK", 0),
            world_size=_int(env, "WORLD_SIZE", 1),
            local_rank=_int(env, "LOCAL_RANK", 0),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE", 1),
            node_rank=_int(env, "GROUP_RANK", _int(env, "SLURM_NODEID", 0)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS", 1) > 1 and "SLURM_STEP_ID" in env:
        return RankEnv(
            rank=_int(env, "SLURM_PROCID", 0),
            world_size=_int(env, "SLURM_NTASKS", 1),
            local_rank=_int(env, "SLURM_LOCALID", 0),
            local_world_size=_slurm_tasks_on_node(env),
            node_rank=_int(env, "SLURM_NODEID", 0),
            source="slurm",
        )
    return RankEnv(0, 1, 0, 1, 0, "single")


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM node list (``node[1-4]``) via ``scontrol show hostnames``.

    Raises:
        LaunchError: scontrol is missing (e.g. inside a container) or fails; guessing instead
            would make every node rendezvous with itself.
    """
    if not shutil.which("scontrol"):
        raise LaunchError(
            f"scontrol not found, so the node list {nodelist!r} cannot be expanded (inside a "
            "container? mount SLURM's binaries, or pass --rdzv-endpoint HOST:PORT)"
        )
    proc = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False
    )
    hosts = proc.stdout.split()
    if proc.returncode or not hosts:
        raise LaunchError(
            f"`scontrol show hostnames {nodelist}` failed: {proc.stderr.strip() or 'no output'}"
        )
    return hosts


def port_for_job(job_id: int | str, offset: int = 0) -> int:
    """Rendezvous port of SLURM job `job_id` (distinct for jobs sharing a node)."""
    return PORT_BASE + (int(job_id) + offset) % PORT_SPAN


def this_node() -> str:
    """This machine's name as SLURM knows it (``SLURMD_NODENAME``), else its host name."""
    import os

    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def resolve_address(host: str) -> str:
    """A non-loopback IPv4 address of `host`.

    Raises:
        LaunchError: `host` does not resolve, or only to loopback addresses.
    """
    try:
        ip = ipaddress.ip_address(host)
        addrs = [str(ip)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise LaunchError(
                f"node {this_node()}: rendezvous host {host!r} does not resolve ({e.strerror})"
            ) from None
        addrs = list(dict.fromkeys(info[4][0] for info in infos))
    good = [a for a in addrs if not ipaddress.ip_address(a).is_loopback]
    if not good:
        raise LaunchError(
            f"node {this_node()}: rendezvous host {host!r} resolves only to loopback "
            f"{', '.join(addrs)}; other nodes cannot reach it (fix /etc/hosts or pass "
            "--rdzv-endpoint with a routable address)"
        )
    return good[0]


def export_rank_env(env: MutableMapping[str, str] | None = None) -> RankEnv:
    """Export torch's ``env://`` variables when srun started one task per rank; returns the env.

    Does nothing under torchrun or for a single process.
    """
    env = os.environ if env is None else env
    info = read_rank_env(env)
    if info.source != "slurm":
        return info
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        env["MASTER_ADDR"] = resolve_address(expand_nodelist(nodelist)[0])
    env.setdefault("MASTER_PORT", str(port_for_job(env.get("SLURM_JOB_ID", "0"))))
    env["RANK"], env["WORLD_SIZE"] = str(info.rank), str(info.world_size)
    env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"] = str(info.local_rank), str(info.local_world_size)
    env["GROUP_RANK"] = str(info.node_rank)
    return info


def default_env(
    local_ranks: int,
    *,
    tp: int = 1,
    cp: int = 1,
    cpus: int | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The launch defaults for `local_ranks` ranks per node, minus what `env` already sets.

    Args:
        local_ranks: Ranks started on this node.
        tp: Tensor-parallel size (from the train arguments).
        cp: Context-parallel size.
        cpus: CPU cores available (default: this process's affinity mask).
        env: The current environment (default: os.environ).
    """
    env = os.environ if env is None else env
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {
        "OMP_NUM_THREADS": str(max(1, (cpus or 1) // max(1, local_ranks))),
        "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    }
    if tp > 1 or cp > 1:
        # megatron's rule: one hardware queue keeps TP/CP communication kernels in issue order,
        # which its overlap of communication with compute relies on (Hopper and older).
        out["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    return {k: v for k, v in out.items() if k not in env}
