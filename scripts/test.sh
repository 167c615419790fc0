#!/usr/bin/env bash
# Set up, lint, type-check, then run the whole test suite (what CI runs).
# As root on Debian it also installs slurm-wlm for the real-cluster tests, which are
# then required (HTR_REQUIRE_SLURM=1); elsewhere they are skipped with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client >/dev/null
  fi
  export HTR_REQUIRE_SLURM=1
fi
. .venv/bin/activate
ruff check .
ruff format --check .
mypy
python -m pytest -q --durations=15 "$@"
