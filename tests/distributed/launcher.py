"""Run a function in N CPU processes over gloo (the distributed test tier).

``run_distributed(fn, world_size, *args)`` is `mm_megatron.runtime.spawn.run_world` (spawned
ranks with the CPU runtime, results by rank, a rank's traceback or a timeout reported) with its
failures raised as AssertionError, so a failing rank fails the test like an assertion.
"""

from __future__ import annotations

from mm_megatron.runtime.spawn import WorldError, run_world


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank."""
    try:
        return run_world(fn, world_size, *args, timeout=timeout)
    except WorldError as e:
        raise AssertionError(str(e)) from None
