"""The benchmark body as a Hydra app (run it with hydra/callbacks=torchrun)."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from body import body


@hydra.main(version_base=None, config_path="conf", config_name="bench")
def main(cfg: DictConfig) -> object:
    total = body()
    if cfg.return_mb:
        return b"x" * (int(cfg.return_mb) * 1024 * 1024)
    return total


if __name__ == "__main__":
    main()
