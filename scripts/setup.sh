#!/usr/bin/env bash
# Creates .venv (if missing) and installs svdquant-jax into it.
#   scripts/setup.sh        runtime dependencies only
#   scripts/setup.sh test   plus the test-only references (torch CPU wheel first, then diffusers)
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
pip_install --upgrade pip
if [ "${1:-}" = "test" ]; then
  # torch first, pinned: any looser torch requirement would pull several GB of CUDA packages.
  pip_install torch==2.13.0
  pip_install -e '.[test]'
else
  pip_install -e .
fi
