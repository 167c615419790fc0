"""hydra-zen: run a task under torchrun from Python, with no YAML and no command line.

``hydra_zen.launch(Config, task, overrides=["hydra/callbacks=torchrun", ...])``
starts the workers like any Hydra app does; each returned ``JobReturn`` carries
global rank 0's value. A task wrapped with ``hydra_zen.zen`` gets its config
fields as arguments (and instantiated where they are ``builds(...)``)::

    python slurm_examples/zen_launch.py                 # 1 run + a 2-point sweep, 2 workers
    python slurm_examples/zen_launch.py --nproc 3 --out /tmp/zen

Call ``launch`` under ``if __name__ == "__main__":``: the workers import this
file again (to find ``task``) and must not launch anything themselves.
The script prints one JSON line per job: its overrides, status and rank 0's value.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
import torch.distributed as dist
from hydra.core.utils import JobReturn
from hydra_zen import builds, launch, make_config, zen


def make_weights(size: int, fill: float) -> torch.Tensor:
    return torch.full((size,), fill)


def task(weights: torch.Tensor, scale: float) -> dict[str, Any]:
    """Every rank adds ``scale * (rank + 1) * weights``; rank 0 reports the all-reduced sum."""
    dist.init_process_group("gloo")  # torchrun's env:// variables, set by the callback
    rank, world = dist.get_rank(), dist.get_world_size()
    total = scale * (rank + 1) * weights
    dist.all_reduce(total)
    dist.destroy_process_group()
    return {"rank": rank, "world_size": world, "pid": os.getpid(), "sum": total.sum().item()}


Config = make_config(weights=builds(make_weights, size=4, fill=0.5), scale=1.0)


def _describe(job: JobReturn) -> dict[str, Any]:
    value = job.return_value if job.status.name == "COMPLETED" else repr(job._return_value)
    return {"overrides": job.overrides, "status": job.status.name, "value": value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="workers per job")
    parser.add_argument("--out", default="outputs/zen_launch", help="output root")
    args = parser.parse_args()
    torchrun = ["hydra/callbacks=torchrun", f"hydra.callbacks.torchrun.nproc_per_node={args.nproc}"]

    single = launch(
        Config,
        zen(task),
        overrides=[*torchrun, f"hydra.run.dir={args.out}/run"],
        version_base="1.3",
    )
    print(json.dumps({"mode": "run", **_describe(single)}), flush=True)

    [jobs] = launch(
        Config,
        zen(task),
        overrides=[*torchrun, "scale=1,10", f"hydra.sweep.dir={args.out}/sweep"],
        multirun=True,
        version_base="1.3",
    )
    for job in jobs:
        print(json.dumps({"mode": "multirun", **_describe(job)}), flush=True)


if __name__ == "__main__":
    main()
