"""bench_app.py shaped like most training scripts: torch imported at module top.

The Hydra process then imports torch before the callback runs (what users' apps do);
the task and its body are bench_app.py's.
"""

from __future__ import annotations

import os
import sys

import hydra
import torch.distributed  # noqa: F401  (the point: the Hydra process imports torch first)
from omegaconf import DictConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_app import task


@hydra.main(version_base=None, config_path="conf", config_name="bench")
def main(cfg: DictConfig) -> object:
    return task(cfg)


if __name__ == "__main__":
    main()
