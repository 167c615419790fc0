"""Test app: the Lightning example's task, plus what each rank's Trainer saw."""

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra_zen import store, zen

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "slurm_examples"))
import lightning_zen as example

ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS")


def probe(trainer: Any, module: Any, pl_testing: bool) -> dict[str, float]:
    metrics = example.task(trainer, module, pl_testing)
    strategy = trainer.strategy
    facts = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "host": socket.gethostname(),
        "argv": sys.argv,
        "cluster_env": type(strategy.cluster_environment).__name__,
        # Lightning's launcher only spawns when the environment does not create processes.
        "lightning_spawns": not strategy.cluster_environment.creates_processes_externally,
        "world_size": trainer.world_size,
        "global_rank": trainer.global_rank,
        "node_rank": trainer.node_rank,
        "local_rank": trainer.local_rank,
        "env": {k: os.environ.get(k) for k in ENV},
        "log_dir": trainer.logger.log_dir if trainer.logger else None,
        "ckpt_dir": trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None,
        "metrics": metrics,
    }
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / f"lightning_rank{trainer.global_rank}.json").write_text(json.dumps(facts))
    return metrics


@hydra.main(config_name="lightning_zen", config_path=None, version_base="1.3")
def main(cfg: Any) -> dict[str, float]:
    return zen(probe)(cfg)


if __name__ == "__main__":
    store.add_to_hydra_store()
    main()
