"""CPU runtime: every accommodation that lets megatron-core 0.19.2 run on CPU over gloo.

megatron-core assumes CUDA in several places that a CPU gloo run hits (the list was read from
0.19.2's source and confirmed by running it): the RNG tracker (``tensor_parallel/random.py``
reads and writes CUDA generator state), ``GlobalMemoryBuffer`` and the local attention
(``torch.cuda.current_device()``), ``get_default_causal_mask`` (``device="cuda"``), rotary
embeddings (``inv_freq`` moved to CUDA), the pipeline schedules
(``torch.zeros(..., device="cuda")``), ``tensor_parallel.broadcast_data`` (``.cuda()``), the
sequence-parallel gather/scatter buffers,
DDP's grad buffers and ``dist_checkpointing`` (``torch.cuda.synchronize``, CUDA allocations).

Instead of editing each site, this module installs one general redirect:

1. ``_CudaToCpuMode``, a ``torch.overrides.TorchFunctionMode`` that rewrites device arguments
   ``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")`` and bare integers to ``"cpu"`` in factory
   functions and ``Tensor.to``, turns ``Tensor.cuda()`` and pinning into no-ops, and answers
   ``Tensor.type()`` in CUDA spelling (``torch.cuda.FloatTensor``), which megatron's optimizer
   and grad clipping assert on.
2. CPU stand-ins for the ``torch.cuda`` calls megatron makes directly: ``is_available``
   (False), ``current_device``,
   ``synchronize``, ``set_device``, ``device_count``, ``get_rng_state``/``set_rng_state``/
   ``manual_seed`` (mapped to the CPU generator), ``empty_cache``, memory queries, streams/events.
3. Megatron's private CUDA RNG helpers ``_get_cuda_rng_state``/``_set_cuda_rng_state`` are pointed
   at the CPU generator: on a machine without CUDA, torch's ``_lazy_call`` would otherwise queue
   the state restore forever and dropout forks would silently leak RNG state.
4. The runtime switch :func:`on_cpu` (no CUDA device, or ``MM_MEGATRON_FORCE_CPU=1``) that every
   CPU/CUDA difference keys on, and the ``TransformerConfig`` fields a CPU run needs
   (:func:`transformer_config_accommodations`: CPU initialisation, unbatched pipeline p2p).

What it does not do: it never runs when CUDA is in use (``activate()`` refuses unless
:func:`on_cpu`, so GPU behaviour is untouched), and it does not make the local spec support
sequence or context parallelism (that is ``mm_megatron.model.norm`` / ``.attention``).

The mode is thread-local and the autograd engine does not carry it into ``backward`` of custom
autograd functions; the backward paths megatron has allocate with
``device=torch.cuda.current_device()``, which the stand-in answers with the CPU device.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

#: The megatron-core release these accommodations were written and tested against.
PINNED_MEGATRON_CORE = "0.19.2"

_STATE: dict[str, Any] = {"mode": None, "saved": {}}


class MegatronVersionError(RuntimeError):
    """The installed megatron-core is not the release this runtime was built for."""


def check_megatron_version(expected: str = PINNED_MEGATRON_CORE) -> str:
    """Fail loudly unless the installed megatron-core is ``expected``.

    Returns:
        The installed version string.
    """
    from importlib import metadata

    try:
        found = metadata.version("megatron-core")
    except metadata.PackageNotFoundError as e:  # pragma: no cover - install problem
        raise MegatronVersionError(
            f"megatron-core is not installed; mm_megatron needs megatron-core=={expected}. "
            "Run `make install`."
        ) from e
    # NOTE: not megatron.core.package_info.__version__, which appends the git hash of whatever
    # repository the current directory is in ("0.19.2+abc123").
    found = found.split("+")[0]
    if found != expected:
        raise MegatronVersionError(
            f"mm_megatron's CPU runtime was written for megatron-core=={expected}, but "
            f"{found} is installed. Its CUDA accommodations patch private megatron internals "
            f"(tensor_parallel.random); install megatron-core=={expected} "
            "(pip install 'megatron-core==" + expected + "')."
        )
    return found


# ---------------------------------------------------------------------------------------------
# 1. The device redirect
# ---------------------------------------------------------------------------------------------


def _is_cuda_device(dev: Any) -> bool:
    if dev is None:
        return False
    if isinstance(dev, bool):
        return False
    if isinstance(dev, int):
        return True  # a bare integer means cuda:N to torch
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


_CPU = torch.device("cpu")


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            # tensor.cuda(device=None, non_blocking=False, memory_format=...) -> identity on CPU.
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers classify params by ``param.type()`` and reject anything but
            # 'torch.cuda.{Float,Half,BFloat16}Tensor'; report CPU tensors in CUDA spelling.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        if func is torch.Tensor.pin_memory:
            return args[0]  # pinning needs a CUDA driver; pageable CPU memory is fine here
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        dev = kwargs.get("device")
        if _is_cuda_device(dev):
            kwargs["device"] = _CPU
        to_or_type = func in (torch.Tensor.to, torch.Tensor.type)
        if to_or_type and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# 2. torch.cuda stand-ins
# ---------------------------------------------------------------------------------------------


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        return None

    def wait_event(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def record_event(self, event=None):
        return event or _NullEvent()

    def query(self):
        return True


class _NullEvent:
    """Stand-in for ``torch.cuda.Event`` (timing via perf_counter)."""

    def __init__(self, *args, **kwargs):
        import time

        self._time = time.perf_counter
        self._t = None

    def record(self, stream=None):
        self._t = self._time()

    def synchronize(self):
        return None

    def wait(self, stream=None):
        return None

    def query(self):
        return True

    def elapsed_time(self, end: _NullEvent) -> float:
        return 1000.0 * ((end._t or 0.0) - (self._t or 0.0))


def _cpu_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    # NOTE: not torch.manual_seed, which itself calls torch.cuda.manual_seed_all.
    torch.default_generator.manual_seed(int(seed))


def _megatron_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _megatron_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


_CUDA_STANDINS: dict[str, Any] = {
    # NOTE: a device object, not the int 0: megatron passes ``device=torch.cuda.current_device()``
    # inside autograd backward functions (SP gather/scatter, linear wgrad), where the autograd
    # engine does not carry the Python torch-function mode over, so only a CPU device works there.
    "current_device": lambda: _CPU,
    # Under MM_MEGATRON_FORCE_CPU=1 on a CUDA machine every later check (torch's, megatron's,
    # ours) must see the CPU world it runs in; on a machine without CUDA this changes nothing.
    "is_available": lambda: False,
    "set_device": lambda device: None,
    "device_count": lambda: 0,
    "synchronize": lambda device=None: None,
    "empty_cache": lambda: None,
    "get_rng_state": _cpu_get_rng_state,
    "set_rng_state": _cpu_set_rng_state,
    "manual_seed": _cpu_manual_seed,
    "manual_seed_all": _cpu_manual_seed,
    "memory_allocated": lambda device=None: 0,
    "max_memory_allocated": lambda device=None: 0,
    "memory_reserved": lambda device=None: 0,
    "max_memory_reserved": lambda device=None: 0,
    "reset_peak_memory_stats": lambda device=None: None,
    "current_stream": lambda device=None: _NullStream(),
    "default_stream": lambda device=None: _NullStream(),
    "stream": lambda stream=None: contextlib.nullcontext(),
    "Stream": _NullStream,
    "Event": _NullEvent,
}


def _patch(obj: Any, name: str, value: Any) -> None:
    key = (id(obj), name)
    if key not in _STATE["saved"]:
        _STATE["saved"][key] = (obj, name, getattr(obj, name, None))
    setattr(obj, name, value)


#: Set to ``1`` to run on the CPU (gloo, this runtime, CPU-friendly configs) even where CUDA is.
FORCE_CPU_ENV = "MM_MEGATRON_FORCE_CPU"


def on_cpu() -> bool:
    """The runtime switch: True when this process runs megatron-core on the CPU.

    That is when no CUDA device is available, or when ``MM_MEGATRON_FORCE_CPU=1``. Everything that
    differs between a CPU and a CUDA run (the process-group backend, :func:`activate`, the
    TransformerConfig fields of :func:`transformer_config_accommodations`, the default dtype)
    keys on this one function.
    """
    return os.environ.get(FORCE_CPU_ENV) == "1" or not torch.cuda.is_available()


def cuda_in_use() -> bool:
    """True when this process runs on CUDA (then the runtime stays off); ``not on_cpu()``."""
    return not on_cpu()


def transformer_config_accommodations() -> dict[str, Any]:
    """megatron ``TransformerConfig`` fields that depend on where the run happens.

    On the CPU: initialise weights on the CPU, and send pipeline activations and gradients one
    message at a time. NOTE: gloo matches point-to-point messages by (peer, tag) in posting
    order; a batched isend/irecv of an activation and a gradient between the same two ranks can
    then cross (equal shapes under the interleaved schedule). megatron's unbatched path orders the
    sends and receives of both peers consistently. On CUDA (NCCL) megatron's defaults stay.
    """
    cpu = on_cpu()
    return dict(use_cpu_initialization=cpu, batch_p2p_comm=not cpu)


def is_active() -> bool:
    """Whether the CPU runtime is installed in this process."""
    return _STATE["mode"] is not None


def activate(*, check_version: bool = True) -> bool:
    """Install the CPU runtime in this process if it runs on the CPU (:func:`on_cpu`).

    Idempotent. Must be called before megatron-core builds models or process groups.

    Args:
        check_version: verify the installed megatron-core first (raises MegatronVersionError).

    Returns:
        True if the runtime is active after the call, False when CUDA is in use (nothing done).
    """
    if check_version:
        check_megatron_version()
    if is_active():
        return True
    if cuda_in_use():
        log.debug("CUDA in use: CPU runtime not activated")
        return False
    for name, fn in _CUDA_STANDINS.items():
        _patch(torch.cuda, name, fn)
    _patch(torch.cuda.random, "get_rng_state", _cpu_get_rng_state)
    _patch(torch.cuda.random, "set_rng_state", _cpu_set_rng_state)
    _patch(torch.cuda.random, "manual_seed", _cpu_manual_seed)

    import megatron.core.tensor_parallel.random as mrandom

    _patch(mrandom, "_get_cuda_rng_state", _megatron_get_rng_state)
    _patch(mrandom, "_set_cuda_rng_state", _megatron_set_rng_state)

    mode = _CudaToCpuMode()
    mode.__enter__()
    _STATE["mode"] = mode
    log.info("mm_megatron CPU runtime active (megatron-core %s on CPU)", PINNED_MEGATRON_CORE)
    return True


def deactivate() -> None:
    """Undo :func:`activate` (used by tests)."""
    mode = _STATE["mode"]
    if mode is None:
        return
    mode.__exit__(None, None, None)
    _STATE["mode"] = None
    for obj, name, old in reversed(list(_STATE["saved"].values())):
        setattr(obj, name, old)
    _STATE["saved"].clear()


def device() -> torch.device:
    """The device tensors should live on: CUDA's current device, or the CPU under this runtime."""
    if is_active() or on_cpu():
        return _CPU
    return torch.device("cuda", torch.cuda.current_device())
