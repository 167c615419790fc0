#!/usr/bin/env bash
# Create .venv (if needed) and install the package with its test tools.
# torch 2.13.0 is installed first, explicitly: any other spec may pull GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
python -m pip install -q "torch==2.13.0"
# A real (non-editable) install: Hydra must discover hydra_plugins/ as users will.
# The ecosystem extras (Lightning, Optuna, hydra-zen) are what their tests and examples need.
python -m pip install -q ".[${HTR_EXTRAS:-dev,all}]"
