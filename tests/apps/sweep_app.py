"""Test app for sweeps that outlive interruptions.

Every rank writes ``rank<r>.<pid>.json`` (pid, run id, SLURM variables) in its output dir;
rank 0 appends ``x pid`` to ``<original cwd>/runs.log`` (how often each point ran). A point
raises if ``<original cwd>/fail_<x>`` exists; the first point to claim
``<original cwd>/die_once`` SIGKILLs its whole job (its Hydra process, then itself: an
OOM kill, a lost node; ``die=worker``: itself only); it waits for ``<original cwd>/release`` with
``wait_release=true``. With ``wandb=true`` rank 0 logs to W&B (offline) under the
job's run identity. It returns a ``Fraction`` (a type a restored value must keep) or a
float (for Optuna).
"""

import json
import os
import signal
import time
from fractions import Fraction

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd
from omegaconf import DictConfig


@hydra.main(version_base=None, config_path="conf", config_name="sweep")
def main(cfg: DictConfig) -> object:
    rank = int(os.environ.get("RANK", "0"))
    out = HydraConfig.get().runtime.output_dir
    home = get_original_cwd()
    fact = {
        "pid": os.getpid(),
        "x": cfg.x,
        "run_id": os.environ.get("HYDRA_TORCHRUN_RUN_ID"),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("SLURM_", "HYDRA_TORCHRUN"))},
    }
    with open(os.path.join(out, f"rank{rank}.{os.getpid()}.json"), "w") as f:
        json.dump(fact, f)
    if rank == 0:
        with open(os.path.join(home, "runs.log"), "a") as f:
            f.write(f"{cfg.x} {os.getpid()}\n")
    if cfg.wandb and rank == 0:  # W&B, offline: the run continues across attempts
        import wandb

        run = wandb.init(
            project="htr-test",
            id=os.environ["HYDRA_TORCHRUN_RUN_ID"],
            resume="allow",
            mode="offline",
            dir=out,
        )
        run.log({"x": cfg.x})
        run.finish()
    if rank == 0 and _claim(os.path.join(home, "die_once"), os.path.join(out, "died")):
        if cfg.die == "job":  # the point's whole job: its Hydra process, then this worker
            with open(os.path.join(out, "torchrun_point.json")) as f:
                os.kill(json.load(f)["attempts"][-1]["pid"], signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    if os.path.exists(os.path.join(home, f"fail_{cfg.x}")):
        raise RuntimeError(f"point x={cfg.x} was told to fail")
    while cfg.wait_release and not os.path.exists(os.path.join(home, "release")):
        time.sleep(0.2)
    if cfg.returns == "float":
        return float(cfg.x) ** 2
    return Fraction(int(cfg.x), 3)


def _claim(path: str, to: str) -> bool:
    try:
        os.rename(path, to)  # atomic: one point only
    except OSError:
        return False
    return True


if __name__ == "__main__":
    main()
