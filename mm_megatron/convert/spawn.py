"""Run a function on N local CPU processes over gloo (``convert verify --tp/--pp``).

Each process activates the CPU runtime, joins a gloo group through a file store and calls
``fn(rank, world_size, *args)``; results come back ordered by rank. The first failing rank's
traceback is raised in the caller. Uses the ``spawn`` start method, so callers' module-level code
must be import-safe (``if __name__ == "__main__":`` in scripts).
"""

from __future__ import annotations

import os
import tempfile
import traceback


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

        cpu_runtime.activate()
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
        queue.put((rank, True, fn(rank, world_size, *args)))
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
                results[rank] = payload
        except Exception as e:  # queue.Empty
            error = f"processes timed out after {timeout}s ({type(e).__name__})"
        finally:
            for p in procs:
                p.join(timeout=5 if error else 60)
                if p.is_alive():
                    p.kill()
                    p.join()
        if error:
            raise RuntimeError(error)
        return [results[r] for r in range(world_size)]
