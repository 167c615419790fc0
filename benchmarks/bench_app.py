"""The benchmark body as a Hydra app (run it with hydra/callbacks=torchrun).

It imports torch lazily (inside the task), so the Hydra process never imports it;
bench_app_top.py is the same app shaped like most training scripts (``import torch``
at module top).
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from body import body


def task(cfg: DictConfig) -> object:
    total = body()
    if cfg.return_mb:
        return b"x" * (int(cfg.return_mb) * 1024 * 1024)
    return total


@hydra.main(version_base=None, config_path="conf", config_name="bench")
def main(cfg: DictConfig) -> object:
    return task(cfg)


if __name__ == "__main__":
    main()
