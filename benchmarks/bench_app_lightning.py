"""bench_app.py shaped like a Lightning training script: Lightning imported at module top.

The Hydra process then imports torch and Lightning (several seconds) before the
callback runs; the task and its body are bench_app.py's.
"""

from __future__ import annotations

import os
import sys

import hydra
import lightning  # the point: the Hydra process imports it first
from omegaconf import DictConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_app import task


@hydra.main(version_base=None, config_path="conf", config_name="bench")
def main(cfg: DictConfig) -> object:
    # The task uses Lightning, as a real one does: a worker that did not inherit it
    # (a fresh warm server, spawn, torchrun) imports it to unpickle the task.
    lightning.seed_everything(0, verbose=False)
    return task(cfg)


if __name__ == "__main__":
    main()
