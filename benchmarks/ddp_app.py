"""The steady-state body (ddp_body.train) as a Hydra app (run it with hydra/callbacks=torchrun)."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_body import train


@hydra.main(version_base=None, config_path="conf", config_name="ddp")
def main(cfg: DictConfig) -> float:
    return train(int(cfg.steps), int(cfg.warmup))


if __name__ == "__main__":
    main()
