"""Real SLURM jobs on a two-node cluster (network namespaces on this machine), gloo on the CPU.

- a chained two-stage submission: stage 2 starts after stage 1 and loads its final checkpoint;
  stage 1 is a two-node job (one rank per node, c10d rendezvous across the namespaces) and is
  also the uninterrupted reference of the preemption test;
- preemption: SIGUSR1 to the batch shell after the first checkpoint -> every rank saves -> the
  job requeues itself -> resumes -> finishes; the step counter is continuous and every loss
  equals the uninterrupted run's. The timeline is printed (run with -s to see it);
- bad input: a layout that cannot fit is refused before submission; an unreachable rendezvous
  host fails the preflight naming the node.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from mm_megatron.train.metrics import read_metrics
from tests.slurm.conftest import job_field, launch, submitted_ids, wait_job
from tests.train_helpers import data_overrides

pytestmark = pytest.mark.slurm

ITERS = 24
SAVE_INTERVAL = 3
STAGE2_ITERS = 3


def common_args(data: Path) -> list[str]:
    """Train arguments shared by every job here (DP=2: one CPU rank on each node)."""
    args = ["--preset", "debug-tiny"]
    args += [f"--data.{k}={v}" for k, v in data_overrides(data).items() if k != "num_workers"]
    args += ["--data.num_workers=1"]  # loader workers on, as in the field
    train = {
        "micro_batch_size": 4,
        "global_batch_size": 8,
        "lr": 2e-3,
        "lr_warmup_iters": 1,
        "eval_iters": 0,
        "caption_eval": False,
        "num_threads": 1,
        "log_interval": 1,
        "save_interval": SAVE_INTERVAL,
        "dist_timeout_s": 60,
    }
    return args + [f"--train.{k}={v}" for k, v in train.items()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {it: r["loss"] for it, r in read_metrics(run_dir / "metrics.jsonl").items()}


def _grep(root: Path, pattern: str) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.log")):
        out += [m.group(0) for m in re.finditer(pattern, path.read_text(errors="replace"))]
    return out


@pytest.fixture(scope="module")
def chain(cluster, slurm_data, tmp_path_factory):
    """Stage 1 (ITERS steps, two nodes) then stage 2 (afterok), submitted with --stages."""
    root = tmp_path_factory.mktemp("chain")
    (root / "s1.yaml").write_text(f"description: stage 1\ntrain:\n  train_iters: {ITERS}\n")
    (root / "s2.yaml").write_text(
        f"description: stage 2\ntrain:\n  train_iters: {STAGE2_ITERS}\n  lr: 1.0e-3\n"
    )
    stages = f"{root / 's1.yaml'},{root / 's2.yaml'}"
    out = root / "out"
    proc = launch(
        cluster,
        *("slurm", "--nodes", "2", "--gpus-per-node", "0", "--output-dir", str(out)),
        *("--job-name", "chain", "--stages", stages, "--", *common_args(slurm_data)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = submitted_ids(proc.stdout)
    assert len(ids) == 2, proc.stdout
    states = [wait_job(cluster, i, 420, out) for i in ids]
    return {"ids": ids, "states": states, "out": out}


def test_two_node_job_and_chained_stages(cluster, chain):
    s1, s2 = chain["out"] / "stage1-s1", chain["out"] / "stage2-s2"
    assert chain["states"] == ["COMPLETED", "COMPLETED"], (chain, cluster.logs())
    assert (s1 / "job.sbatch").is_file() and (s2 / "job.sbatch").is_file()
    assert f"--dependency=afterok:{chain['ids'][0]}" in (s2 / "job.sbatch").read_text()
    # two nodes took part: the preflight all-reduce ran on both, then training on DP=2
    assert _grep(s1 / "logs", r"gloo all-reduce over 2 ranks on node1, node2 ok")
    assert _grep(s1 / "logs", r"world=2 TP=1 PP=1 CP=1 DP=2")
    assert (s1 / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(
        ITERS
    )
    assert sorted(_losses(s1)) == list(range(1, ITERS + 1))
    # stage 2 started after stage 1 ended and began from its final weights
    end1 = job_field(cluster, chain["ids"][0], "EndTime")
    start2 = job_field(cluster, chain["ids"][1], "StartTime")
    assert start2 >= end1, (end1, start2)
    assert _grep(s2 / "logs", rf"initial weights from \S*stage1-s1/checkpoints iteration {ITERS}")
    ck2 = s2 / "checkpoints" / "latest_checkpointed_iteration.txt"
    assert ck2.read_text().strip() == str(STAGE2_ITERS)


def test_preemption_checkpoints_requeues_and_resumes_exactly(cluster, slurm_data, chain, tmp_path):
    out = tmp_path / "job"
    args = [*common_args(slurm_data), f"--train.train_iters={ITERS}"]
    args += [f"--train.run_dir={out / 'run'}", f"--train.save={out / 'ckpt'}"]
    proc = launch(
        cluster,
        *("slurm", "--nodes", "2", "--gpus-per-node", "0", "--output-dir", str(out)),
        *("--job-name", "preempt", "--max-restarts", "2", "--", *args),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = submitted_ids(proc.stdout)
    tracker = out / "ckpt" / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + 180
    while not tracker.exists():
        assert time.monotonic() < deadline, f"no checkpoint after 180s\n{cluster.logs()}"
        time.sleep(0.2)
    first_ckpt = tracker.read_text().strip()
    sent = time.strftime("%H:%M:%S", time.gmtime())
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    state = wait_job(cluster, job, 420, out / "logs")
    assert state == "COMPLETED", (state, _grep(out / "logs", r".*error.*"))
    restarts = int(job_field(cluster, job, "Restarts") or 0)
    assert restarts == 1, f"expected one requeue, got {restarts}"

    stopped = [
        int(x)
        for x in _grep(out / "logs" / f"job{job}_restart0", r"(?<=stopping after iteration )\d+")
    ]
    saved = _grep(out / "logs" / f"job{job}_restart0", r"(?<=saved iteration )\d+")
    resumed = _grep(
        out / "logs" / f"job{job}_restart1", r"resumed from \S+ iteration \d+ \(step \d+\)"
    )
    assert stopped and saved and resumed, "missing signal/save/resume lines in the job logs"
    k = stopped[0]
    assert str(k) in saved and f"iteration {k} (step {k})" in resumed[0]
    assert k < ITERS, f"the run finished ({k}) before the signal arrived"
    losses, reference = _losses(out / "run"), _losses(chain["out"] / "stage1-s1")
    assert sorted(losses) == list(range(1, ITERS + 1))  # continuous: no lost or repeated step
    assert losses == reference, {
        i: (losses[i], reference[i]) for i in losses if losses[i] != reference.get(i)
    }
    print(
        f"\n[preemption timeline] job {job}: first checkpoint at step {first_ckpt}; "
        f"scancel --signal=USR1 --batch at {sent} UTC (restart 0) -> ranks stopped after step {k} "
        f"and saved iteration {k} -> scontrol requeue -> restart {restarts} {resumed[0]} -> "
        f"finished step {ITERS}, final loss {losses[ITERS]:.6f} == uninterrupted "
        f"{reference[ITERS]:.6f}"
    )


def test_layout_that_cannot_fit_is_refused_before_submission(cluster, slurm_data, tmp_path):
    before = cluster.run("squeue", "-h", "-o", "%i").stdout.split()
    proc = launch(
        cluster,
        *("slurm", "--nodes", "2", "--gpus-per-node", "0", "--output-dir", str(tmp_path)),
        *("--", *common_args(slurm_data), "--tensor-model-parallel-size", "3"),
    )
    assert proc.returncode == 2
    assert "world size 2 is not divisible by TP*PP*CP" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "job.sbatch").exists()
    assert cluster.run("squeue", "-h", "-o", "%i").stdout.split() == before


def test_unreachable_rendezvous_host_fails_preflight_naming_the_node(cluster, slurm_data, tmp_path):
    proc = launch(
        cluster,
        *("slurm", "--nodes", "2", "--gpus-per-node", "0", "--output-dir", str(tmp_path)),
        *("--", *common_args(slurm_data), "--train.train_iters=2"),
        env={"MM_RDZV_HOST": "10.77.0.99"},  # inside the test subnet, but no node has it
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (job,) = submitted_ids(proc.stdout)
    assert wait_job(cluster, job, 120, tmp_path / "logs") == "FAILED"
    assert job_field(cluster, job, "ExitCode") == "2:0"
    lines = _grep(tmp_path / "logs", r".*rendezvous address 10\.77\.0\.99 is not an address.*")
    assert lines and "node node1" in lines[0], _grep(tmp_path / "logs", r".*")
    assert not _grep(tmp_path / "logs", r"training starts")
