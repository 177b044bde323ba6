"""``mm-megatron launch slurm``: write the job's sbatch script next to its logs, then submit it.

What this file does: `render(opts)` fills the template ``launch/job.sbatch`` (its header explains
what the script does: preflight, one srun task per node running `mm-megatron launch torchrun`
with c10d rendezvous on the head node, SIGUSR1 -> checkpoint -> ``scontrol requeue`` up to
``--max-restarts``, per-restart log directories). `submit(opts)` refuses a layout that cannot fit
(`preflight.check_layout`), writes ``<output-dir>/job.sbatch`` and runs ``sbatch --parsable``.
`stage_options` turns ``--stages a.yaml,b.yaml`` into one job per stage, each saving under
``<output-dir>/stage<k>-<name>/checkpoints``, stage k+1 loading stage k's final checkpoint and
depending on it with ``afterok``.

What it does not do: run anything on the compute nodes (the script does).
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from mm_megatron.launch.env import PORT_BASE, PORT_SPAN, LaunchError

TEMPLATE = Path(__file__).resolve().parents[2] / "launch" / "job.sbatch"
"""The sbatch template (top-level ``launch/`` folder of the repository)."""


class _Template(Template):
    delimiter = "@@"


@dataclass
class SlurmOptions:
    """What `mm-megatron launch slurm` takes besides the train arguments."""

    nodes: int
    """Nodes (one srun task per node)."""
    gpus_per_node: int
    """GPUs (= ranks) per node; 0 runs one CPU rank per node (gloo)."""
    output_dir: str
    """Job directory: the sbatch script, ``logs/`` and (by default) checkpoints."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    """Time limit (``HH:MM:SS`` or ``D-HH:MM:SS``)."""
    job_name: str = "mm-megatron"
    exclusive: bool = False
    container_image: str | None = None
    """pyxis ``--container-image`` for srun."""
    container_mounts: str | None = None
    """pyxis ``--container-mounts`` for srun."""
    dependency: str | None = None
    """e.g. ``afterok:12345``."""
    max_restarts: int = 3
    """Requeues after SIGUSR1 before the job gives up."""
    signal_lead: int = 300
    """Seconds before the time limit SLURM sends SIGUSR1 (``--signal=B:USR1@lead``)."""
    python: str | None = None
    """Command that runs Python on the nodes (default: this interpreter, or ``python`` in a
    container)."""
    preflight_timeout: int = 60
    """Seconds the preflight all-reduce may take."""
    train_args: list[str] = field(default_factory=list)
    """Arguments of ``mm-megatron train``."""

    @property
    def script_path(self) -> Path:
        """Where the generated script is written."""
        return Path(self.output_dir) / "job.sbatch"


def _directives(opts: SlurmOptions) -> list[str]:
    out = Path(opts.output_dir).absolute()
    pairs = [
        ("job-name", opts.job_name),
        ("nodes", opts.nodes),
        ("ntasks-per-node", 1),
        ("gpus-per-node", opts.gpus_per_node or None),
        ("partition", opts.partition),
        ("account", opts.account),
        ("qos", opts.qos),
        ("time", opts.time),
        ("dependency", opts.dependency),
        ("signal", f"B:USR1@{opts.signal_lead}"),
        ("output", out / "logs" / "slurm-%j.out"),
        ("open-mode", "append"),
    ]
    lines = [f"#SBATCH --{k}={v}" for k, v in pairs if v is not None]
    lines += ["#SBATCH --requeue"] + (["#SBATCH --exclusive"] if opts.exclusive else [])
    return lines


def render(opts: SlurmOptions) -> str:
    """The sbatch script for `opts`."""
    if opts.nodes < 1 or opts.gpus_per_node < 0:
        raise LaunchError(f"--nodes {opts.nodes} / --gpus-per-node {opts.gpus_per_node}")
    python = opts.python or ("python" if opts.container_image else sys.executable)
    srun_extra = ""
    if opts.container_image:
        srun_extra += f"--container-image={shlex.quote(opts.container_image)} "
        if opts.container_mounts:
            srun_extra += f"--container-mounts={shlex.quote(opts.container_mounts)} "
    return _Template(TEMPLATE.read_text()).substitute(
        directives="\n".join(_directives(opts)),
        output_dir=shlex.quote(str(Path(opts.output_dir).absolute())),
        max_restarts=opts.max_restarts,
        preflight_timeout=opts.preflight_timeout,
        python=shlex.join(shlex.split(python)),
        train_args=shlex.join(opts.train_args),
        port_base=PORT_BASE,
        port_span=PORT_SPAN,
        gpus_per_node=opts.gpus_per_node,
        nproc_per_node=max(1, opts.gpus_per_node),
        srun_extra=srun_extra,
    )


def stage_options(opts: SlurmOptions, stages: list[str]) -> list[SlurmOptions]:
    """One job per stage YAML; stage k+1 loads stage k's final checkpoint."""
    out, previous = [], None
    for k, config in enumerate(stages, start=1):
        if not Path(config).is_file():
            raise LaunchError(f"--stages: stage {k} config {config} does not exist")
        stage_dir = Path(opts.output_dir) / f"stage{k}-{Path(config).stem}"
        args = [*opts.train_args, "--config", config]
        args += ["--save", str(stage_dir / "checkpoints"), "--run-dir", str(stage_dir)]
        if previous is not None:
            args += ["--load", str(previous / "checkpoints")]
        name = f"{opts.job_name}-s{k}"
        out.append(
            dataclasses.replace(opts, output_dir=str(stage_dir), train_args=args, job_name=name)
        )
        previous = stage_dir
    return out


def submit(opts: SlurmOptions, env: dict[str, str] | None = None) -> str:
    """Write `opts.script_path` and ``sbatch`` it; returns the job id."""
    script = render(opts)
    opts.script_path.parent.mkdir(parents=True, exist_ok=True)
    (opts.script_path.parent / "logs").mkdir(exist_ok=True)
    opts.script_path.write_text(script)
    try:
        proc = subprocess.run(
            ["sbatch", "--parsable", str(opts.script_path)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    except FileNotFoundError:
        raise LaunchError(f"sbatch not found; the script is at {opts.script_path}") from None
    if proc.returncode:
        raise LaunchError(f"sbatch {opts.script_path} failed: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]
