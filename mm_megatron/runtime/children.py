"""Helper processes of a training rank: they outlive no parent and never die of its stop signal.

A rank starts helpers: DataLoader workers (forked), megatron's checkpoint writers (a forked
async writer, and a ``spawn``-ed multiprocessing Manager that carries the write results).
Operators stop jobs by signalling a whole process group (``timeout``, torchrun, ``scancel``,
srun), so every helper receives the SIGTERM/SIGUSR1 meant for the trainer. Left alone, a
DataLoader worker dies of it (torch's worker SIGTERM handler) and the Manager dies of it (so the
emergency checkpoint's write fails with BrokenPipeError). And when a rank is SIGKILLed, its
orphaned workers keep its gloo sockets open, so the peers never see the death and hang.

What this file does:
- `die_with_parent()`: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` plus a thread that exits when the
  parent PID changes (covers a parent that died before the prctl call);
- `ignore_stop_signals()`: SIGTERM, SIGINT and SIGUSR1 are ignored; the trainer stops its
  helpers itself once the checkpoint is written;
- `loader_worker_init`: both of the above, as a DataLoader ``worker_init_fn``;
- `guard_helpers()`: once per process, every later ``fork`` child dies with its parent;
  forked daemonic children (loader workers) still alive at exit are SIGKILLed (multiprocessing's
  exit hook would SIGTERM them, then wait forever); megatron's checkpoint-writer Manager is
  started with both guards (call before the first save).

What it does not do: handle the signals in the trainer (`mm_megatron.train.trainer`) or detect
dead peers (`mm_megatron.train.heartbeat`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""Signals a helper ignores: they are meant for the trainer, which then stops its helpers."""

_PR_SET_PDEATHSIG = 1
_guarded = False
_manager = None  # keeps megatron's write-results Manager alive for the life of the process


def die_with_parent(poll_s: float = 1.0) -> None:
    """Make this process die (SIGKILL) when its parent dies; no-op off Linux.

    Args:
        poll_s: How often the watchdog thread compares the parent PID.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="mm-parent-watchdog", daemon=True).start()


def ignore_stop_signals() -> None:
    """Ignore SIGTERM, SIGINT and SIGUSR1 in this process."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def loader_worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: ignore stop signals, die with the rank."""
    del worker_id
    ignore_stop_signals()
    die_with_parent()


def _manager_init() -> None:
    ignore_stop_signals()
    die_with_parent()


def _pdeathsig_only() -> None:
    # NOTE: no watchdog thread here: a thread started in every fork child (e.g. megatron's async
    # writer) would outlive nothing but costs a wake-up per second per child.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def kill_forked_daemons() -> None:
    """SIGKILL this process's forked daemonic children that are still alive (at exit).

    These are DataLoader workers (which only read data) or, after an error, a checkpoint writer
    whose save would not be finalised anyway.
    """
    import multiprocessing
    from multiprocessing.popen_fork import Popen as ForkPopen

    # NOTE: torch's SIGCHLD handler raises when a loader worker dies; it must not interrupt this.
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    doomed = [
        p
        for p in multiprocessing.active_children()
        if p.daemon and type(getattr(p, "_popen", None)) is ForkPopen and p.pid
    ]
    for proc in doomed:
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGKILL)
    for proc in doomed:
        with contextlib.suppress(Exception):
            proc.join(timeout=5)


def guard_helpers(checkpoint_writer: bool = True) -> None:
    """Guard this process's later helpers (idempotent; Linux only).

    Args:
        checkpoint_writer: Also create megatron's checkpoint-writer results queue now, on a
            Manager process that ignores stop signals and dies with this one (only worth its
            start-up cost in a run that saves).

    Every process forked from now on gets SIGKILL when its parent dies; under torchrun this
    rank too dies with its agent (a SIGKILLed launcher leaves nothing behind).
    """
    global _guarded, _manager
    if not sys.platform.startswith("linux"):
        return
    if not _guarded:
        _guarded = True
        os.register_at_fork(after_in_child=_pdeathsig_only)
        # NOTE: registered after multiprocessing's own exit hook, so it runs first (atexit is
        # LIFO): that hook SIGTERMs daemonic children and then joins them, which would wait
        # forever for loader workers that ignore SIGTERM.
        atexit.register(kill_forked_daemons)
        if os.environ.get("TORCHELASTIC_RUN_ID"):  # a torchrun rank dies with its agent
            die_with_parent()
    if not checkpoint_writer or _manager is not None:
        return
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from torch import multiprocessing as mp

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=_manager_init)
        _manager = manager
        filesystem_async._results_queue = manager.Queue()
