#!/usr/bin/env bash
# Set up, then run the main demo: hello_dist in 2 workers, then a 2-point DDP sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out="$(mktemp -d)"
python slurm_examples/hello_dist.py hydra/callbacks=torchrun \
  hydra.callbacks.torchrun.nproc_per_node=2 hydra.run.dir="$out/hello"
python slurm_examples/ddp_train.py -m lr=0.1,0.01 hydra/callbacks=torchrun \
  hydra.callbacks.torchrun.nproc_per_node=2 hydra.sweep.dir="$out/sweep"
echo "demo outputs: $out"
