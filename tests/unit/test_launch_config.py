"""Launch configuration in one process: rank variables, env defaults, torchrun argv, sbatch text,
preflight refusals (loopback rendezvous, address not on the head node, layouts that cannot fit)."""

from __future__ import annotations

import socket

import pytest

from mm_megatron.cli import main
from mm_megatron.launch import env, preflight, sbatch
from mm_megatron.launch.env import (
    LaunchError,
    default_env,
    export_rank_env,
    port_for_job,
    read_rank_env,
)
from mm_megatron.launch.torchrun import TorchrunOptions, torchrun_argv
from mm_megatron.train.heartbeat import Heartbeat, is_comm_error


def test_rank_env_prefers_torchrun_then_slurm_then_single():
    torchrun = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_ID": "0",
    }
    i = read_rank_env(torchrun)
    assert (i.rank, i.world_size, i.local_rank, i.local_world_size, i.node_rank) == (5, 8, 1, 4, 1)
    slurm = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    }
    info = read_rank_env(slurm)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 4, 1, 2)
    assert info.source == "slurm"
    # the batch shell of a job (no step) or one task: a single process
    assert read_rank_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).source == "single"
    with pytest.raises(LaunchError, match="SLURM_NTASKS='x'"):
        read_rank_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "x", "SLURM_STEP_ID": "0"})


def test_export_rank_env_for_one_srun_task_per_rank():
    env = {
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "4242",
        "MASTER_ADDR": "10.0.0.1",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    }
    export_rank_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("1", "2", "0")
    assert env["MASTER_PORT"] == str(port_for_job(4242)) and env["MASTER_ADDR"] == "10.0.0.1"
    assert port_for_job(4242) != port_for_job(4243)


