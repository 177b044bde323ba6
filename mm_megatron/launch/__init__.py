"""Launching jobs: torchrun on one or more nodes, SLURM batch jobs, and preflight checks.

Modules: `env` (rank variables, launch defaults), `preflight` (rendezvous address, port,
all-reduce, layout), `torchrun` (the per-node launcher), `sbatch` (script generation and
submission). The command line is `mm_megatron.commands.launch_cmd`; the sbatch template and a
torchrun wrapper script live in the repository's top-level ``launch/`` folder.
"""
