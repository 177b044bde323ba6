"""Run a function in N CPU processes over gloo (the distributed test tier).

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes; each one activates
the CPU runtime, joins a gloo group through a file store, calls ``fn(rank, world_size, *args)``
and returns its (picklable) result. Results come back ordered by rank. An exception in any rank
fails the caller with that rank's traceback; a hang is cut off by ``timeout`` seconds. Process
groups are always destroyed.
"""

from __future__ import annotations

import io
import os
import queue as queue_mod
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def _worker(rank, world_size, init_file, fn, args, queue):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    try:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.getLogger("megatron").setLevel(logging.ERROR)
        import torch.distributed as dist

        from mm_megatron.runtime import cpu_runtime

        cpu_runtime.activate()
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
        result = fn(rank, world_size, *args)
        # NOTE: tensors go through the queue as bytes: torch's shared-memory tensor passing
        # breaks when the sending process exits before the receiver has opened them.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg_init")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, queue))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, object] = {}
        errors = []
        try:
            for _ in range(world_size):
                rank, ok, payload = queue.get(timeout=timeout)
                if ok:
                    results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
                else:
                    errors.append(f"rank {rank} failed:\n{payload}")
                    break
        except queue_mod.Empty:
            dead = [
                f"rank {r} exit code {p.exitcode}" for r, p in enumerate(procs) if not p.is_alive()
            ]
            errors.append(
                f"distributed run timed out after {timeout}s; {', '.join(dead) or 'all alive'}"
            )
        finally:
            for p in procs:
                p.join(timeout=5 if errors else 60)
                if p.is_alive():
                    p.kill()
                    p.join()
        if errors:
            raise AssertionError("\n".join(errors))
        return [results[r] for r in range(world_size)]
