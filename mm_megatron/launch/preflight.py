"""Preflight checks before any training starts: rendezvous address, port, all-reduce, layout.

What this file does (each failure is a `LaunchError` whose one-line message names the node or
rank):
- the rendezvous address comes from `env.resolve_address(host)`: the IPv4 address other nodes
  use to reach `host`, never a loopback one (the ``127.0.1.1 myhost`` line of many /etc/hosts is
  how other launchers end up making every node rendezvous with itself);
- `check_head(host, port)`: on the head node: `host` is one of this machine's addresses and
  `port` is free;
- `check_layout(train_args, nodes, gpus_per_node)`: the layout fits the world size and the
  model (TP*PP*CP divides nodes x GPUs; heads, groups, FFN and layers divide), through
  `mm_megatron.parallel.layout.validate_layout`;
- `check_all_reduce(addr, port, rank, world)`: every rank joins a store on the head node and
  all-reduces a tensor (NCCL on GPU, gloo on CPU) within a timeout; ranks that never arrive are
  named with their node.

What it does not do: start ranks (srun or torchrun does) or submit jobs (`sbatch.py`).
"""

from __future__ import annotations

import socket
import time
from datetime import timedelta

from mm_megatron.launch.env import LaunchError, this_node

_KEY = "mm_megatron/preflight/rank{rank}"


def local_addresses() -> set[str]:
    """IPv4 addresses of this machine's interfaces."""
    import psutil

    return {
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET
    }


def check_head(addr: str, port: int) -> None:
    """On the head node: `addr` is one of its addresses and `port` is free there."""
    node = this_node()
    if addr not in local_addresses():
        raise LaunchError(
            f"node {node}: rendezvous address {addr} is not an address of this (head) node; "
            "the other nodes would wait for a store that never starts"
        )
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError as e:
            raise LaunchError(
                f"node {node}: rendezvous port {addr}:{port} is not free ({e.strerror})"
            ) from None


def check_layout(train_args: list[str], nodes: int, gpus_per_node: int) -> str:
    """Refuse a layout that cannot run the job's model on nodes x GPUs ranks.

    Returns:
        A one-line summary (``world 32 = TP 2 x PP 2 x CP 1 x DP 8``).
    """
    from mm_megatron.parallel.layout import validate_layout
    from mm_megatron.train.arguments import resolve_job

    job, _ = resolve_job(list(train_args))
    world = nodes * max(1, gpus_per_node)
    par = job.parallel
    try:
        validate_layout(job.model, par, world)
    except ValueError as e:
        raise LaunchError(f"layout for {nodes} node(s) x {gpus_per_node} GPU(s): {e}") from None
    dp = par.dp(world)
    mbs, gbs = job.train.micro_batch_size, job.train.global_batch_size
    if gbs % (mbs * dp):
        raise LaunchError(
            f"layout for {nodes} node(s) x {gpus_per_node} GPU(s): global batch {gbs} is not a "
            f"multiple of micro batch {mbs} x DP {dp}"
        )
    return f"world {world} = TP {par.tp} x PP {par.pp} x CP {par.cp} x DP {dp}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def check_all_reduce(addr: str, port: int, rank: int, world: int, timeout_s: float = 60.0) -> str:
    """Join the head node's store at `addr:port` and all-reduce one tensor; collective.

    Returns:
        A one-line success message.
    """
    import torch
    import torch.distributed as dist

    node, timeout = this_node(), timedelta(seconds=timeout_s)
    who = f"node {node} (rank {rank})"
    try:
        store = dist.TCPStore(
            addr, port, world, is_master=rank == 0, timeout=timeout, wait_for_workers=False
        )
    except Exception as e:
        raise LaunchError(
            f"{who}: cannot reach the rendezvous store {addr}:{port} within {timeout_s:.0f}s "
            f"({_first_line(e)})"
        ) from None
    store.set(_KEY.format(rank=rank), node)
    deadline = time.monotonic() + timeout_s
    keys = [_KEY.format(rank=r) for r in range(world)]
    while not store.check(keys):
        if time.monotonic() > deadline:
            missing = [str(r) for r in range(world) if not store.check([keys[r]])]
            raise LaunchError(
                f"{who}: rank(s) {','.join(missing)} did not reach the rendezvous store "
                f"{addr}:{port} within {timeout_s:.0f}s"
            )
        time.sleep(0.2)
    nodes = [store.get(k).decode() for k in keys]
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    start = time.monotonic()
    try:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        value = torch.full((1,), float(rank + 1), device=device)
        dist.all_reduce(value)
        expected = world * (world + 1) / 2
        if float(value.item()) != expected:
            raise LaunchError(f"{who}: all-reduce gave {value.item()}, expected {expected}")
        dist.barrier()
    except LaunchError:
        raise
    except Exception as e:
        raise LaunchError(
            f"{who}: {backend} all-reduce over {world} ranks failed ({_first_line(e)}); "
            f"ranks on nodes {', '.join(nodes)}"
        ) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    took = time.monotonic() - start
    return (
        f"{who}: {backend} all-reduce over {world} ranks on {', '.join(sorted(set(nodes)))} "
        f"ok in {took:.2f}s"
    )
