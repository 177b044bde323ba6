"""A real two-node SLURM cluster on one machine, for the `slurm` test tier.

What this file does: `SlurmCluster.start()` installs Debian's ``slurmctld slurmd slurm-client
munge`` with apt-get when they are missing, creates a bridge on a private subnet (10.77.0.0/24 by
default) and one network namespace per node, each joined to the bridge by a veth pair and given
its own ``/etc/hosts`` (bind-mounted in a private mount namespace), writes a munge
key, ``slurm.conf`` and ``cgroup.conf`` under a temporary root, and starts ``munged``,
``slurmctld`` (on the bridge address, in the root namespace) and one ``slurmd -N nodeK`` inside
each namespace. `stop()` kills exactly the daemons it started, deletes the namespaces and links,
also after a failed start (the caller removes the root directory).

Traffic stays on 127.0.0.0/8 and the addresses of the namespaces this file creates.

What it does not do: submit jobs or assert anything (the tests do). Needs root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
"""Debian packages the cluster needs."""

BINARIES = ("slurmctld", "slurmd", "slurmstepd", "sbatch", "scontrol", "munged")


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be installed or started here (the message says why)."""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def ensure_installed() -> None:
    """apt-get install the SLURM packages when a binary is missing; ClusterUnavailable if not."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("SLURM is not installed and apt-get needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
    ):
        try:
            subprocess.run(
                cmd,
                check=True,
                capture_output=True,
                text=True,
                env=env,
                stdin=subprocess.DEVNULL,
                timeout=900,
            )
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            raise ClusterUnavailable(
                f"apt-get cannot install SLURM ({' '.join(cmd)}): {detail.strip()[-300:]}"
            ) from e


class SlurmCluster:
    """Two (or more) slurmd nodes in network namespaces plus slurmctld; see the module docstring.

    Args:
        root: Empty directory for configs, state, logs and the munge socket.
        nodes: Number of compute nodes.
        subnet: First three octets of the private /24 (nodes get .1, .2, ...; slurmctld .254).
        tag: Prefix of the bridge, veth and namespace names (short: Linux allows 15 characters).
    """

    def __init__(self, root: Path, nodes: int = 2, subnet: str = "10.77.0", tag: str = "mmslurm"):
        self.root = Path(root)
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.subnet = subnet
        self.tag = tag
        self.bridge = f"{tag}br"
        self.ctl_addr = f"{subnet}.254"
        self.procs: list[subprocess.Popen] = []
        self._netns: list[str] = []
        self._links: list[str] = []
        self.conf = self.root / "slurm.conf"

    # --- naming ---------------------------------------------------------------------------------
    def netns(self, node: str) -> str:
        """Network namespace of `node`."""
        return f"{self.tag}-{node}"

    def addr(self, node: str) -> str:
        """IPv4 address of `node`."""
        return f"{self.subnet}.{self.nodes.index(node) + 1}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for SLURM clients (sbatch, scontrol, squeue) run against this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # --- set-up ---------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        """Install if needed, build the network, start the daemons, wait for idle nodes."""
        if os.geteuid() != 0:
            raise ClusterUnavailable("the SLURM tier needs root (ip netns, apt-get, slurmd)")
        ensure_installed()
        try:
            self._network()
            self._munge()
            self._write_config()
            self._daemons()
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def _network(self) -> None:
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        self._links.append(self.bridge)
        _run(["ip", "addr", "add", f"{self.ctl_addr}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        hosts = "127.0.0.1 localhost\n" + "".join(f"{self.addr(n)} {n}\n" for n in self.nodes)
        hosts += f"{self.ctl_addr} {socket.gethostname()}\n"
        for i, node in enumerate(self.nodes, start=1):
            ns, veth = self.netns(node), f"{self.tag}v{i}"
            _run(["ip", "netns", "add", ns])
            self._netns.append(ns)
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            self._links.append(veth)
            _run(["ip", "link", "set", veth, "master", self.bridge])
            _run(["ip", "link", "set", veth, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.addr(node)}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            (self.root / f"hosts-{node}").write_text(hosts)

    def _munge(self) -> None:
        d = self.root / "munge"
        d.mkdir(mode=0o700)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = d / "munge.socket"
        self._spawn(
            "munged",
            [
                "munged",
                "-F",
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={d / 'munged.pid'}",
                f"--log-file={d / 'munged.log'}",
                f"--seed-file={d / 'munged.seed'}",
            ],
        )
        _wait_for(lambda: self.munge_socket.exists(), 10, "munged did not create its socket")

    def _write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log", *(f"spool/{n}" for n in self.nodes)):
            (r / sub).mkdir()
        cpus = os.cpu_count() or 1
        nodes = "\n".join(
            f"NodeName={n} NodeAddr={self.addr(n)} NodeHostname={n} CPUs={cpus} "
            "RealMemory=1000 State=UNKNOWN"
            for n in self.nodes
        )
        # NOTE: cred_expire=10: slurmctld holds a requeued job for cred_expire + 1 s (120 s by
        # default) before it may start again; the preemption test would spend 2 minutes waiting.
        self.conf.write_text(
            f"""# written by tests/slurm/cluster.py
ClusterName=mmtest
SlurmctldHost={socket.gethostname()}({self.ctl_addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
SlurmctldPort=46817
SlurmdPort=46818
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
KillWait=30
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
{nodes}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        )
        (r / "cgroup.conf").write_text("CgroupAutomount=no\n")

    def _daemons(self) -> None:
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            # NOTE: not `ip netns exec`, which remounts /sys (slurmd needs /sys/fs/cgroup): join
            # the network namespace, then give the node its own /etc/hosts in a private mount
            # namespace.
            hosts = self.root / f"hosts-{node}"
            slurmd = f"slurmd -D -N {node} -f {self.conf}"
            cmd = [
                "nsenter",
                f"--net=/run/netns/{self.netns(node)}",
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"hostname {node} && mount --bind {hosts} /etc/hosts && exec {slurmd}",
            ]
            self._spawn(f"slurmd-{node}", cmd)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.out", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "SLURM_CONF": str(self.conf)},
        )
        proc.name, proc.log = name, log  # type: ignore[attr-defined]
        self.procs.append(proc)

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            for p in self.procs:
                if p.poll() is not None:
                    raise ClusterUnavailable(
                        f"{p.name} exited with {p.returncode}: {self.tail(p.name)}"  # type: ignore[attr-defined]
                    )
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, env=self.env
            ).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            return all(states.get(n, "").startswith("idle") for n in self.nodes)

        _wait_for(idle, timeout, "nodes did not become idle", self.logs)

    # --- use --------------------------------------------------------------------------------------
    def tail(self, name: str, chars: int = 1500) -> str:
        """The end of a daemon's console output."""
        path = self.root / f"{name}.out"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def logs(self) -> str:
        """The end of every daemon log (for failure messages)."""
        out = []
        for path in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-1500:]}")
        return "\n".join(out)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, check=check)

    # --- tear-down --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel this cluster's jobs, kill its daemons, remove namespaces, links and files."""
        if any(p.poll() is None for p in self.procs) and self.conf.exists():
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    ["scancel", "--full", "--user=root"],
                    env=self.env,
                    capture_output=True,
                    timeout=10,
                )
                time.sleep(1)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.log.close()  # type: ignore[attr-defined]
        self.procs = []
        for ns in self._netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in self._links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        self._netns, self._links = [], []


def _wait_for(check, timeout: float, what: str, detail=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    extra = detail() if detail else ""
    raise ClusterUnavailable(f"{what} within {timeout:.0f}s\n{extra}")
