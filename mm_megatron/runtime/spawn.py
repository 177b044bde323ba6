"""Run a function on N local CPU processes over gloo.

``run_world(fn, world_size, *args)`` spawns ``world_size`` processes; each one activates the CPU
runtime, joins a gloo group through a file store, calls ``fn(rank, world_size, *args)`` and sends
back its (picklable) result. Results come back ordered by rank. An exception in any rank raises
`WorldError` in the caller with that rank's traceback; a rank that dies without reporting
(killed, out of memory, a crash in C++) is noticed within seconds and named with its exit code or
signal; a hang is cut off after ``timeout`` seconds. Process groups are always destroyed.

Users: ``convert verify --tp/--pp`` and the distributed test tier
(``tests/distributed/launcher.py``). Uses the ``spawn`` start method, so callers' module-level
code must be import-safe (``if __name__ == "__main__":`` in scripts).
"""

from __future__ import annotations

import io
import os
import queue as queue_mod
import tempfile
import time
import traceback

POLL_S = 1.0
"""How often the parent checks for ranks that died without reporting."""


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


def _exit_text(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def _dead_or_late(procs, results, queue, deadline: float, timeout: float):
    """After an empty poll: an error text if a rank died without reporting or time is up, a
    late report ``(rank, ok, payload)`` if one was still in the pipe, else None."""
    dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
    if dead:
        try:  # a rank's report is written before it exits; give the pipe a moment
            return queue.get(timeout=2.0)
        except queue_mod.Empty:
            pass
        gone = ", ".join(f"rank {r} ({_exit_text(procs[r].exitcode)})" for r in dead)
        return f"{gone} died before reporting a result (out of memory or a crash in C++?)"
    if time.monotonic() > deadline:
        alive = [r for r, p in enumerate(procs) if r not in results and p.is_alive()]
        return f"distributed run timed out after {timeout}s; ranks {alive} still running"
    return None


def _died_first(procs, results, failed: int) -> str:
    """A peer that died silently is the cause of the others' communication errors: name it."""
    end = time.monotonic() + 2.0
    while True:
        dead = [
            r
            for r, p in enumerate(procs)
            if r != failed and r not in results and p.exitcode not in (None, 0)
        ]
        if dead or time.monotonic() > end:
            break
        time.sleep(0.1)
    if not dead:
        return ""
    gone = ", ".join(f"rank {r} ({_exit_text(procs[r].exitcode)})" for r in dead)
    return f"{gone} died before reporting a result; then "


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
        deadline = time.monotonic() + timeout
        try:
            while len(results) < world_size and error is None:
                try:
                    rank, ok, payload = queue.get(timeout=POLL_S)
                except queue_mod.Empty:
                    error = _dead_or_late(procs, results, queue, deadline, timeout)
                    if isinstance(error, tuple):  # a last report was still in the pipe
                        (rank, ok, payload), error = error, None
                    else:
                        continue
                if not ok:
                    error = _died_first(procs, results, rank) + f"rank {rank} failed:\n{payload}"
                    break
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        finally:
            for p in procs:
                p.join(timeout=5 if error else 60)
                if p.is_alive():
                    p.kill()
                    p.join()
        if error:
            raise WorldError(error)
        return [results[r] for r in range(world_size)]
