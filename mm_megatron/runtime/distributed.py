"""Process-group set-up and tear-down for one job (torchrun, SLURM or a single process).

``initialize(par)`` activates the CPU runtime when the run is on the CPU
(``cpu_runtime.on_cpu()``: no CUDA device, or ``MM_MEGATRON_FORCE_CPU=1``), starts
torch.distributed (gloo on the CPU, NCCL on CUDA; env:// under torchrun, a private file store for
a plain single process), validates the layout sizes against the world size, creates megatron's
TP/PP/CP/DP groups and seeds megatron's RNG tracker. ``destroy()`` undoes it (tests call it
between layouts); ``process_groups(par)`` is both as a context manager.
``rank()`` / ``barrier()`` are the package's one spelling of "global rank, 0 without
torch.distributed" and "wait for every rank, a no-op in one process".

Not here: the model-dependent layout checks (``mm_megatron/parallel/layout.py``), the spawning of
local worlds (``spawn.py``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from mm_megatron.config.parallel_config import ParallelConfig

# the size checks live with the other layout checks (no megatron import there); re-exported
from mm_megatron.parallel.layout import (  # noqa: F401
    LayoutError,
    check_parallel_sizes,
    check_world_size,
)
from mm_megatron.runtime import cpu_runtime


def default_backend() -> str:
    """``gloo`` when the run is on the CPU (:func:`cpu_runtime.on_cpu`, which honours
    ``MM_MEGATRON_FORCE_CPU=1``), else ``nccl``."""
    return "gloo" if cpu_runtime.on_cpu() else "nccl"


def _init_process_group(backend: str | None, timeout_s: float | None = None) -> None:
    if dist.is_initialized():
        return
    backend = backend or default_backend()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        dist.init_process_group(backend=backend, timeout=timeout)
        return
    fd, store = tempfile.mkstemp(prefix="mm_megatron_pg_")
    os.close(fd)
    os.unlink(store)  # the file store creates it; a stale one would hold old rendezvous data
    dist.init_process_group(backend=backend, init_method=f"file://{store}", rank=0, world_size=1)


def initialize(
    par: ParallelConfig,
    *,
    seed: int = 1234,
    backend: str | None = None,
    timeout_s: float | None = None,
) -> ProcessGroupCollection:
    """Set up torch.distributed + megatron parallel state for layout ``par``.

    ``timeout_s`` bounds every collective (None: torch's default).

    Returns:
        The ProcessGroupCollection model code receives.
    """
    cpu_runtime.activate()
    _init_process_group(backend, timeout_s)
    check_world_size(par, dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.virtual_pp,
        context_parallel_size=par.cp,
        **({"distributed_timeout_minutes": timeout_s / 60} if timeout_s else {}),
    )
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


@contextlib.contextmanager
def process_groups(par: ParallelConfig | None = None, **kwargs) -> Iterator[ProcessGroupCollection]:
    """``initialize(par)`` for the duration of a ``with`` block, then ``destroy()``.

    For callers that need megatron's state only briefly in one process (``model summary``
    builds the model on the meta device inside it).
    """
    pgs = initialize(par or ParallelConfig(), **kwargs)
    try:
        yield pgs
    finally:
        destroy()


def destroy() -> None:
    """Tear down megatron's groups and the default process group."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's global rank (0 when torch.distributed is not started)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank (a no-op without torch.distributed or with one rank)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
