"""Name the rank that is dead or stuck when a collective fails, instead of hanging or guessing.

What this file does: every rank records the step it is starting in the rendezvous store
(``mm_megatron/step/<rank>``, one small ``set`` per step). When a collective fails (a peer's
sockets closed because it died, or `train.dist_timeout_s` ran out because a peer is stopped or
wedged), `Heartbeat.watch` turns the backend's error into a one-line `PeerFailure` that names
the ranks still behind this one, read back from the store with a short timeout, e.g.::

    rank 1: collective failed at step 5 after 20.1s (Timed out waiting 20000ms ...); ranks behind:
    rank 0 (last started step 4)

The job then exits non-zero; the launcher's restart policy decides what happens next.

What it does not do: set the timeout (`mm_megatron.runtime.distributed.initialize`), handle
signals (the trainer) or kill helper processes (`mm_megatron.runtime.children`).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as dist

KEY = "mm_megatron/step/{rank}"
"""Store key of one rank's step counter."""

STORE_READ_TIMEOUT_S = 3.0
"""How long a failing rank waits for each peer's counter (its host may be the dead rank)."""

_COMM_ERROR_WORDS = (
    "gloo",
    "nccl",
    "connection closed",
    "connection reset",
    "broken pipe",
    "timed out",
    "timeout",
    "socket",
)


_SOURCE_LOCATION = re.compile(r"\[[^\]\s]*\.(?:cc|cpp|h|hpp):\d+\]\s*")
"""A C++ source location as gloo/NCCL prefix their messages with (``[/.../pair.cc:534] ``)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return _SOURCE_LOCATION.sub("", text.splitlines()[0]) if text else type(exc).__name__


def _cause(exc: BaseException, limit: int = 160) -> str:
    """What failed, in one line: the innermost communication error of `exc`'s chain (a failed
    save wraps the gloo error) after the outer error's start, without C++ source locations; long
    ones keep head and tail (the tail says what happened: "Connection closed by peer", ...)."""
    chain, e = [], exc
    while e is not None and all(e is not seen for seen in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    inner = [e for e in chain[1:] if isinstance(e, RuntimeError) and is_comm_error(e)]
    text = _first_line(exc)
    if inner:  # its first sentence: gloo appends advice ("This is likely caused by ...")
        text = f"{text[:60]}...: {_first_line(inner[-1]).split('. ')[0]}"
    if len(text) > limit:
        head = limit // 2
        text = text[:head] + " ... " + text[-(limit - head - 5) :]
    return text


class PeerFailure(RuntimeError):
    """A collective failed because a peer rank died or stopped responding (one line)."""


def is_comm_error(exc: BaseException) -> bool:
    """Whether `exc` came from a failed collective (gloo/NCCL error, peer closed, timeout)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(word in text for word in _COMM_ERROR_WORDS)


class Heartbeat:
    """This rank's step counter in the rendezvous store; see the module docstring.

    Args:
        rank: This rank.
        world: World size (1: no store, nothing recorded).
    """

    def __init__(self, rank: int, world: int):
        self.rank = rank
        self.world = world
        self.step = 0
        """The step this rank started last."""
        self._since = time.monotonic()
        self.store = None
        if world > 1 and dist.is_initialized():
            with contextlib.suppress(Exception):
                self.store = dist.distributed_c10d._get_default_store()

    def beat(self, step: int) -> None:
        """Record that this rank starts `step` (best effort)."""
        self.step = step
        self._since = time.monotonic()
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.set(KEY.format(rank=self.rank), str(step))

    def peer_steps(self) -> dict[int, int | None]:
        """Each other rank's last recorded step (None: unreadable)."""
        out: dict[int, int | None] = {}
        if self.store is None:
            return out
        with contextlib.suppress(Exception):
            self.store.set_timeout(timedelta(seconds=STORE_READ_TIMEOUT_S))
        deadline = time.monotonic() + 2 * STORE_READ_TIMEOUT_S
        for r in range(self.world):
            if r == self.rank:
                continue
            if time.monotonic() > deadline:
                out[r] = None
                continue
            try:
                out[r] = int(self.store.get(KEY.format(rank=r)))
            except Exception:  # store down (its host died) or key never written
                out[r] = None
        return out

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Turn a collective failure inside the block into a `PeerFailure` naming late ranks."""
        try:
            yield
        except Exception as e:
            if self.world == 1 or not is_comm_error(e):
                raise
            raise PeerFailure(self.describe(e, self.step, time.monotonic() - self._since)) from e

    def describe(self, exc: BaseException, step: int, waited_s: float) -> str:
        """The one-line message for a collective that failed at `step`, `waited_s` into it."""
        first = _cause(exc)
        steps = self.peer_steps()
        behind = [
            f"rank {r} (last started step {s})"
            for r, s in steps.items()
            if s is not None and s < step
        ]
        silent = [str(r) for r, s in steps.items() if s is None]
        parts = []
        if behind:
            parts.append("ranks behind: " + ", ".join(behind))
        if silent:
            parts.append("no answer from rank(s) " + ",".join(silent))
        if not parts:
            peers = ",".join(str(r) for r in steps)
            parts.append(f"rank(s) {peers} all began this step; one of them died or hung in it")
        return (
            f"rank {self.rank}: collective failed in step {step}, {waited_s:.1f}s after it began "
            f"({first}); " + "; ".join(parts)
        )
