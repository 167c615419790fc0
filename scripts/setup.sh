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
# The main cell tests the newest versions pyproject.toml admits (the floors have their own cell
# in scripts/compat.sh): upgrade what an older, reused .venv may hold. torch stays 2.13.0.
python -m pip install -q --upgrade hydra-core omegaconf cloudpickle submitit \
  hydra-submitit-launcher "torch==2.13.0"
python -c 'from importlib import metadata as m; print("main cell:", ", ".join(
    f"{n} {m.version(n)}" for n in ["torch", "hydra-core", "omegaconf", "cloudpickle",
                                     "submitit", "hydra-submitit-launcher"]))'
