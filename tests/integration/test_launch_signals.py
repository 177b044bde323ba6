"""Signals and deaths as operators and schedulers deliver them, with DataLoader workers on.

- SIGTERM to the whole process group of `mm-megatron launch torchrun` (2 gloo ranks, 2 loader
  workers each): every rank saves after its current step, exit 0, nothing left running;
- SIGTERM to the process group of a `num_workers=0` run: megatron's checkpoint writer survives
  it (it used to die with BrokenPipeError and leave ``.tmp_iter_*``);
- SIGKILL of one rank of a DP=2 job started one process per rank, as srun does: the survivor
  stops within seconds naming the failure, and no helper process of either rank survives;
- SIGSTOP of one rank: the survivor stops after `train.dist_timeout_s`, naming the late rank.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from mm_megatron.train import checkpointing as ckpt
from tests.train_helpers import cli_args, kill_session, write_tiny_dataset

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_tiny_dataset(out)
    return out


def _args(data_dir, run, workers: int, **train) -> list[str]:
    args = cli_args(data_dir, run, save=str(run / "ck"), train_iters=1000, **train)
    return [*args, f"--data.num_workers={workers}"]


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def _start(cmd: list[str], log, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mm_megatron", *cmd],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(**env),
        start_new_session=True,
    )


def _wait_for(path, pattern: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, path.read_text(errors="replace")):
            return
        assert proc.poll() is None, path.read_text(errors="replace")[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not seen in {timeout}s:\n{path.read_text()[-3000:]}")


def _session(pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == pid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def _no_survivors(*pids: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for pid in pids for p in _session(pid)]
        if not left:
            return
        time.sleep(0.2)
    raise AssertionError(f"still alive: {[(p.pid, p.cmdline()[:4]) for p in left]}")


def test_sigterm_to_the_launcher_process_group_checkpoints_and_exits_0(data_dir, tmp_path):
    log_path = tmp_path / "out.log"
    with open(log_path, "w") as log:
        proc = _start(
            [
                "launch",
                "torchrun",
                "--nproc-per-node",
                "2",
                "--log-dir",
                str(tmp_path / "logs"),
                "--",
                *_args(data_dir, tmp_path, workers=2),
            ],
            log,
        )
        try:
            _wait_for(log_path, r"iteration\s+3/", proc)
            os.killpg(proc.pid, signal.SIGTERM)  # what `timeout`, Ctrl-C or a scheduler does
            proc.wait(timeout=120)
            _no_survivors(proc.pid)
        finally:
            kill_session(proc)
    out = log_path.read_text()
    assert proc.returncode == 0, out[-3000:]
    stopped = int(re.search(r"stopping after iteration (\d+)", out).group(1))
    assert ckpt.latest_iteration(tmp_path / "ck") == stopped
    assert not list((tmp_path / "ck").glob(".tmp_*"))
    assert len(list((tmp_path / "logs").rglob("stdout.log"))) == 2  # one log file per rank


def test_sigterm_to_the_group_without_workers_completes_the_save(data_dir, tmp_path):
    log_path = tmp_path / "out.log"
    with open(log_path, "w") as log:
        proc = _start(["train", *_args(data_dir, tmp_path, workers=0)], log)
        try:
            _wait_for(log_path, r"iteration\s+3/", proc)
            os.killpg(proc.pid, signal.SIGTERM)  # reaches megatron's writer Manager too
            proc.wait(timeout=120)
            _no_survivors(proc.pid)
        finally:
            kill_session(proc)
    out = log_path.read_text()
    assert proc.returncode == 0 and "BrokenPipeError" not in out, out[-3000:]
    stopped = int(re.search(r"stopping after iteration (\d+)", out).group(1))
    assert ckpt.latest_iteration(tmp_path / "ck") == stopped
    assert not list((tmp_path / "ck").glob(".tmp_*"))


def _two_ranks(data_dir, tmp_path, port: int, **train):
    """Two ranks started one process per rank with SLURM's variables, as srun does."""
    common = {
        "SLURM_NTASKS": "2",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    procs, logs = [], []
    for rank in range(2):
        path = tmp_path / f"rank{rank}.log"
        logs.append(path)
        with open(path, "w") as log:
            procs.append(
                _start(
                    ["train", *_args(data_dir, tmp_path, workers=2, **train)],
                    log,
                    SLURM_PROCID=str(rank),
                    SLURM_LOCALID=str(rank),
                    **common,
                )
            )
    return procs, logs


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
def test_a_dead_or_stopped_rank_ends_the_job_naming_it(data_dir, tmp_path, sig):
    timeout_s = 15
    procs, logs = _two_ranks(
        data_dir, tmp_path, _free_port(), save_interval=2, dist_timeout_s=timeout_s
    )
    try:
        _wait_for(logs[0], r"iteration\s+3/", procs[0])
        helpers = psutil.Process(procs[1].pid).children(recursive=True)
        assert helpers, "rank 1 has no loader workers / writer to orphan"
        procs[1].send_signal(sig)
        start = time.monotonic()
        procs[0].wait(timeout=timeout_s + 60)
        took = time.monotonic() - start
        _no_survivors(procs[0].pid)
        if sig == signal.SIGKILL:
            _no_survivors(procs[1].pid)  # rank 1's loader workers and writer died with it
    finally:
        for p in procs:
            kill_session(p)
    out = logs[0].read_text()
    last = out.strip().splitlines()[-1]
    assert procs[0].returncode == 1, out[-3000:]
    assert last.startswith("mm-megatron train: error: rank 0: collective failed in step"), last
    if sig == signal.SIGKILL:
        assert took < 10, f"the dead peer was seen after {took:.1f}s"
        assert "Connection" in last, last
    else:
        assert timeout_s <= took < timeout_s + 20, took
        assert "Timed out" in last, last
    assert re.search(r"rank(\(s\))? 1\b", last.split("; ", 1)[1]), last  # the peer is named
