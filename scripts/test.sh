#!/usr/bin/env bash
# Set up, lint, type-check, run the support matrix's cheap cells, then the whole test suite
# (what CI runs).
# As root on Debian it also installs slurm-wlm, munge, slurmdbd and MariaDB for the
# real-cluster tests, which are then required (HTR_REQUIRE_SLURM=1); elsewhere they are
# skipped with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=0
  for tool in slurmctld slurmd sbatch slurmdbd munged mariadbd mariadb-install-db; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null || missing=1
  done
  if [ "$missing" = 1 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge slurmdbd mariadb-server >/dev/null
  fi
  export HTR_REQUIRE_SLURM=1
fi
. .venv/bin/activate
ruff check .
ruff format --check .
mypy
# The cheap cells of the support matrix: pure tests on every supported Python without torch,
# and every dependency floor on the oldest Python (core tests). HTR_SKIP_COMPAT=1 skips them.
if [ "${HTR_SKIP_COMPAT:-0}" != 1 ]; then
  bash scripts/compat.sh --ci
fi
python -m pytest -q --durations=15 "$@"
