"""Where and how the job runs: importing nothing else from mm_megatron but ``config`` and the
layout size checks of ``parallel.layout`` (which import no megatron).

- ``cpu_runtime.py``: the runtime switch ``on_cpu()`` (no CUDA, or ``MM_MEGATRON_FORCE_CPU=1``)
  and every accommodation that lets megatron-core run on the CPU over gloo (device redirect,
  ``torch.cuda`` stand-ins, the TransformerConfig fields a CPU run needs), with the check of the
  pinned megatron-core version.
- ``distributed.py``: torch.distributed + megatron's process groups for one job (gloo on the CPU,
  NCCL on CUDA), the layout size checks that need no model, and tear-down.
- ``spawn.py``: run a function on N local CPU processes over gloo (tests, ``convert verify``).
"""