def test_default_env_rules_and_existing_values_win():
    env = default_env(4, tp=2, cpus=16, env={})
    assert env == {
        "OMP_NUM_THREADS": "4",
        "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    }
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in default_env(8, tp=1, cp=1, cpus=8, env={})
    assert "CUDA_DEVICE_MAX_CONNECTIONS" in default_env(8, cp=2, cpus=8, env={})
    assert "OMP_NUM_THREADS" not in default_env(2, cpus=8, env={"OMP_NUM_THREADS": "7"})


def test_torchrun_argv_single_node_multi_node_and_echo():
    one = torchrun_argv(TorchrunOptions(2, log_dir="/l", train_args=["--preset", "x"]))
    assert "--standalone" in one and one[-4:] == ["mm_megatron", "train", "--preset", "x"]
    assert one[one.index("--tee") + 1] == "3" and one[one.index("--local-ranks-filter") + 1] == "0"
    assert one[one.index("--signals-to-handle") + 1] == "SIGHUP,SIGQUIT"
    other = torchrun_argv(
        TorchrunOptions(8, nnodes=2, node_rank=1, rdzv_endpoint="h:1", rdzv_id="7", log_dir="/l")
    )
    assert other[other.index("--rdzv-endpoint") + 1] == "h:1" and "--redirects" in other
    assert "--tee" not in other  # only global rank 0 echoes
    with pytest.raises(ValueError, match="rdzv-endpoint"):
        torchrun_argv(TorchrunOptions(8, nnodes=2))


def test_sbatch_script_has_rendezvous_preemption_and_logs(tmp_path):
    opts = sbatch.SlurmOptions(
        nodes=4,
        gpus_per_node=8,
        output_dir=str(tmp_path),
        time="04:00:00",
        partition="batch",
        max_restarts=5,
        signal_lead=120,
        train_args=["--config", "a b.yaml"],
    )
    text = sbatch.render(opts)
    for needle in (
        "#SBATCH --nodes=4",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --partition=batch",
        "scontrol show hostnames",
        "--kill-on-bad-exit=1",
        "scontrol requeue",
        "MAX_RESTARTS=${MM_MAX_RESTARTS:-5}",
        "--nproc-per-node 8",
        "SLURM_JOB_ID % 20000",
        'LOG_DIR="$OUT/logs/job${SLURM_JOB_ID}_restart${RESTART}"',
        "TRAIN_ARGS=(--config 'a b.yaml')",
    ):
        assert needle in text, needle
    cpu = sbatch.render(sbatch.SlurmOptions(nodes=2, gpus_per_node=0, output_dir=str(tmp_path)))
    assert "--gpus-per-node=" not in cpu.split("set -uo")[0] and "--nproc-per-node 1" in cpu


def test_stages_chain_save_and_load(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("{}\n")
    b.write_text("{}\n")
    opts = sbatch.SlurmOptions(nodes=1, gpus_per_node=0, output_dir=str(tmp_path / "o"))
    s1, s2 = sbatch.stage_options(opts, [str(a), str(b)])
    assert s1.train_args[-4:] == [
        "--save",
        str(tmp_path / "o/stage1-a/checkpoints"),
        "--run-dir",
        str(tmp_path / "o/stage1-a"),
    ]
    assert s2.train_args[-2:] == ["--load", str(tmp_path / "o/stage1-a/checkpoints")]
    with pytest.raises(LaunchError, match="stage 2 config .*missing.yaml does not exist"):
        sbatch.stage_options(opts, [str(a), str(tmp_path / "missing.yaml")])


def test_preflight_refuses_loopback_foreign_address_busy_port_and_bad_layout():
    with pytest.raises(LaunchError, match="resolves only to loopback 127.0.0.1"):
        env.resolve_address("localhost")
    with pytest.raises(LaunchError, match="'no-such-host.invalid' does not resolve"):
        env.resolve_address("no-such-host.invalid")
    assert env.resolve_address("10.1.2.3") == "10.1.2.3"
    with pytest.raises(LaunchError, match="not an address of this \\(head\\) node"):
        preflight.check_head("192.0.2.77", 29500)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(LaunchError, match=f"port 127.0.0.1:{port} is not free"):
            preflight.check_head("127.0.0.1", port)
    with pytest.raises(LaunchError, match="world size 6 is not divisible by TP\\*PP\\*CP"):
        preflight.check_layout(
            ["--preset", "debug-tiny", "--tensor-model-parallel-size", "4"], 3, 2
        )
    ok = preflight.check_layout(
        ["--preset", "debug-tiny", "--global-batch-size", "8", "--micro-batch-size", "2"], 2, 2
    )
    assert ok == "world 4 = TP 1 x PP 1 x CP 1 x DP 4"


def test_launch_check_cli_one_line_error(capsys):
    assert main(["launch", "check", "--rdzv-host", "localhost"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mm-megatron launch: error: node ")


def test_dry_run_prints_both_stages_and_refuses_bad_layout(tmp_path, capsys):
    a = tmp_path / "a.yaml"
    a.write_text("train:\n  train_iters: 2\n")
    argv = [
        "launch",
        "slurm",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--output-dir",
        str(tmp_path / "o"),
        "--stages",
        f"{a},{a}",
        "--dry-run",
        "--",
        "--preset",
        "debug-tiny",
        "--global-batch-size",
        "32",
        "--micro-batch-size",
        "1",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("#!/bin/bash") == 2 and "--dependency=afterok:<job id of stage 1>" in out
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
    assert main([*argv[:-2], "--micro-batch-size", "8"]) == 2  # 8 x DP 32 > global batch 32
    assert "global batch 32 is not a multiple" in capsys.readouterr().err


def test_heartbeat_message_names_the_late_rank():
    hb = Heartbeat(rank=0, world=3)
    hb.peer_steps = lambda: {1: 7, 2: 6}
    msg = hb.describe(RuntimeError("gloo: Timed out waiting 20000ms for recv"), 7, 20.4)
    assert msg.startswith("rank 0: collective failed in step 7, 20.4s after it began")
    assert "ranks behind: rank 2 (last started step 6)" in msg and "rank 1" not in msg
    assert is_comm_error(RuntimeError("[gloo] Connection reset by peer"))
    assert not is_comm_error(ValueError("bad value"))


def test_peer_failure_cause_keeps_what_happened():
    """A long cause (a failed save's path, gloo's C++ source location) keeps its tail."""
    from mm_megatron.train.heartbeat import _cause

    err = RuntimeError(
        "saving checkpoint iteration 4 to /tmp/" + "x" * 120 + "/ck failed: RuntimeError: "
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection "
        "closed by peer [127.0.0.1]:12345"
    )
    text = _cause(err)
    assert len(text) <= 160 and "pair.cc" not in text
    assert text.startswith("saving checkpoint iteration 4") and "Connection closed by peer" in text


def test_peer_failure_cause_digs_out_the_wrapped_comm_error():
    from mm_megatron.train.heartbeat import _cause

    inner = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed")
    try:
        try:
            raise inner
        except RuntimeError as e:
            raise RuntimeError(
                "saving checkpoint iteration 4 to /tmp/" + "y" * 90 + " failed: RuntimeError: "
                "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed; removed "
                ".tmp_iter_0000004; the latest checkpoint stays iteration 2"
            ) from e
    except RuntimeError as outer:
        text = _cause(outer)
    assert text.startswith("saving checkpoint iteration 4") and text.endswith("Connection closed")
