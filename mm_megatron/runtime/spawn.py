"""Run a function on N local CPU processes over gloo.

``run_world(fn, world_size, *args)`` spawns ``world_size`` processes; each one activates the CPU
runtime, joins a gloo group through a file store, calls ``fn(rank, world_size, *args)`` and sends
back its (picklable) result. Results come back ordered by rank. An exception in any rank raises
`WorldError` in the caller with that rank's traceback; a hang is cut off after ``timeout``
seconds. Process groups are always destroyed.

Users: ``convert verify --tp/--pp`` and the distributed test tier
(``tests/distributed/launcher.py``). Uses the ``spawn`` start method, so callers' module-level
code must be import-safe (``if __name__ == "__main__":`` in scripts).
"""

from __future__ import annotations

import io
import os
import queue as queue_mod
import tempfile
import traceback


class WorldError(RuntimeError):
    """A rank of a spawned world failed or the world timed out (the message says which)."""


def _worker(rank, world_size, init_file, fn, args, queue):
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import logging
        import warnings

        import torch

        torch.set_num_threads(1)
        warnings.filterwarnings("ignore")
        logging.getLogger("megatron").setLevel(logging.ERROR)
        import torch.distributed as dist

        from mm_megatron.runtime import cpu_runtime

        os.environ[cpu_runtime.FORCE_CPU_ENV] = "1"  # CPU world even on a CUDA machine
        cpu_runtime.activate()
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
        result = fn(rank, world_size, *args)
        # NOTE: results go through the queue as bytes: torch's shared-memory tensor passing
        # breaks when the sending process exits before the receiver has opened them.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from mm_megatron.runtime import distributed

            distributed.destroy()
        except Exception:  # noqa: BLE001
            pass


def run_world(fn, world_size: int, *args, timeout: float = 900.0) -> list:
    """``[fn(0, ws, *args), ..., fn(ws-1, ws, *args)]`` computed on ``world_size`` processes."""
    import torch
    import torch.multiprocessing as mp

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
        error = None
        try:
            for _ in range(world_size):
                rank, ok, payload = queue.get(timeout=timeout)
                if not ok:
                    error = f"rank {rank} failed:\n{payload}"
                    break
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        except queue_mod.Empty:
            dead = [
                f"rank {r} exit code {p.exitcode}" for r, p in enumerate(procs) if not p.is_alive()
            ]
            error = f"distributed run timed out after {timeout}s; {', '.join(dead) or 'all alive'}"
        finally:
            for p in procs:
                p.join(timeout=5 if error else 60)
                if p.is_alive():
                    p.kill()
                    p.join()
        if error:
            raise WorldError(error)
        return [results[r] for r in range(world_size)]
