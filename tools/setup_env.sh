#!/usr/bin/env bash
# Create .venv/ with a Python >= 3.12 interpreter and install mm_megatron[dev] into it.
#   bash tools/setup_env.sh            (what `make install` runs)
#   PYTHON=/path/to/python3.12 bash tools/setup_env.sh
# Interpreter search order: $PYTHON, python3, python3.12, python3.13, pyenv's versions/3.1[2-9]*.
set -euo pipefail
cd "$(dirname "$0")/.."
ok() { "$1" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
candidates=("${PYTHON:-}" python3 python3.12 python3.13)
pyroot=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for d in $(ls -d "$pyroot"/versions/3.1[2-9]* 2>/dev/null | sort -V); do candidates+=("$d/bin/python3"); done
PY=""
for c in "${candidates[@]}"; do
  [ -n "$c" ] || continue
  if ok "$c"; then PY=$c; break; fi
done
if [ -z "$PY" ]; then
  echo "setup_env: mm_megatron needs Python >= 3.12 (megatron-core 0.19.2 requires it)." >&2
  echo "  Tried: \$PYTHON='${PYTHON:-}', python3, python3.12, python3.13, $pyroot/versions/3.1[2-9]*" >&2
  echo "  Install one (e.g. 'pyenv install 3.12') or point PYTHON=/path/to/python3.12 at it." >&2
  exit 1
fi
echo "setup_env: using $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
if [ ! -x .venv/bin/python ] || ! ok .venv/bin/python; then
  rm -rf .venv
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, megatron.core as m; print('setup_env: torch', torch.__version__, '| megatron-core', m.__version__)"
