"""The `slurm` tier's fixtures: one real two-node cluster per session, a tiny dataset, helpers."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.slurm.cluster import ClusterUnavailable, SlurmCluster, ensure_installed


@pytest.fixture(scope="session")
def cluster():
    """A running two-node SLURM cluster (skipped, with the reason, only if SLURM cannot install)."""
    try:
        ensure_installed()
    except ClusterUnavailable as e:
        print(f"\nSKIP slurm tier: {e}")
        pytest.skip(str(e))
    root = Path(tempfile.mkdtemp(prefix="mm-slurm-"))
    c = SlurmCluster(root)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_data(tmp_path_factory):
    """The tiny synthetic dataset every SLURM job trains on."""
    from tests.train_helpers import write_tiny_dataset

    out = tmp_path_factory.mktemp("slurm-data")
    write_tiny_dataset(out)
    return out


def launch(cluster: SlurmCluster, *args: str, cwd: Path | None = None, env=None):
    """Run ``python -m mm_megatron launch ARGS`` against `cluster`."""
    return subprocess.run(
        [sys.executable, "-m", "mm_megatron", "launch", *args],
        capture_output=True,
        text=True,
        env={**cluster.env, **(env or {})},
        cwd=cwd,
        timeout=120,
    )


def submitted_ids(out: str) -> list[str]:
    """Job ids from `mm-megatron launch slurm`'s output."""
    return re.findall(r"submitted \S+: job (\d+)", out)


def job_field(cluster: SlurmCluster, job_id: str, name: str) -> str:
    """One ``scontrol show job`` field (e.g. JobState, Restarts, ExitCode)."""
    out = cluster.run("scontrol", "show", "job", job_id, check=False).stdout
    m = re.search(rf"\b{name}=(\S+)", out)
    return m.group(1) if m else ""


def wait_job(cluster: SlurmCluster, job_id: str, timeout: float, logs: Path | None = None) -> str:
    """Wait until `job_id` is finished; returns its final JobState."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_field(cluster, job_id, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    detail = ""
    if logs is not None:
        detail = "\n".join(p.read_text(errors="replace")[-2000:] for p in logs.rglob("*.log"))
    raise AssertionError(
        f"job {job_id} still {job_field(cluster, job_id, 'JobState')} after {timeout}s\n{detail}"
    )
