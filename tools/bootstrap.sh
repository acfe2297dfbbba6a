#!/usr/bin/env bash
# Creates ./.venv (once) and installs the project into it with the versions verified to work
# together on CPU (requirements/lock.txt). torch==2.13.0 is installed FIRST so that no later
# dependency can pull a multi-GB CUDA build of torch. Safe to rerun: a finished install is
# recorded in .venv/.maspo-installed with the hash of the inputs and skipped next time.
#
# usage: bash tools/bootstrap.sh [dev]     (dev adds pytest, hypothesis, ruff, shellcheck, triton, wandb)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "dev" ] && extras="[dev]"
python_bin="${PYTHON:-python3}"
stamp_inputs="$(cat setup.py requirements/lock.txt; echo "extras=$extras")"
stamp="$(printf '%s' "$stamp_inputs" | sha256sum | cut -d' ' -f1)"
if [ -f .venv/.maspo-installed ] && grep -qx "$stamp" .venv/.maspo-installed; then
    exit 0
fi
if ! "$python_bin" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 10) else 1)'; then
    echo "bootstrap: $python_bin is older than Python 3.10; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c requirements/lock.txt -e ".$extras"
# Guard: refuse to continue with a CUDA torch on a CPU-only machine (several GB, and wrong).
.venv/bin/python - <<'PY'
import torch
if torch.version.cuda is not None and not torch.cuda.is_available():
    raise SystemExit(f"bootstrap: a CUDA build of torch ({torch.__version__}) was installed; expected the CPU build 2.13.0")
PY
cat /dev/null > .venv/.maspo-installed
printf '%s\n' "$stamp" >> .venv/.maspo-installed
