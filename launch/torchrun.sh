#!/usr/bin/env bash
# Start mm-megatron training on this node with torchrun (sane env defaults, one log file per rank,
# only rank 0 on the console, SIGTERM/SIGUSR1 -> every rank checkpoints and exits 0).
#
# One node, 8 GPUs:
#   launch/torchrun.sh --nproc-per-node 8 --log-dir runs/s1/logs -- \
#       --config examples/llava-1.5-7b-stage1.yaml
# Two nodes (run on each; HEAD is the first node's routable address):
#   launch/torchrun.sh --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HEAD:29500 \
#       --log-dir runs/s1/logs -- --config examples/llava-1.5-7b-stage1.yaml
# CPU smoke test (2 gloo ranks):
#   launch/torchrun.sh --nproc-per-node 2 -- --preset debug-tiny --train.train_iters=5
# Everything after `--` goes to `mm-megatron train`. Same as `mm-megatron launch torchrun ...`.
# PYTHON=/path/to/python picks the interpreter (default: the repository's .venv, else python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-$([ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3)}
exec "$PYTHON" -m mm_megatron launch torchrun "$@"
